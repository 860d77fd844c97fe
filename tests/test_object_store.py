"""Stages on object storage: parse-captions reads shards from and writes phrases to an
S3-compatible server (moto's server mode on 127.0.0.1, started here), resumes there, and
leaves no partial object under a final name."""

from __future__ import annotations

import json
import socket

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


def test_parse_captions_s3_to_s3_with_resume(s3, tmp_path, shared_data):
    import ray

    from nlp.phrases import ExtractorSettings
    from pipeline.parse_captions import ParseCaptionsConfig, run_parse_captions
    from pipeline.phrases_file import read_phrases_file

    samples = coco_samples(shared_data, 10)
    for shard, chunk in (("00000", samples[:6]), ("00001", samples[6:])):
        write_shard(tmp_path / f"{shard}.tar", [(k, "jpg", d, c) for k, d, c in chunk])
        s3.put(str(tmp_path / f"{shard}.tar"), f"engine/web/{shard}.tar")
    config = ParseCaptionsConfig(inputs=("s3://engine/web",), out="s3://engine/phrases", settings=ExtractorSettings(), workers=1)
    assert not ray.is_initialized()
    stats = run_parse_captions(config)
    assert stats["samples"] == 10 and stats["shards"]["written"] == 2 and stats["shards"]["failed"] == 0
    names = sorted(path.rsplit("/", 1)[-1] for path in s3.ls("engine/phrases"))
    assert names == ["00000.parquet", "00001.parquet", "_stats.json"]  # no temporaries left
    table = read_phrases_file("s3://engine/phrases/00000.parquet")
    assert table.column("key").to_pylist() == [k for k, _, _ in samples[:6]]
    assert all(row for row in table.column("phrases").to_pylist())

    s3.rm("engine/phrases/00001.parquet")  # as if the run had died before this shard finished
    again = run_parse_captions(config)
    assert again["shards"]["written"] == 1 and again["shards"]["already_done"] == 1 and again["samples"] == 10
    assert json.loads(s3.cat("engine/phrases/_stats.json"))["shards"]["already_done"] == 1
