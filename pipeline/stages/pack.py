"""`pipeline pack`: your own images and captions -> img2dataset-style WebDataset shards.

Inputs (files or folders, local or s3:// gs://, taken in sorted order):
* a folder of images (searched recursively, files ordered by path), captions from a sidecar
  `{name}.txt` beside each image or from a COCO captions JSON (`--coco-captions`: the first
  caption of each image by annotation id, matched on `file_name`);
* a table (`.csv`, `.jsonl`, `.parquet`): one row per image, in row order; the image column
  holds a path (relative to the table's folder, or absolute) or, in Parquet, the image bytes
  (img2dataset's Parquet layout: `jpg`); captions from `--caption-column` (default: `caption`,
  else `TEXT`), a sidecar `.txt` or `--coco-captions`.

Output: `OUT/{shard:05d}.tar` with `--samples-per-shard` inputs each, members `{key}.{ext}`
(the source bytes, never re-encoded), `{key}.txt` (the caption) and `{key}.json` (key, caption,
source path or table row, and the table's own key if it had one). The key is img2dataset's:
shard number and position in the shard (`000030004` = 5th input of shard 3), so the same inputs
give the same keys, and an input that is skipped leaves a gap instead of renumbering the rest.
`--keys name` keeps each image's file name stem (or the table's `key`) instead, so gold
annotations that name the files (COCO ids, file names) match the shard keys; names must be
unique and hold no "." (webdataset splits the key from the extension at the first ".").
Each tar is written atomically; `OUT/_stats.json` (written last) counts the inputs, the samples
written and the skips by reason with examples: the image checks of every stage
(`pipeline.io.images`: `not_an_image`, `truncated`, `too_small`, `too_large`), `unreadable_file`,
`missing_caption` and `empty_caption`.
"""

from __future__ import annotations

import json
import math
import posixpath
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional

import typer

from pipeline.io import storage
from pipeline.io.images import IMAGE_EXTENSIONS, ImageDecodeError, decode_gray_small
from pipeline.io.shard_report import MAX_EXAMPLE_KEYS
from pipeline.io.stage_stats import utc_now, write_stats
from pipeline.user_errors import user_errors

STAGE = "pack"
TABLE_SUFFIXES = (".csv", ".jsonl", ".parquet")
IMAGE_COLUMNS = ("jpg", "image", "path", "filepath", "file_name", "filename")  # tried in this order
CAPTION_COLUMNS = ("caption", "TEXT", "text")
_FORMAT_EXTENSION = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tif"}


@dataclass(frozen=True, kw_only=True)
class PackConfig:
    """One pack run; the CLI flags map onto it in `pack_command`."""

    inputs: tuple[str, ...]
    out: str
    coco_captions: str | None = None
    image_column: str | None = None  # None: the first of IMAGE_COLUMNS the table has
    caption_column: str | None = None  # None: the first of CAPTION_COLUMNS the table has
    samples_per_shard: int = 10_000
    keys: str = "position"  # or "name": the file name stem / the table's key
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.keys not in ("position", "name"):
            raise ValueError(f"--keys {self.keys!r}: choose position or name")
        if self.samples_per_shard < 1:
            raise ValueError(f"--samples-per-shard {self.samples_per_shard}: must be at least 1")


@dataclass(frozen=True, kw_only=True)
class PackInput:
    """One input image before checks: where it comes from, how to read it, its caption if known."""

    source: str  # a path or URI, or "table.parquet#row 12"
    read: Callable[[], bytes]
    caption: object = None  # None: look for a sidecar .txt or the COCO captions
    sidecar: str | None = None  # "{image path without extension}.txt"
    file_name: str | None = None  # for --coco-captions
    source_key: str | None = None


