"""`pipeline submit` / `pipeline job` against a real Ray cluster started by the test
(`.venv/bin/ray start --head` on 127.0.0.1 with its own temp dir and the venv NOT on its PATH,
as a new user starts it), stopped by the pids of its own processes only. `submit` finds the
engine's interpreter itself (its probe job)."""

from __future__ import annotations

import copy

import json
import os
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from tests.pseudo_fixtures import coco_samples, write_shard
from tests.ray_heads import bare_head_env, free_port, short_temp, start_head, stop_head

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    temp = short_temp("rc-")
    dashboard = free_port()
    start_head(temp, dashboard, bare_head_env())
    try:
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        stop_head(temp, remove=True)


@pytest.fixture(scope="module")
def shard(tmp_path_factory, shared_data):
    folder = tmp_path_factory.mktemp("submit-shards")
    write_shard(folder / "00000.tar", [(k, "jpg", d, c) for k, d, c in coco_samples(shared_data, 8)])
    return folder


@pytest.fixture(scope="module")
def submitted_phrases(cluster, shard, tmp_path_factory):
    """parse-captions submitted to the cluster and followed: (CLI result, its --out folder)."""
    out = tmp_path_factory.mktemp("submitted") / "phrases"
    result = CliRunner().invoke(
        app,
        ["submit", "--address", cluster, "--working-dir", str(REPO), "--job-id", "parse-test-1", "--",
         "parse-captions", str(shard), "--out", str(out), "--workers", "1"],
    )
    return result, out


def test_submit_parse_captions_streams_logs_and_writes_outputs(cluster, submitted_phrases):
    result, out = submitted_phrases
    assert result.exit_code == 0, result.output
    assert "parse-captions: 1 shard(s) written" in result.output  # the job's own log, streamed
    assert "job parse-test-1: SUCCEEDED" in result.output
    stats = json.loads((out / "_stats.json").read_text())
    assert stats["samples"] == 8 and stats["shards"]["failed"] == 0
    assert (out / "00000.parquet").is_file()

    status = CliRunner().invoke(app, ["job", "status", "parse-test-1", "--address", cluster])
    assert status.exit_code == 0 and "SUCCEEDED" in status.output
    logs = CliRunner().invoke(app, ["job", "logs", "parse-test-1", "--address", cluster])
    assert "shard(s) written" in logs.output


def test_submit_tiny_pseudo_label(cluster, shard, submitted_phrases, tmp_path):
    from tests.pseudo_fixtures import tiny_teacher

    phrases = submitted_phrases[1]
    assert (phrases / "_stats.json").is_file(), submitted_phrases[0].output
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


def _alt_text_shards(shared_data: Path, folder: Path) -> list[str]:
    """Ten Parquet shards of 150 raw web alt-texts each (slow enough to interrupt)."""
    import pyarrow.parquet as pq

    folder.mkdir()
    table = pq.read_table(shared_data / "captions" / "web_alt_text_10000.parquet", columns=["TEXT"])
    names = [f"w{index:03d}.parquet" for index in range(10)]
    for index, name in enumerate(names):
        pq.write_table(table.slice(index * 150, 150), folder / name)
    return names


def _assert_equal_to_in_process_worker(shards: Path, out: Path, names: list[str], reference: Path) -> None:
    from nlp.phrases import ExtractorSettings
    from pipeline.io.shards import CaptionColumns
    from pipeline.stages.parse_captions import CaptionShardWorker
    from pipeline.stages.stage import run_shard
    from tests.test_parse_captions import comparable, task_for

    worker = CaptionShardWorker(
        settings=ExtractorSettings(), columns=CaptionColumns(caption="TEXT"), pipeline_name=None, batch_size=256
    )
    for name in names:
        run_shard(worker, task_for(shards / name, reference))
        assert comparable(out / name) == comparable(reference / name), name


