"""Input shards: discovery, shard ids, and reading samples from WebDataset tars and Parquet.

Two input kinds, as img2dataset writes them:

* WebDataset tar (`.tar`, `.tar.gz`, `.tgz`): members `{key}.{ext}` grouped by key the
  webdataset way (the key is the member path up to the first "." of its base name;
  consecutive members with the same key form one sample), read with the standard library's
  `tarfile` in streaming mode (only the wanted members are loaded into memory). Every other
  member is ignored and counted by kind in a `MemberTally` (`symlink`, `hardlink`,
  `directory`, `device`, `fifo`, `metadata` for `__*__` members, `no_extension`): links are
  never followed, and members + ignored add up to the tar's member count. The caption is `{key}.txt`; when a sample has no `.txt`, the
  `"caption"` field of `{key}.json` is used (img2dataset writes it there too).
* Parquet with a key column and a caption column (defaults `key`, `caption`; the web
  alt-text file of ../shared/data uses `TEXT` and has no key). With no key column (or a null
  key) the key is `{shard}_{row:09d}`, stable across runs as long as the file is unchanged.

Shard id = base name without the extension; a stage writes `{out}/{shard}.{ext}`. A broken
or truncated tar raises `ShardReadError` naming the file and what broke; stages record it
for that shard and go on with the others.
"""

from __future__ import annotations

import gzip
import json
import posixpath
import re
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from pipeline.io import storage

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PARQUET_SUFFIXES = (".parquet",)
SHARD_SUFFIXES = TAR_SUFFIXES + PARQUET_SUFFIXES


class ShardReadError(RuntimeError):
    """A shard that cannot be read (truncated tar, missing column, not a Parquet file)."""


@dataclass(frozen=True, kw_only=True)
class ShardSource:
    """One input shard: where it is, its id (output base name) and its kind ("webdataset"/"parquet")."""

    uri: str
    shard_id: str
    kind: str


@dataclass(frozen=True, kw_only=True)
class CaptionColumns:
    """Parquet column names of the caption and the key.

    `key=None`: the column "key" when the file has one, else keys derived from row numbers.
    A named key column must exist.
    """

    caption: str = "caption"
    key: str | None = None


@dataclass(kw_only=True)
class MemberTally:
    """What a tar held: `members` in all, and the ones that are no sample part, by kind."""

    members: int = 0
    ignored: dict[str, int] = field(default_factory=dict)

    def ignore(self, kind: str) -> None:
        self.ignored[kind] = self.ignored.get(kind, 0) + 1


@dataclass(frozen=True, kw_only=True)
class CaptionRecord:
    """One sample's key and raw caption value (str, bytes from a tar, None, or whatever the column held)."""

    key: str
    caption: object