@dataclass
class _Tally:
    inputs: int = 0
    written: int = 0
    shards: int = 0
    skipped: dict[str, dict] = field(default_factory=dict)

    def skip(self, reason: str, source: str) -> None:
        entry = self.skipped.setdefault(reason, {"count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < MAX_EXAMPLE_KEYS:
            entry["examples"].append(source)


def run_pack(config: PackConfig) -> dict[str, object]:
    """Pack every input; returns the `_stats.json` dict. Bad inputs or options raise
    FileNotFoundError / ValueError (one line) before any shard is written."""
    coco = _coco_first_captions(config.coco_captions) if config.coco_captions else None
    sources = [_input_items(uri, config) for uri in sorted(config.inputs)]
    names = _name_keys([item for items in sources for item in items]) if config.keys == "name" else None
    storage.ensure_writable_folder(config.out)
    existing = [n for n in storage.list_names(config.out) if n.endswith(".tar") and not storage.is_temporary_name(n)]
    if existing and not config.overwrite:
        raise ValueError(f"--out {config.out} already holds {len(existing)} .tar shard(s): pass --overwrite to replace them")
    started, started_at = time.perf_counter(), utc_now()
    tally = _Tally()
    digits = max(1, math.ceil(math.log10(config.samples_per_shard)))  # img2dataset's key width
    shard, writer = -1, None
    try:
        for index, item in enumerate(item for items in sources for item in items):
            tally.inputs += 1
            sample = _checked_sample(item, coco, tally)
            if sample is None:
                continue
            if index // config.samples_per_shard != shard:
                _close(writer)
                shard = index // config.samples_per_shard
                writer = _ShardWriter(storage.join(config.out, f"{shard:05d}.tar"))
                tally.shards += 1
            key = names[index] if names else f"{shard:05d}{index % config.samples_per_shard:0{digits}d}"
            ext, data, caption = sample
            record = {"key": key, "caption": caption, "source": item.source}
            if item.source_key is not None:
                record["source_key"] = item.source_key
            writer.write({"__key__": key, ext: data, "txt": caption.encode("utf-8"),
                          "json": json.dumps(record, ensure_ascii=False, sort_keys=True).encode("utf-8")})
            tally.written += 1
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    _close(writer)
    seconds = round(time.perf_counter() - started, 3)
    stats: dict[str, object] = {
        "stage": STAGE,
        "inputs": list(config.inputs),
        "out": config.out,
        "started_at": started_at,
        "finished_at": utc_now(),
        "shards": {"total": tally.shards, "written": tally.shards, "already_done": 0, "failed": 0, "failed_shards": {}},
        "samples": tally.inputs,
        "written": tally.written,
        "skipped": tally.skipped,
        "throughput": {"seconds": seconds, "samples_per_s": round(tally.inputs / seconds, 2) if seconds else 0.0},
        "settings": {"samples_per_shard": config.samples_per_shard, "keys": config.keys, "coco_captions": config.coco_captions,
                     "image_column": config.image_column, "caption_column": config.caption_column},
    }
    write_stats(config.out, stats)
    return stats


def _name_keys(items: list[PackInput]) -> list[str]:
    """`--keys name`: each input's table key or file name stem, checked unique and webdataset-safe."""
    from pipeline.io.shards import unsafe_key_reason

    keys, seen = [], {}
    for item in items:
        key = item.source_key or posixpath.splitext(item.file_name or "")[0]
        if not key or "." in key or unsafe_key_reason(key):
            raise ValueError(f"--keys name: {item.source}: {key!r} cannot be a key (empty, a '.' or a path); use --keys position")
        if key in seen:
            raise ValueError(f"--keys name: {seen[key]} and {item.source} have the same name {key!r}; use --keys position")
        seen[key] = item.source
        keys.append(key)
    return keys


class _ShardWriter:
    """One output tar, written through `storage.atomic_writer`: it appears only when closed."""

    def __init__(self, uri: str) -> None:
        import webdataset

        self._context = storage.atomic_writer(uri)
        handle = self._context.__enter__()
        # mtime 0 and fixed owners: the same inputs give byte-identical tars
        self._tar = webdataset.TarWriter(handle, encoder=False, mtime=0, mode=0o644, user="", group="")

    def write(self, sample: dict) -> None:
        self._tar.write(sample)

    def close(self) -> None:
        self._tar.close()
        self._context.__exit__(None, None, None)

    def abort(self) -> None:
        error = RuntimeError("pack interrupted")
        self._context.__exit__(type(error), error, None)


def _close(writer: _ShardWriter | None) -> None:
    if writer is not None:
        writer.close()


def _checked_sample(item: PackInput, coco: dict[str, str] | None, tally: _Tally) -> tuple[str, bytes, str] | None:
    """(extension, source bytes, caption) of an input that passes the checks, else None (counted)."""
    caption = _caption_of(item, coco)
    if caption is None:
        tally.skip("missing_caption", item.source)
        return None
    if not caption.strip():
        tally.skip("empty_caption", item.source)
        return None
    try:
        data = item.read()
    except (OSError, ValueError) as error:
        tally.skip("unreadable_file", f"{item.source} ({type(error).__name__})")
        return None
    try:
        # A reduced decode reads the whole stream, so it finds the truncated JPEGs that
        # PIL's verify() lets through, at a fraction of a full decode's cost.
        decode_gray_small(data, side=32)
    except ImageDecodeError as error:
        tally.skip(error.reason, item.source)
        return None
    ext = _FORMAT_EXTENSION.get(_image_format(data)) or _extension_of(item.source)
    return ext, data, caption.strip()


def _image_format(data: bytes) -> str:
    """PIL's name of the format (JPEG, PNG, ...), from the header only."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image.format or ""


def _caption_of(item: PackInput, coco: dict[str, str] | None) -> str | None:
    if item.caption is not None:
        return item.caption if isinstance(item.caption, str) else str(item.caption)
    if coco is not None and item.file_name is not None:
        return coco.get(item.file_name)
    if item.sidecar is not None and storage.exists(item.sidecar):
        return storage.read_bytes(item.sidecar).decode("utf-8", errors="replace")
    return None


def _extension_of(source: str) -> str:
    ext = posixpath.splitext(source.split("#", 1)[0])[1].lstrip(".").lower()
    return ext if ext in IMAGE_EXTENSIONS else "jpg"


def _input_items(uri: str, config: PackConfig) -> list[PackInput]:
    """The inputs of one command-line input (a folder of images or a table), in order."""
    location = storage.resolve(uri)
    if location.fs.isdir(location.path):
        return _folder_items(uri)
    if not location.fs.isfile(location.path):
        raise FileNotFoundError(f"{uri}: input not found")
    if uri.lower().endswith(TABLE_SUFFIXES):
        return _table_items(uri, config)
    raise ValueError(f"{uri}: not a folder of images nor a table ({', '.join(TABLE_SUFFIXES)})")


def _folder_items(folder: str) -> list[PackInput]:
    location = storage.resolve(folder)
    fs = location.fs
    paths = sorted(p for p in fs.find(location.path) if _extension_of_name(p) in IMAGE_EXTENSIONS)
    if not paths:
        raise FileNotFoundError(f"folder {folder} holds no image files ({'/'.join(IMAGE_EXTENSIONS)})")
    items = []
    for path in paths:
        uri = path if location.is_local else fs.unstrip_protocol(path)
        items.append(PackInput(source=uri, read=_reader(uri), sidecar=posixpath.splitext(uri)[0] + ".txt",
                               file_name=posixpath.basename(path)))
    return items


def _extension_of_name(path: str) -> str:
    return posixpath.splitext(path)[1].lstrip(".").lower()


def _reader(uri: str) -> Callable[[], bytes]:
    return lambda: storage.read_bytes(uri)


def _table_items(uri: str, config: PackConfig) -> list[PackInput]:
    table = _read_table(uri)
    names = table.column_names
    image_column = _pick_column(uri, names, config.image_column, IMAGE_COLUMNS, option="--image-column")
    caption_column = config.caption_column or next((c for c in CAPTION_COLUMNS if c in names), None)
    if config.caption_column and config.caption_column not in names:
        raise ValueError(f"{uri}: no caption column {config.caption_column!r} (columns: {', '.join(names)})")
    import pyarrow as pa

    holds_bytes = pa.types.is_binary(table.schema.field(image_column).type) or pa.types.is_large_binary(
        table.schema.field(image_column).type)
    images = table.column(image_column).to_pylist()
    captions = table.column(caption_column).to_pylist() if caption_column else [None] * len(images)
    keys = [None if k is None else str(k) for k in table.column("key").to_pylist()] if "key" in names else [None] * len(images)
    folder = posixpath.dirname(storage.resolve(uri).uri)
    items = []
    for row, (image, caption, key) in enumerate(zip(images, captions, keys)):
        if holds_bytes:
            source = f"{uri}#row {row}"
            items.append(PackInput(source=source, read=_constant(image), caption=caption, source_key=key))
            continue
        if image is None:
            raise ValueError(f"{uri}: row {row}: no image path in column {image_column!r}")
        path = str(image) if "://" in str(image) or str(image).startswith("/") else storage.join(folder, str(image))
        items.append(PackInput(source=path, read=_reader(path), caption=caption, source_key=key,
                               sidecar=posixpath.splitext(path)[0] + ".txt", file_name=posixpath.basename(path)))
    return items


def _constant(data: object) -> Callable[[], bytes]:
    def read() -> bytes:
        if not isinstance(data, (bytes, bytearray)):
            raise ValueError("no image bytes")
        return bytes(data)

    return read


def _read_table(uri: str):
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.json as pa_json
    import pyarrow.parquet as pq

    try:
        with storage.open_read(uri) as handle:
            if uri.lower().endswith(".parquet"):
                return pq.read_table(handle)
            data = handle.read()
        reader = pa_csv.read_csv if uri.lower().endswith(".csv") else pa_json.read_json
        return reader(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{uri}: not a readable table ({type(error).__name__}: {first})") from None


def _pick_column(uri: str, names: Sequence[str], given: str | None, candidates: Sequence[str], *, option: str) -> str:
    if given is not None:
        if given not in names:
            raise ValueError(f"{uri}: no column {given!r} (columns: {', '.join(names)}); name it with {option}")
        return given
    found = next((c for c in candidates if c in names), None)
    if found is None:
        raise ValueError(f"{uri}: no image column ({', '.join(candidates)}) among {', '.join(names)}; name it with {option}")
    return found


def _coco_first_captions(uri: str) -> dict[str, str]:
    """file_name -> the image's first caption by annotation id, from a COCO captions JSON."""
    if not storage.exists(uri):
        raise FileNotFoundError(f"--coco-captions {uri}: not found")
    try:
        data = json.loads(storage.read_bytes(uri))
        names = {image["id"]: image["file_name"] for image in data["images"]}
        first: dict[str, str] = {}
        for annotation in sorted(data["annotations"], key=lambda a: a["id"]):
            name = names.get(annotation["image_id"])
            if name is not None:
                first.setdefault(posixpath.basename(name), str(annotation["caption"]))
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"--coco-captions {uri}: not a COCO captions JSON ({type(error).__name__}: {error})") from None
    return first


def _summary(stats: dict) -> str:
    skipped = ", ".join(f"{entry['count']} {reason}" for reason, entry in stats["skipped"].items()) or "none"
    shards = stats["shards"]
    return (f"pack: {stats['samples']:,} inputs, {stats['written']:,} samples in {shards['written']} shard(s), "
            f"skipped: {skipped}. Stats: {stats['out'].rstrip('/')}/_stats.json")


@user_errors(FileNotFoundError, ValueError, storage.UnwritableOutput)
def pack_command(
    inputs: list[str] = typer.Argument(
        ..., help="Folders of images, or .csv/.jsonl/.parquet tables of image paths or bytes (local or s3:// gs://)."
    ),
    out: str = typer.Option(..., "--out", help="Output folder: {shard:05d}.tar WebDataset shards and _stats.json."),
    coco_captions: Optional[str] = typer.Option(
        None, "--coco-captions", help="COCO captions JSON: each image's first caption, matched on file_name."
    ),
    caption_column: Optional[str] = typer.Option(
        None, "--caption-column", help="Tables: caption column (default: caption, else TEXT; else a sidecar .txt)."
    ),
    image_column: Optional[str] = typer.Option(
        None, "--image-column", help="Tables: image path or bytes column (default: jpg, image, path, filepath, file_name)."
    ),
    samples_per_shard: int = typer.Option(10_000, "--samples-per-shard", min=1, help="Inputs per shard (img2dataset's default)."),
    keys: str = typer.Option(
        "position", "--keys", help="Sample keys: position (img2dataset's shard+index) or name (file name stem / table key)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace shards in a folder that already holds some."),
) -> None:
    """Pack images and their captions into WebDataset shards ({key}.jpg, {key}.txt, {key}.json) for every stage."""
    config = PackConfig(inputs=tuple(inputs), out=out, coco_captions=coco_captions, image_column=image_column,
                        caption_column=caption_column, samples_per_shard=samples_per_shard, keys=keys,
                        overwrite=overwrite)
    print(_summary(run_pack(config)))


__all__ = ["PackConfig", "PackInput", "pack_command", "run_pack"]
