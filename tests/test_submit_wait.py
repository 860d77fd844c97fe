"""`pipeline submit` against a cluster that is still starting, and against a bare head whose
`python` cannot import the engine: a real loopback head started by the test (after the submit
began), stopped by the pids of its own processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.pseudo_fixtures import coco_samples, write_shard
from tests.ray_heads import bare_head_env, free_port, short_temp, start_head, stop_head

REPO = Path(__file__).resolve().parents[1]
CLIENT_ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}


def _error_lines(stderr: str) -> list[str]:
    """Our error lines (Ray's own packaging logger adds INFO/WARNING lines before them)."""
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _submit(address: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "submit", "--address", address, "--working-dir", str(REPO), *args]


@pytest.fixture(scope="module")
def late_head(tmp_path_factory, shared_data):
    """`submit` started first, the head 4 s later: (address, the submit's result, its --out)."""
    root = tmp_path_factory.mktemp("late")
    (root / "shards").mkdir()
    write_shard(root / "shards" / "00000.tar", [(k, "jpg", d, c) for k, d, c in coco_samples(shared_data, 4)])
    dashboard = free_port()
    address = f"http://127.0.0.1:{dashboard}"
    out = root / "phrases"
    stage = ["parse-captions", str(root / "shards"), "--out", str(out), "--workers", "1"]
    submit = subprocess.Popen(_submit(address, "--wait-cluster", "240", "--", *stage), cwd=REPO, env=CLIENT_ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(4)
    temp = short_temp("late-")
    start_head(temp, dashboard, bare_head_env())
    try:
        stdout, stderr = submit.communicate(timeout=400)
        yield address, subprocess.CompletedProcess(submit.args, submit.returncode, stdout, stderr), out
    finally:
        if submit.poll() is None:
            submit.kill()
        stop_head(temp, remove=True)


def test_submit_waits_for_a_cluster_that_starts_later(late_head):
    _, result, out = late_head
    assert result.returncode == 0, result.stderr[-3000:]
    assert "submit: waiting for the Ray dashboard at http://127.0.0.1:" in result.stderr
    assert "SUCCEEDED" in result.stderr
    assert json.loads((out / "_stats.json").read_text())["samples"] == 4


def test_bare_head_runs_the_stage_with_the_interpreter_that_imports_the_engine(late_head):
    """The head's PATH has no venv (no `python` at all): the probe names why `python` failed
    and the stage ran with the venv's interpreter."""
    _, result, _ = late_head
    assert f"submit: the cluster's engine interpreter is {sys.executable}" in result.stderr
    assert "submitted job raysubmit_" in result.stderr and f"{sys.executable} -m pipeline parse-captions" in result.stderr


def test_an_interpreter_without_the_engine_is_one_line_naming_what_to_do(late_head, tmp_path):
    address = late_head[0]
    command = _submit(address, "--python", "/usr/bin/python3", "--", "parse-captions", str(tmp_path), "--out", str(tmp_path / "o"))
    result = subprocess.run(command, cwd=REPO, env=CLIENT_ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = _error_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"error: the cluster at {address} cannot run the engine"), result.stderr
    assert "/usr/bin/python3: ModuleNotFoundError: No module named" in lines[0] and "--python PATH" in lines[0]


def test_other_errors_are_immediate(late_head, tmp_path):
    """A duplicate job id is no start-up condition: one line at once, however long --wait-cluster is."""
    address = late_head[0]
    stage = ["--", "parse-captions", str(tmp_path), "--out", str(tmp_path / "o")]
    first = subprocess.run(_submit(address, "--no-wait", "--no-check", "--job-id", "dup-1", *stage),
                           cwd=REPO, env=CLIENT_ENV, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    started = time.monotonic()
    again = subprocess.run(_submit(address, "--no-check", "--wait-cluster", "300", "--job-id", "dup-1", *stage),
                           cwd=REPO, env=CLIENT_ENV, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and time.monotonic() - started < 60
    lines = _error_lines(again.stderr)
    assert len(lines) == 1 and "dup-1" in lines[0] and "Traceback" not in again.stderr, (lines, again.stderr[-3000:])
    assert "waiting for" not in again.stderr


def test_no_cluster_within_the_wait_is_one_line(tmp_path):
    address = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = subprocess.run(_submit(address, "--wait-cluster", "3", "--", "parse-captions", str(tmp_path), "--out", str(tmp_path / "o")),
                            cwd=REPO, env=CLIENT_ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and time.monotonic() - started < 60
    errors = _error_lines(result.stderr)
    assert errors == [line for line in result.stderr.splitlines() if not line.startswith("submit: waiting for")]
    assert len(errors) == 1 and f"waited 3 s (--wait-cluster) for the Ray dashboard at {address}" in errors[0]
    assert result.stderr.count("submit: waiting for") >= 2  # it retried, with back-off