def shard_id_of(uri: str) -> str:
    """Base name without the shard extension: ".../00042.tar" -> "00042"."""
    name = storage.basename(uri)
    for suffix in sorted(SHARD_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name.rsplit(".", 1)[0]


def discover_shards(inputs: Sequence[str]) -> list[ShardSource]:
    """Every shard named by `inputs` (files, globs or folders), in sorted order.

    Raises FileNotFoundError for an input that matches nothing, and ValueError when two
    inputs would write the same output (same shard id from different files).
    """
    shards = []
    seen: dict[str, str] = {}
    try:
        uris = storage.expand_inputs(inputs, suffixes=SHARD_SUFFIXES)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{error}{_pack_hint(inputs)}") from None
    for uri in uris:
        shard_id = shard_id_of(uri)
        if shard_id in seen:
            raise ValueError(f"two input shards have the same id {shard_id!r}: {seen[shard_id]} and {uri}")
        seen[shard_id] = uri
        kind = "parquet" if uri.endswith(PARQUET_SUFFIXES) else "webdataset"
        shards.append(ShardSource(uri=uri, shard_id=shard_id, kind=kind))
    return shards


def _pack_hint(inputs: Sequence[str]) -> str:
    """What to do with a folder of images given where shards are expected."""
    from pipeline.io.images import IMAGE_EXTENSIONS

    for item in inputs:
        if storage.is_dir(item) and any(
            name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS for name in storage.list_names(item)
        ):
            return f": pack images with `pipeline pack {item} --out SHARDS`"
    return ""


def read_caption_records(
    shard: ShardSource, *, columns: CaptionColumns | None = None, tally: MemberTally | None = None
) -> list[CaptionRecord]:
    """All (key, raw caption) records of a shard, in shard order. Raises ShardReadError.

    `tally` (tars only) receives the member count and the ignored members by kind.
    """
    columns = columns or CaptionColumns()
    if shard.kind == "parquet":
        return _parquet_captions(shard, columns)
    records = []
    for sample in iter_webdataset_samples(shard.uri, extensions=("txt", "json"), tally=tally):
        caption: object = sample.get("txt")
        if caption is None and "json" in sample:
            caption = _json_caption(sample["json"])
        records.append(CaptionRecord(key=str(sample["__key__"]), caption=caption))
    return records


def iter_webdataset_samples(
    uri: str, *, extensions: Sequence[str] | None = None, tally: MemberTally | None = None
) -> Iterator[dict[str, object]]:
    """Samples of a WebDataset tar as dicts: `"__key__"` plus one bytes value per extension.

    `extensions` limits which members are read into memory (e.g. ("txt", "json") to skip
    images); every sample is still yielded, with at least its key. `tally` counts every member
    and the ignored ones by kind. Raises ShardReadError on a corrupt or truncated archive.
    """
    wanted = None if extensions is None else set(extensions)
    tally = tally if tally is not None else MemberTally()

    def want(name: str) -> bool:
        return wanted is None or _split_member_name(name)[1] in wanted

    for key, members in _grouped_members(uri, want=want, tally=tally):
        if key is None:
            for member, _ in members:
                tally.ignore("no_extension" if _split_member_name(member.name)[0] is None else "metadata")
            continue
        sample: dict[str, object] = {"__key__": key}
        for member, data in members:
            if data is not None:
                sample[_split_member_name(member.name)[1]] = data
        yield sample


def iter_webdataset_members(uri: str) -> Iterator[tuple[str | None, list[tuple[tarfile.TarInfo, bytes]]]]:
    """(key, members) per sample of a WebDataset tar, each member as stored: its `TarInfo` and
    bytes, for copying samples into another tar unchanged. Members that belong to no sample
    (no extension, `__*__` metadata) come after the sample they follow, as a group with key
    None. Raises ShardReadError on a corrupt or truncated archive."""
    yield from _grouped_members(uri, want=lambda name: True, tally=MemberTally())  # type: ignore[misc]


def _grouped_members(
    uri: str, *, want, tally: MemberTally
) -> Iterator[tuple[str | None, list[tuple[tarfile.TarInfo, bytes | None]]]]:
    """Members grouped the webdataset way: consecutive members with the same key form a sample."""
    try:
        with storage.open_read(uri) as handle:
            key: str | None = None
            members: list[tuple[tarfile.TarInfo, bytes | None]] = []
            loose: list[tuple[tarfile.TarInfo, bytes | None]] = []
            for member, data in _iter_tar_files(handle, want=want, tally=tally):
                prefix, _ = _split_member_name(member.name)
                if prefix is None or _is_meta_member(member.name):
                    loose.append((member, data))
                    continue
                if prefix != key:
                    if key is not None:
                        yield key, members
                    if loose:
                        yield None, loose
                    key, members, loose = prefix, [], []
                members.append((member, data))
            if key is not None:
                yield key, members
            if loose:
                yield None, loose
    except (tarfile.TarError, EOFError, OSError, gzip.BadGzipFile, zlib.error) as error:
        raise ShardReadError(f"{uri}: broken or truncated tar ({type(error).__name__}: {error})") from error


def _iter_tar_files(handle, *, want, tally: MemberTally) -> Iterator[tuple[tarfile.TarInfo, bytes | None]]:
    """(member, its bytes or None when `want(path)` is False) per regular file, in order.

    Streaming mode ("r|*") reads the archive once, front to back, gzip or not; links,
    directories and devices are skipped (never followed) and counted in `tally`. A member cut
    short raises `tarfile.ReadError`. tarfile reads a plain tar cut inside or just before a
    header as a shorter archive, so the end-of-archive marker (two zero blocks after the
    last member) is checked here: without it the shard was truncated (a truncated gzip
    already fails its own end-of-stream check).
    """
    gzipped = handle.read(2) == b"\x1f\x8b"
    handle.seek(0)
    with tarfile.open(fileobj=handle, mode="r|*") as archive:
        for member in archive:
            tally.members += 1
            if not member.isfile():
                tally.ignore(_member_kind(member))
                continue
            if not want(member.name):
                yield member, None
                continue
            data = archive.extractfile(member).read()  # type: ignore[union-attr]
            if len(data) != member.size:
                raise tarfile.ReadError(f"member {member.name!r} cut short ({len(data)} of {member.size} bytes)")
            yield member, data
        end_of_members = archive.offset
    if not gzipped and handle.seek(0, 2) - end_of_members < 2 * tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"no end-of-archive marker after byte {end_of_members}: the tar was cut short")


