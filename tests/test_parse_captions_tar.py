"""Reading WebDataset tars: real archives written by tarfile, odd names, gzip, broken files."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import pytest

from pipeline.io.shards import ShardReadError, iter_webdataset_samples


def build(members: list[tuple[str, bytes | None]], *, format: int = tarfile.PAX_FORMAT) -> bytes:
    """A tar of `members` (None data = a directory) plus a symlink, written by tarfile."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=format) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
                continue
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link.txt")
        link.type = tarfile.SYMTYPE
        link.linkname = members[0][0]
        archive.addfile(link)
    return buffer.getvalue()


MEMBERS = [
    ("000000001.jpg", bytes(range(256)) * 40),
    ("000000001.txt", "A dog on a café terrace".encode()),
    ("000000001.json", b'{"key": "000000001"}'),
    ("folder", None),
    ("folder/000000002.txt", b"a cat"),
    ("d" * 150 + "/long_name_" + "x" * 120 + ".txt", b"long path"),  # > 100 chars: PAX or GNU long name
    ("caf\u00e9/\u00e9t\u00e9.txt", b"unicode path"),
]


def _write(tmp_path: Path, data: bytes, name: str = "shard.tar") -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_samples_grouped_by_key_with_long_and_unicode_names(tmp_path, fmt) -> None:
    samples = list(iter_webdataset_samples(_write(tmp_path, build(MEMBERS, format=fmt))))
    by_key = {s["__key__"]: s for s in samples}
    assert by_key["000000001"]["txt"] == "A dog on a café terrace".encode()
    assert by_key["000000001"]["jpg"] == bytes(range(256)) * 40
    assert by_key["folder/000000002"]["txt"] == b"a cat"
    assert by_key["d" * 150 + "/long_name_" + "x" * 120]["txt"] == b"long path"
    assert by_key["caf\u00e9/\u00e9t\u00e9"]["txt"] == b"unicode path"
    assert "link" not in by_key  # symlinks are not samples


def test_only_wanted_extensions_are_loaded(tmp_path) -> None:
    samples = list(iter_webdataset_samples(_write(tmp_path, build(MEMBERS[:3])), extensions=("txt",)))
    assert samples == [{"__key__": "000000001", "txt": "A dog on a café terrace".encode()}]


def test_gzipped_shard(tmp_path) -> None:
    samples = list(iter_webdataset_samples(_write(tmp_path, gzip.compress(build(MEMBERS[:3])), "shard.tar.gz")))
    assert [s["__key__"] for s in samples] == ["000000001"]


@pytest.mark.parametrize("cut", ["mid_member", "mid_header"])
def test_truncated_archives_are_errors_naming_the_file(tmp_path, cut: str) -> None:
    data = build(MEMBERS[:3])
    broken = data[: data.index(b'{"key"') + 5] if cut == "mid_member" else data[: 512 + 10240 + 100]
    uri = _write(tmp_path, broken)
    with pytest.raises(ShardReadError, match="shard.tar"):
        list(iter_webdataset_samples(uri))


def test_junk_is_not_a_tar(tmp_path) -> None:
    with pytest.raises(ShardReadError, match="junk.tar"):
        list(iter_webdataset_samples(_write(tmp_path, b"PK\x03\x04 a zip file, not a tar " * 40, "junk.tar")))


def test_archive_cut_at_a_member_boundary_is_an_error(tmp_path) -> None:
    """A writer that died between two members leaves no end-of-archive marker."""
    data = build(MEMBERS[:3], format=tarfile.GNU_FORMAT)
    boundary = 512 + 10240 + 512 + 512  # header + jpg, header + txt (one block)
    with pytest.raises(ShardReadError, match="cut short"):
        list(iter_webdataset_samples(_write(tmp_path, data[:boundary])))
