"""Embedded means embedded: with another Ray cluster up on the machine (a `ray start --head`
that a plain `ray.init()` would find through `$RAY_TMPDIR/ray/ray_current_cluster`), verbs run
without `--address` each start a Ray of their own, and two trainings at once both finish.

Before `init_ray` started its own cluster in its own temp root, the verbs joined that head and
failed ("When connecting to an existing cluster, num_cpus and num_gpus must not be provided"),
and Ray Train v2's placement-group cleaner of each training asked the head whether its
controller was alive, heard "no", and removed the training's placement group."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from tests.pseudo_fixtures import coco_samples, write_shard
from tests.ray_heads import free_port, start_head, stop_head

PIPELINE = str(Path(sys.executable).parent / "pipeline")
COCO = "coco_mini/annotations/instances_train2017_subset.json"
IMAGES = "coco_mini/train2017"


@pytest.fixture
def other_cluster():
    """A head in a short temp folder of its own, which `RAY_TMPDIR` names for the verbs' environment."""
    home = Path(tempfile.mkdtemp(prefix="other-", dir="/tmp"))  # short: Ray's socket paths are length-limited
    temp = home / "ray"
    env = {**os.environ, "RAY_TMPDIR": str(home)}
    env.pop("RAY_ADDRESS", None)
    start_head(temp, free_port(), env)
    assert (temp / "ray_current_cluster").is_file()  # what a plain ray.init() would join
    try:
        yield env, home
    finally:
        stop_head(temp)
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.slow
def test_two_trainings_and_a_stage_beside_another_cluster(other_cluster, tmp_path, shared_data):
    env, home = other_cluster
    (tmp_path / "shards").mkdir()
    write_shard(tmp_path / "shards" / "00000.tar", [(k, "jpg", d, c) for k, d, c in coco_samples(shared_data, 4)])
    train = [
        "train-student", "--config", "tiny", "--coco", str(shared_data / COCO), "--images", str(shared_data / IMAGES),
        "--steps", "3", "--batch-size", "1", "--min-size", "128", "--max-size", "160", "--freeze-text",
        "--workers", "1", "--cpus-per-worker", "1", "--checkpoint-every", "3", "--log-every", "1",
    ]
    runs = {
        "a": [PIPELINE, *train, "--out", str(tmp_path / "a")],
        "b": [PIPELINE, *train, "--out", str(tmp_path / "b"), "--seed", "1"],
        "parse": [PIPELINE, "parse-captions", str(tmp_path / "shards"), "--out", str(tmp_path / "phrases"), "--workers", "1"],
    }
    procs = {name: subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, cmd in runs.items()}
    outputs = {name: proc.communicate(timeout=600)[0] for name, proc in procs.items()}
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name}:\n{outputs[name][-4000:]}"
    for name in ("a", "b"):
        student = torch.load(tmp_path / name / "student.pth", map_location="cpu", weights_only=True)
        assert student["glip_engine"]["provenance"]["step"] == 3
    assert (tmp_path / "phrases" / "00000.parquet").is_file()
    # each embedded Ray removed its own temp root when it stopped; the head's folder is untouched
    assert sorted(p.name for p in home.iterdir()) == ["ray"]
