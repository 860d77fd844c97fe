"""A real Ray head for tests, as a user starts it (`ray start --head` on 127.0.0.1 with its own
ports and temp dir), stopped by the pids of its own processes only (never `ray stop`)."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def own_processes(marker: str) -> list[int]:
    """Pids whose command line names `marker` (the cluster's unique temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


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


def stop_head(temp: Path) -> None:
    """Stop the head started with `temp` as its temp dir, by the pids of its own processes only."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in own_processes(str(temp)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(2)
