"""Failures mid-stage: a Ray worker killed (by its pid) while it labels a shard, and a shard
that cannot be read. The stage must finish the rest, and the outputs must equal an
uninterrupted run's, sample by sample."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from pipeline.io.labels_io import read_detections
from pipeline.stages.filtering import get_preset
from tests.test_pseudo_label import phrases, world  # noqa: F401  (module fixtures, re-made here)


@pytest.fixture(scope="module")
def ray_local():
    """Embedded Ray with the dashboard: the test finds the worker to kill through the state API."""
    from pipeline.cluster import init_ray, shutdown_ray

    started = init_ray(None, num_cpus=2, include_dashboard=True)
    yield
    shutdown_ray(started)  # not a bare ray.shutdown(): this restores RAY_TMPDIR and removes the temp root


def _config(world, phrases, out: Path):  # noqa: F811
    from pipeline.stages.pseudo_label import PseudoLabelConfig

    return PseudoLabelConfig(
        inputs=(str(world["shards"]),), phrases=str(phrases), teacher=str(world["teacher"]), out=str(out),
        policy=get_preset("owlst"), min_size=128, max_size=192, batch_size=3, workers=1,
    )


def _worker_pids() -> list[int]:
    """Pids of this test's Ray Data shard actors (the address pins our own cluster: other Ray
    instances on the machine are never looked at, let alone killed)."""
    import ray
    from ray.util.state import list_actors

    address = ray.get_runtime_context().gcs_address
    actors = list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=1000)
    return [int(a.pid) for a in actors if "MapWorker" in (a.class_name or "") and a.pid]


def test_worker_killed_mid_stage_is_replaced_and_output_is_exact(world, phrases, ray_local, tmp_path):  # noqa: F811
    from pipeline.stages.pseudo_label import run_pseudo_label

    reference = tmp_path / "reference"
    run_pseudo_label(_config(world, phrases, reference))

    out = tmp_path / "killed"
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(stats=run_pseudo_label(_config(world, phrases, out))))
    thread.start()
    killed = None
    deadline = time.monotonic() + 180
    while thread.is_alive() and time.monotonic() < deadline and killed is None:
        if list(out.glob("pseudo/*.tar")):  # one shard done, the worker is on the next one
            pids = _worker_pids()
            if pids:
                killed = pids[0]
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    thread.join(timeout=300)
    assert killed is not None, "the stage finished before a worker could be killed"
    stats = result["stats"]
    assert stats["shards"]["failed"] == 0 and stats["shards"]["written"] == 3
    for shard in ("00000", "00001", "00002"):
        assert (out / "pseudo" / f"{shard}.tar").read_bytes() == (reference / "pseudo" / f"{shard}.tar").read_bytes()
        got = read_detections(str(out / "detections" / f"{shard}.parquet"))[0]
        assert got == read_detections(str(reference / "detections" / f"{shard}.parquet"))[0]
    assert stats["samples"] == json.loads((reference / "_stats.json").read_text())["samples"]


def test_unreadable_shard_is_reported_and_the_rest_completes(world, phrases, ray_local, tmp_path):  # noqa: F811
    """A cut-short tar fails on every attempt: after the bounded retries the command names it,
    why and how often it was tried, exits 1, and the two good shards are written."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    shards = tmp_path / "shards"
    shards.mkdir()
    for name in ("00000.tar", "00001.tar"):
        (shards / name).write_bytes((world["shards"] / name).read_bytes())
    data = (world["shards"] / "00002.tar").read_bytes()
    (shards / "00002.tar").write_bytes(data[: len(data) // 2])  # cut short
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        ["pseudo-label", str(shards), "--phrases", str(phrases), "--teacher", str(world["teacher"]), "--out", str(out),
         "--min-size", "128", "--max-size", "192", "--batch-size", "3", "--workers", "1", "--preset", "owlst"],
    )
    assert result.exit_code == 1, result.output
    assert "2 shard(s) written" in result.output and "1 shard(s) failed (00002)" in result.output
    stats = json.loads((out / "_stats.json").read_text())
    assert stats["shards"]["written"] == 2 and stats["shards"]["failed"] == 1
    reason = stats["shards"]["failed_shards"]["00002"]
    assert "truncated" in reason and "00002.tar" in reason and "(failed 3 attempts)" in reason
    assert sorted(p.name for p in (out / "pseudo").glob("*.tar")) == ["00000.tar", "00001.tar"]
    assert not list((out / "detections").glob("00002*"))