def _member_kind(member: tarfile.TarInfo) -> str:
    """The kind of a tar member that is not a regular file."""
    if member.issym():
        return "symlink"
    if member.islnk():
        return "hardlink"
    if member.isdir():
        return "directory"
    if member.ischr() or member.isblk():
        return "device"
    if member.isfifo():
        return "fifo"
    return "other"


def unsafe_key_reason(key: str) -> str | None:
    """Why a sample key is not a safe relative name (absolute, or a ".." step), else None.

    Tar readers that extract members would write such a sample outside their folder; no stage
    does, but the key flows into outputs and other tools, so the first stage rejects it.
    """
    if key.startswith(("/", "\\")) or re.match(r"[A-Za-z]:[/\\]", key):
        return f"bad_key: {key!r} is an absolute path"
    if ".." in key.replace("\\", "/").split("/"):
        return f"bad_key: {key!r} climbs out of its folder ('..')"
    return None


def member_extension(name: str) -> str:
    """A tar member's sample extension, the webdataset way: "a/b.seg.png" -> "seg.png"."""
    return _split_member_name(name)[1]


def _split_member_name(name: str) -> tuple[str | None, str]:
    """webdataset's key/extension split: key up to the first "." of the base name."""
    folder, base = posixpath.split(name)
    if "." not in base:
        return None, ""
    stem, extension = base.split(".", 1)
    return posixpath.join(folder, stem) if folder else stem, extension.lower()


def _is_meta_member(name: str) -> bool:
    base = posixpath.basename(name)
    return base.startswith("__") and base.split(".", 1)[0].endswith("__")


def _json_caption(data: object) -> object:
    try:
        value = json.loads(data)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value.get("caption") if isinstance(value, dict) else None


def _parquet_captions(shard: ShardSource, columns: CaptionColumns) -> list[CaptionRecord]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with storage.open_read(shard.uri) as handle:
            parquet = pq.ParquetFile(handle)
            names = parquet.schema_arrow.names
            if columns.caption not in names:
                raise ShardReadError(
                    f"{shard.uri}: no caption column {columns.caption!r} (columns: {', '.join(names)}); "
                    "name it with --caption-column"
                )
            if columns.key is not None and columns.key not in names:
                raise ShardReadError(f"{shard.uri}: no key column {columns.key!r} (columns: {', '.join(names)})")
            key_column = columns.key or ("key" if "key" in names else None)
            wanted = [columns.caption] + ([key_column] if key_column else [])
            table = parquet.read(columns=wanted)
    except (pa.ArrowException, OSError) as error:
        raise ShardReadError(f"{shard.uri}: not a readable Parquet file ({type(error).__name__}: {error})") from error
    captions = table.column(columns.caption).to_pylist()
    if key_column is not None:
        keys = [None if key is None else str(key) for key in table.column(key_column).to_pylist()]
    else:
        keys = [None] * len(captions)
    return [
        CaptionRecord(key=key if key is not None else f"{shard.shard_id}_{row:09d}", caption=caption)
        for row, (key, caption) in enumerate(zip(keys, captions))
    ]
