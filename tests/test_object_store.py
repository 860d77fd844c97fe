"""Stages on object storage: parse-captions reads shards from and writes phrases to an
S3-compatible server (moto's server mode on 127.0.0.1, started here) and to a GCS emulator
(gcp-storage-emulator on 127.0.0.1, reached by gcsfs through STORAGE_EMULATOR_HOST), resumes
there, and leaves no partial object under a final name; pseudo-label and train-student read
and write S3."""

from __future__ import annotations

import json
import socket
import urllib.request

import pytest

from tests.pseudo_fixtures import coco_samples, write_shard


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def s3(monkeypatch):
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    # moto keeps its buckets in the process, across servers: start every test from nothing.
    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/moto-api/reset", method="POST"), timeout=30)
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }.items():
        monkeypatch.setenv(name, value)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(anon=False)
    fs.mkdir("engine")
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


@pytest.fixture
def gcs(monkeypatch):
    from gcp_storage_emulator.server import create_server

    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket="engine")
    server.start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    # gcsfs's default class asks GCS's storage-control gRPC service for each bucket's layout;
    # the emulator serves only the JSON API, so use the plain GCSFileSystem (what gcsfs falls
    # back to anyway after a warning). Set before gcsfs is imported; Ray workers inherit it.
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    import fsspec
    import gcsfs

    gcsfs.GCSFileSystem.clear_instance_cache()
    fs = fsspec.filesystem("gs")  # the instance the stages get for gs:// URIs
    yield fs
    gcsfs.GCSFileSystem.clear_instance_cache()
    server.stop()


def _parse_captions_with_resume(fs, scheme: str, tmp_path, shared_data) -> None:
    """parse-captions from `{scheme}://engine/web` to `{scheme}://engine/phrases`, then again
    after one output was deleted: only that shard is redone."""
    import ray

    from nlp.phrases import ExtractorSettings
    from pipeline.io.phrases_file import read_phrases_file
    from pipeline.stages.parse_captions import ParseCaptionsConfig, run_parse_captions

    samples = coco_samples(shared_data, 10)
    for shard, chunk in (("00000", samples[:6]), ("00001", samples[6:])):
        write_shard(tmp_path / f"{shard}.tar", [(k, "jpg", d, c) for k, d, c in chunk])
        fs.put(str(tmp_path / f"{shard}.tar"), f"engine/web/{shard}.tar")
    config = ParseCaptionsConfig(inputs=(f"{scheme}://engine/web",), out=f"{scheme}://engine/phrases", settings=ExtractorSettings(), workers=1)
    assert not ray.is_initialized()
    stats = run_parse_captions(config)
    assert stats["samples"] == 10 and stats["shards"]["written"] == 2 and stats["shards"]["failed"] == 0
    fs.invalidate_cache()
    names = sorted(path.rsplit("/", 1)[-1] for path in fs.ls("engine/phrases"))
    assert names == ["00000.parquet", "00001.parquet", "_shards.jsonl", "_stats.json"]  # no temporaries left
    table = read_phrases_file(f"{scheme}://engine/phrases/00000.parquet")
    assert table.column("key").to_pylist() == [k for k, _, _ in samples[:6]]
    assert all(row for row in table.column("phrases").to_pylist())

    fs.rm("engine/phrases/00001.parquet")  # as if the run had died before this shard finished
    again = run_parse_captions(config)
    assert again["shards"]["written"] == 1 and again["shards"]["already_done"] == 1 and again["samples"] == 10
    fs.invalidate_cache()
    assert json.loads(fs.cat("engine/phrases/_stats.json"))["shards"]["already_done"] == 1


def test_parse_captions_s3_to_s3_with_resume(s3, tmp_path, shared_data):
    _parse_captions_with_resume(s3, "s3", tmp_path, shared_data)


def test_parse_captions_gs_to_gs_with_resume_and_a_gs_checkpoint(gcs, tmp_path, shared_data, monkeypatch):
    from pipeline.io import storage

    _parse_captions_with_resume(gcs, "gs", tmp_path, shared_data)
    # A checkpoint on GCS: downloaded once into the cache, re-downloaded when the object changes.
    monkeypatch.setenv("GLIP_CACHE_DIR", str(tmp_path / "cache"))
    gcs.pipe("engine/models/teacher.pth", b"first version")
    first = storage.local_copy("gs://engine/models/teacher.pth")
    assert open(first, "rb").read() == b"first version"
    assert storage.local_copy("gs://engine/models/teacher.pth") == first
    gcs.pipe("engine/models/teacher.pth", b"second version, longer")
    gcs.invalidate_cache()
    second = storage.local_copy("gs://engine/models/teacher.pth")
    assert second != first and open(second, "rb").read() == b"second version, longer"
    with pytest.raises(FileNotFoundError, match="gs://engine/models/nope.pth"):
        storage.local_copy("gs://engine/models/nope.pth")


