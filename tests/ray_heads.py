"""A real Ray head for tests, as a user starts it (`ray start --head` on 127.0.0.1 with its own
ports and temp dir), stopped by the pids of its own processes only (never `ray stop`)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.cluster import pids_naming


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def short_temp(prefix: str) -> Path:
    """A head's temp dir directly under /tmp: Ray's Unix socket paths lie under it and must stay
    within 107 bytes, which pytest's own temp folders exceed (deeper still under pytest-xdist,
    `popen-gw1/`: "AF_UNIX path length cannot exceed 107 bytes", the head's dashboard fails)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def head_command(temp: Path, dashboard: int) -> list[str]:
    """`.venv/bin/ray start --head` on 127.0.0.1 with its own ports and temp dir (no venv activation)."""
    return [
        str(Path(sys.executable).parent / "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
        f"--port={free_port()}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={free_port()}",
        f"--metrics-export-port={free_port()}", f"--temp-dir={temp}", "--num-cpus=2", "--disable-usage-stats",
    ]


def bare_head_env() -> dict[str, str]:
    """The environment of a head started from a shell where the venv is NOT activated: the
    venv's `python` is not on PATH, so a job's plain `python` cannot import the engine."""
    venv_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p != venv_bin and "pyenv" not in p)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_USAGE_STATS_ENABLED": "0", "PATH": path or "/usr/bin:/bin"}
    for name in ("RAY_ADDRESS", "VIRTUAL_ENV", "PYTHONPATH"):
        env.pop(name, None)
    return env


def stop_head(temp: Path, *, remove: bool = False) -> None:
    """Stop the head started with `temp` as its temp dir, by the pids of its own processes only
    (and with `remove`, delete that dir)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids_naming(str(temp)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(2)
    if remove:
        shutil.rmtree(temp, ignore_errors=True)


def start_head(temp: Path, dashboard: int, env: dict[str, str], attempts: int = 3) -> None:
    """`ray start --head` (head_command); a start that misses Ray's fixed 30 s start-up limit (a
    busy machine, as the engine's own embedded start meets it) is stopped and tried again. Any
    other failure, or the last one, raises with Ray's own output."""
    for attempt in range(1, attempts + 1):
        done = subprocess.run(head_command(temp, dashboard), env=env, timeout=180, capture_output=True, text=True)
        if done.returncode == 0:
            return
        output = done.stdout + done.stderr
        if "timed out during startup" not in output or attempt == attempts:
            raise RuntimeError(f"ray start --head failed (exit {done.returncode}):\n{output[-3000:]}")
        stop_head(temp)
