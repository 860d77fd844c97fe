"""`pipeline submit` / `pipeline job` against a real Ray cluster started by the test
(`ray start --head` on 127.0.0.1 with its own temp dir), stopped by the pids of its own
processes only."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from tests.pseudo_fixtures import coco_samples, write_shard

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _own_processes(marker: str) -> list[int]:
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


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    temp = tmp_path_factory.mktemp("rc")
    dashboard = _free_port()
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("RAY_ADDRESS", None)
    command = [
        str(Path(sys.executable).parent / "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
        f"--port={_free_port()}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={_free_port()}",
        f"--metrics-export-port={_free_port()}", f"--temp-dir={temp}", "--num-cpus=2", "--disable-usage-stats",
    ]
    subprocess.run(command, check=True, env=env, timeout=180, capture_output=True)
    try:
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in _own_processes(str(temp)):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(2)


@pytest.fixture(scope="module")
def shard(tmp_path_factory, shared_data):
    folder = tmp_path_factory.mktemp("submit-shards")
    write_shard(folder / "00000.tar", [(k, "jpg", d, c) for k, d, c in coco_samples(shared_data, 8)])
    return folder


def test_submit_parse_captions_streams_logs_and_writes_outputs(cluster, shard, tmp_path):
    out = tmp_path / "phrases"
    result = CliRunner().invoke(
        app,
        ["submit", "--address", cluster, "--working-dir", str(REPO), "--job-id", "parse-test-1", "--",
         "parse-captions", str(shard), "--out", str(out), "--workers", "1"],
    )
    assert result.exit_code == 0, result.output
    assert "parse-captions: 1 shard(s) written" in result.output  # the job's own log, streamed
    stats = json.loads((out / "_stats.json").read_text())
    assert stats["samples"] == 8 and stats["shards"]["failed"] == 0
    assert (out / "00000.parquet").is_file()

    status = CliRunner().invoke(app, ["job", "status", "parse-test-1", "--address", cluster])
    assert status.exit_code == 0 and "SUCCEEDED" in status.output
    logs = CliRunner().invoke(app, ["job", "logs", "parse-test-1", "--address", cluster])
    assert "shard(s) written" in logs.output


def test_submit_tiny_pseudo_label(cluster, shard, tmp_path):
    from tests.pseudo_fixtures import tiny_teacher

    phrases = tmp_path / "phrases"
    result = CliRunner().invoke(
        app, ["submit", "--address", cluster, "--working-dir", str(REPO), "--", "parse-captions", str(shard), "--out", str(phrases)]
    )
    assert result.exit_code == 0, result.output
    teacher = tiny_teacher(tmp_path / "teacher.pth")
    out = tmp_path / "labelled"
    result = CliRunner().invoke(
        app,
        ["submit", "--address", cluster, "--working-dir", str(REPO), "--", "pseudo-label", str(shard), "--phrases", str(phrases),
         "--teacher", str(teacher), "--out", str(out), "--min-size", "128", "--max-size", "192", "--preset", "owlst", "--workers", "1"],
    )
    assert result.exit_code == 0, result.output
    assert "pseudo-label: 1 shard(s) written" in result.output
    stats = json.loads((out / "_stats.json").read_text())
    assert stats["samples"] == 8 and stats["images"] == 8 and stats["written"] + sum(e["count"] for e in stats["skipped"].values()) == 8
    assert (out / "pseudo" / "00000.tar").is_file() and (out / "detections" / "00000.parquet").is_file()


def test_no_wait_and_failing_job(cluster, tmp_path):
    result = CliRunner().invoke(
        app,
        ["submit", "--address", cluster, "--working-dir", str(REPO), "--no-wait", "--job-id", "bad-input-1", "--",
         "parse-captions", str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
    )
    assert result.exit_code == 0 and result.output.strip().splitlines()[-1] == "bad-input-1"
    follow = CliRunner().invoke(app, ["job", "logs", "bad-input-1", "--address", cluster, "--follow"])
    assert "missing" in follow.output  # the stage's own error, naming the path
    status = CliRunner().invoke(app, ["job", "status", "bad-input-1", "--address", cluster])
    assert "FAILED" in status.output


def test_submit_errors_before_contacting_a_cluster(tmp_path):
    result = CliRunner().invoke(app, ["submit", "--address", "http://127.0.0.1:1", "--working-dir", str(tmp_path), "--", "parse-captions"])
    assert result.exit_code == 2 and "not the project folder" in result.output


def test_cluster_manifests_parse_and_name_real_options():
    import shlex

    import typer.main
    import yaml

    cluster = yaml.safe_load((REPO / "jobs/cluster.yaml").read_text())
    assert cluster["head_node_type"] in cluster["available_node_types"]
    assert cluster["available_node_types"]["gpu_worker"]["max_workers"] > cluster["available_node_types"]["gpu_worker"]["min_workers"]
    job = yaml.safe_load((REPO / "jobs/rayjob-pseudo-label.yaml").read_text())
    assert job["kind"] == "RayJob"
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:4] == ["python", "-m", "pipeline", "pseudo-label"]
    group = typer.main.get_command(app)
    known = {opt for param in group.commands["pseudo-label"].params for opt in param.opts}
    assert {w for w in words if w.startswith("--")} <= known