def test_pseudo_label_with_an_s3_teacher_equals_the_local_run(s3, tmp_path, shared_data, monkeypatch):
    """`--teacher s3://...` with shards, phrases and outputs on S3: the teacher is downloaded
    once into the local cache, its provenance names the object, and every detection row equals
    a run of the same teacher from a local file on local folders."""
    import ray
    from typer.testing import CliRunner

    from nlp.phrases import ExtractorSettings
    from pipeline.cli import app
    from pipeline.cluster import shutdown_ray
    from pipeline.io.labels_io import read_detections
    from pipeline.stages.parse_captions import ParseCaptionsConfig, run_parse_captions
    from tests.pseudo_fixtures import tiny_teacher

    monkeypatch.setenv("GLIP_CACHE_DIR", str(tmp_path / "cache"))
    samples = coco_samples(shared_data, 5)
    local = tmp_path / "local"
    (local / "web").mkdir(parents=True)
    write_shard(local / "web/00000.tar", [(k, "jpg", d, c) for k, d, c in samples])
    s3.put(str(local / "web/00000.tar"), "engine/web/00000.tar")
    teacher = tiny_teacher(tmp_path / "teacher.pth")
    s3.put(str(teacher), "engine/models/teacher.pth")

    settings = ExtractorSettings()
    flags = ["--min-size", "128", "--max-size", "192", "--batch-size", "2", "--workers", "1", "--preset", "owlst"]
    try:
        run_parse_captions(ParseCaptionsConfig(inputs=("s3://engine/web",), out="s3://engine/phrases", settings=settings, workers=1))
        run_parse_captions(ParseCaptionsConfig(inputs=(str(local / "web"),), out=str(local / "phrases"), settings=settings, workers=1))
        remote = CliRunner().invoke(app, ["pseudo-label", "s3://engine/web", "--phrases", "s3://engine/phrases",
                                          "--teacher", "s3://engine/models/teacher.pth", "--out", "s3://engine/labelled", *flags])
        assert remote.exit_code == 0, remote.output
        here = CliRunner().invoke(app, ["pseudo-label", str(local / "web"), "--phrases", str(local / "phrases"),
                                        "--teacher", str(teacher), "--out", str(local / "labelled"), *flags])
        assert here.exit_code == 0, here.output
    finally:
        shutdown_ray(ray.is_initialized())  # restores RAY_TMPDIR and removes the temp root, as a verb does
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1 and cached[0].read_bytes() == teacher.read_bytes()
    got, metadata = read_detections("s3://engine/labelled/detections/00000.parquet")
    want, _ = read_detections(str(local / "labelled/detections/00000.parquet"))
    assert [r.key for r in got] == [k for k, _, _ in samples]
    assert got == want and sum(len(r.boxes) for r in got) > 0
    assert json.loads(metadata["teacher"])["checkpoint"] == "teacher.pth"
    assert s3.exists("engine/labelled/pseudo/00000.tar")

    missing = CliRunner().invoke(app, ["pseudo-label", "s3://engine/web", "--phrases", "s3://engine/phrases",
                                       "--teacher", "s3://engine/models/nope.pth", "--out", "s3://engine/x", *flags])
    assert missing.exit_code != 0 and "s3://engine/models/nope.pth" in missing.output


def test_train_student_reads_and_writes_s3(s3, tmp_path, shared_data, monkeypatch):
    """train-student with its COCO JSON on S3 and `--out s3://...`: Ray Train's checkpoints,
    the run's files and the final student land on S3; the student loads (via the local cache)
    and `--init s3://...` starts a new run from it."""
    import torch

    from model.weights.checkpoint import load_glip
    from pipeline.io import storage
    from pipeline.report.training import read_scalars
    from pipeline.train.config import CheckpointPolicy, DataConfig, Resources, StudentModel, TrainConfig
    from pipeline.train.data import AugmentSettings, SourceSpec
    from pipeline.train.loop import build_student
    from pipeline.train.driver import run_training

    monkeypatch.setenv("GLIP_CACHE_DIR", str(tmp_path / "cache"))
    coco = json.loads((shared_data / "coco_mini/annotations/instances_train2017_subset.json").read_text())
    keep = [image for image in coco["images"]][:2]
    ids = {image["id"] for image in keep}
    subset = {**coco, "images": keep, "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]}
    s3.pipe("engine/gold/instances.json", json.dumps(subset).encode())
    source = SourceSpec(kind="coco", paths=("s3://engine/gold/instances.json",), images=str(shared_data / "coco_mini/train2017"))
    config = TrainConfig(
        out="s3://engine/student", steps=2, log_every=1,
        model=StudentModel(variant="tiny-cpu", init_text="minilm", freeze_text=True),
        data=DataConfig(sources=(source,), batch_size=1, augment=AugmentSettings(min_sizes=(128,), max_size=160)),
        resources=Resources(cpus_per_worker=1), checkpoints=CheckpointPolicy(every=1),
    )
    outcome = run_training(config)
    assert outcome.student == "s3://engine/student/student.pth"
    names = {path.rsplit("/", 1)[-1] for path in s3.ls("engine/student")}
    assert {"student.pth", "_stats.json", "train_config.json", "ray", "tensorboard"} <= names
    # The curves: rank 0's event files, staged locally and copied to OUT/tensorboard/, read back
    # from the object store by TensorBoard's own reader (what `pipeline report` shows).
    scalars, source = read_scalars("s3://engine/student")
    assert source == "TensorBoard event files"
    assert {"loss/total", "loss/reg", "loss/centerness", "loss/dot_product_token", "lr/model", "train/grad_norm"} <= set(scalars)
    assert [step for step, _ in scalars["loss/total"]] == [1, 2]  # rank 0 only: one point per step
    assert all(0 < value < float("inf") for _, value in scalars["loss/total"])
    model, _ = load_glip(storage.local_copy(outcome.student))
    assert model.config.name == "tiny-cpu"
    again = build_student(StudentModel(variant="tiny-cpu", init=outcome.student), seed=0)
    trained = model.state_dict()
    assert all(torch.equal(value, trained[key]) for key, value in again.state_dict().items())