def test_worker_killed_inside_a_submitted_job(cluster, tmp_path, shared_data):
    """A Ray Data shard actor of a submitted job, killed by its pid (found through this
    cluster's state API) while the job runs: Ray replaces it, the job SUCCEEDS and every
    output equals the in-process worker's, with each of the 1500 samples written once."""
    import signal as signals

    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors

    shards, out = tmp_path / "shards", tmp_path / "out"
    names = _alt_text_shards(shared_data, shards)
    stage = ["parse-captions", str(shards), "--out", str(out), "--caption-column", "TEXT", "--workers", "1"]
    first = CliRunner().invoke(app, ["submit", "--address", cluster, "--working-dir", str(REPO), "--no-wait",
                                     "--job-id", "kill-worker-1", "--", *stage])
    assert first.exit_code == 0, first.output
    client = JobSubmissionClient(cluster)
    deadline = time.monotonic() + 240
    killed = None
    while killed is None:
        assert time.monotonic() < deadline and client.get_job_status("kill-worker-1").value not in ("SUCCEEDED", "FAILED")
        if out.is_dir() and any(out.glob("w*.parquet")):  # one shard out, the actor is on the next
            actors = list_actors(address=cluster, filters=[("state", "=", "ALIVE")], limit=1000)
            pids = [int(a.pid) for a in actors if "MapWorker" in (a.class_name or "") and a.pid]
            if pids:
                killed = pids[0]
                os.kill(killed, signals.SIGKILL)
        time.sleep(0.05)
    while (status := client.get_job_status("kill-worker-1").value) not in ("STOPPED", "SUCCEEDED", "FAILED"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert status == "SUCCEEDED", client.get_job_logs("kill-worker-1")[-3000:]
    stats = json.loads((out / "_stats.json").read_text())
    assert stats["shards"]["failed"] == 0 and stats["samples"] == 1500
    assert sorted(os.listdir(out)) == sorted([*names, "_shards.jsonl", "_stats.json"])  # no temporaries left
    _assert_equal_to_in_process_worker(shards, out, names, tmp_path / "reference")


def test_stopped_job_resubmitted_resumes_to_the_same_outputs(cluster, tmp_path, shared_data):
    """`pipeline job stop` kills the job's driver (and its Ray Data actors) once a shard is out;
    the same command submitted again skips the finished shards, and every output equals the
    in-process worker's, row by row."""
    from pipeline.io import storage

    shards, out = tmp_path / "shards", tmp_path / "out"
    names = _alt_text_shards(shared_data, shards)
    stage = ["parse-captions", str(shards), "--out", str(out), "--caption-column", "TEXT", "--workers", "1"]
    base = ["submit", "--address", cluster, "--working-dir", str(REPO)]
    first = CliRunner().invoke(app, [*base, "--no-wait", "--job-id", "stop-me-1", "--", *stage])
    assert first.exit_code == 0, first.output

    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster)
    deadline = time.monotonic() + 240
    while not (out.is_dir() and any(out.glob("w*.parquet"))):
        assert time.monotonic() < deadline and client.get_job_status("stop-me-1").value not in ("SUCCEEDED", "FAILED")
        time.sleep(0.05)
    stop = CliRunner().invoke(app, ["job", "stop", "stop-me-1", "--address", cluster])
    assert stop.exit_code == 0 and "stop requested" in stop.output
    while (status := client.get_job_status("stop-me-1").value) not in ("STOPPED", "SUCCEEDED", "FAILED"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert status == "STOPPED"
    assert "STOPPED" in CliRunner().invoke(app, ["job", "status", "stop-me-1", "--address", cluster]).output
    finished = sorted(path.name for path in out.glob("w*.parquet"))
    assert 1 <= len(finished) < len(names) and not (out / "_stats.json").exists()

    again = CliRunner().invoke(app, [*base, "--job-id", "stop-me-2", "--", *stage])
    assert again.exit_code == 0, again.output
    stats = json.loads((out / "_stats.json").read_text())
    assert stats["shards"]["already_done"] == len(finished) and stats["shards"]["written"] == len(names) - len(finished)
    assert stats["shards"]["failed"] == 0 and stats["samples"] == 1500
    assert sorted(os.listdir(out)) == sorted([*names, "_shards.jsonl", "_stats.json"])  # no temporaries left
    assert not [name for name in os.listdir(out) if storage.is_temporary_name(name)]
    _assert_equal_to_in_process_worker(shards, out, names, tmp_path / "reference")


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

    from jsonschema import ValidationError
    from ray.autoscaler._private.util import prepare_config, validate_config

    cluster = yaml.safe_load((REPO / "jobs/cluster.yaml").read_text())
    # What `ray up` checks: defaults filled in, then Ray's own cluster-launcher schema.
    validate_config(prepare_config(copy.deepcopy(cluster)))
    typo = copy.deepcopy(cluster)
    typo["available_node_types"]["gpu_worker"]["max_wokers"] = 3
    with pytest.raises(ValidationError, match="max_wokers"):
        validate_config(prepare_config(typo))
    assert cluster["head_node_type"] in cluster["available_node_types"]
    assert cluster["available_node_types"]["gpu_worker"]["max_workers"] > cluster["available_node_types"]["gpu_worker"]["min_workers"]
    job = yaml.safe_load((REPO / "jobs/rayjob-pseudo-label.yaml").read_text())
    assert job["kind"] == "RayJob"
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:4] == ["python", "-m", "pipeline", "pseudo-label"]
    group = typer.main.get_command(app)
    known = {opt for param in group.commands["pseudo-label"].params for opt in param.opts}
    assert {w for w in words if w.startswith("--")} <= known
