"""The filesystem layer on local paths: input expansion, atomic writes, temporaries."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from pipeline.io import storage


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_resolve_makes_local_paths_absolute_and_keeps_uris(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    location = storage.resolve("runs/phrases")
    assert location.is_local and location.uri == str(tmp_path / "runs" / "phrases")
    assert storage.join("s3://bucket/out", "a.parquet") == "s3://bucket/out/a.parquet"
    assert storage.join(str(tmp_path), "a.parquet") == str(tmp_path / "a.parquet")
    assert storage.basename("s3://bucket/out/00001.tar") == "00001.tar"
    with pytest.raises(ValueError):
        storage.resolve("")


def test_a_uri_without_its_filesystem_package_names_the_uri() -> None:
    import importlib.util

    from fsspec.registry import known_implementations

    # A protocol fsspec knows whose package is not installed here (adlfs, ocifs, ... abound).
    missing = next(
        protocol for protocol, spec in sorted(known_implementations.items())
        if importlib.util.find_spec(spec["class"].split(".", 1)[0]) is None
    )
    expected = re.escape(f"{missing}://container/shards: no filesystem for {missing}:// is installed")
    with pytest.raises(ImportError, match=expected):
        storage.resolve(f"{missing}://container/shards")


def test_expand_inputs_takes_files_globs_and_folders(tmp_path: Path) -> None:
    a = touch(tmp_path / "shards" / "00000.tar")
    b = touch(tmp_path / "shards" / "00001.tar")
    c = touch(tmp_path / "more" / "web.parquet")
    touch(tmp_path / "shards" / "notes.txt")
    touch(tmp_path / "shards" / ".00002.tar.tmp-0123abcd")  # a killed writer's leftover
    found = storage.expand_inputs(
        [str(tmp_path / "shards"), str(tmp_path / "more" / "*.parquet"), str(a)], suffixes=(".tar", ".parquet")
    )
    assert found == [str(a), str(b), str(c)]  # sorted per input, duplicates once


@pytest.mark.parametrize("missing", ["nowhere/00000.tar", "empty_folder", "shards/*.parquet"])
def test_expand_inputs_names_what_is_missing(tmp_path: Path, missing: str) -> None:
    (tmp_path / "empty_folder").mkdir()
    touch(tmp_path / "shards" / "00000.tar")
    with pytest.raises(FileNotFoundError, match=missing.split("/")[0]):
        storage.expand_inputs([str(tmp_path / missing)], suffixes=(".tar", ".parquet"))


def test_write_atomic_replaces_whole_files_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = str(tmp_path / "out" / "00000.parquet")
    storage.write_atomic(target, b"first")
    storage.write_atomic(target, b"second version")
    assert storage.read_bytes(target) == b"second version"
    assert storage.exists(target) and storage.is_dir(str(tmp_path / "out"))
    assert storage.list_names(str(tmp_path / "out")) == ["00000.parquet"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = str(tmp_path / "00000.tar")
    storage.write_atomic(target, b"complete")
    with pytest.raises(RuntimeError, match="worker died"):
        with storage.atomic_writer(target) as handle:
            handle.write(b"half of a new ")
            names_during = os.listdir(tmp_path)
            raise RuntimeError("worker died")
    assert any(storage.is_temporary_name(name) for name in names_during)  # the new bytes went elsewhere
    assert storage.read_bytes(target) == b"complete"
    assert os.listdir(tmp_path) == ["00000.tar"]


def test_temporary_names_are_recognised(tmp_path: Path) -> None:
    name = storage.temporary_name("00007.parquet")
    assert storage.is_temporary_name(name) and not storage.is_temporary_name("00007.parquet")
    assert storage.temporary_final_name(name) == "00007.parquet"
    assert storage.list_names(str(tmp_path / "absent")) == []
    touch(tmp_path / name)
    storage.remove(str(tmp_path / name))
    assert not storage.exists(str(tmp_path / name))


def test_open_read_streams_bytes(tmp_path: Path) -> None:
    path = touch(tmp_path / "blob.bin", bytes(range(256)) * 10)
    with storage.open_read(str(path)) as handle:
        assert handle.read(3) == b"\x00\x01\x02"
    storage.makedirs(str(tmp_path / "deep" / "er"))
    assert storage.is_dir(str(tmp_path / "deep" / "er"))
