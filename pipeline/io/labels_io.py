"""The files of the pseudo-label stage: `detections/{shard}.parquet` and `pseudo/{shard}.tar`.

An output folder of `pseudo-label` holds `DETECTIONS/` and `PSEUDO/` (the names below) and
`_stats.json`; `filter` writes `PSEUDO/` alone. Both print `print_summary`'s line at the end.

`detections/{shard}.parquet`, one row per input sample, in shard order:
* `key` string; `image_ext` string (the image member's extension, "" when none);
* `width`, `height` int32: the decoded image (after EXIF rotation), 0 when not decoded;
* `caption` string and `phrases` list<struct<text, start, end>>: what the teacher grounded;
* `boxes` list<struct<bbox: list<float32>[4] xyxy original pixels, score: float32,
  phrase: int32 (index into `phrases`)>>: every box above the stage's floor, best first;
* `error` string: null when the image was grounded, else the skip reason ("truncated: ...").
File metadata: `stage`, `source_shard`, `teacher` (JSON), `floor`, `shard_report` (JSON).

`pseudo/{shard}.tar` (WebDataset): per kept sample `{key}.{ext}` (the source image bytes,
unchanged) and `{key}.json` (DESIGN.md's sample JSON). Members are written in input order with
fixed metadata (mtime 0, uid/gid 0, mode 0644), so the same inputs give byte-identical tars.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io import storage
from pipeline.io.phrases_file import PHRASE_TYPE
from pipeline.io.stage_stats import print_summary as print_stage_summary

DETECTIONS = "detections"  # the subfolder of every box above the floor, one Parquet file per shard
PSEUDO = "pseudo"  # the subfolder of the pseudo shards, one WebDataset tar per shard

BOX_TYPE = pa.struct([("bbox", pa.list_(pa.float32(), 4)), ("score", pa.float32()), ("phrase", pa.int32())])
DETECTIONS_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("image_ext", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("caption", pa.string()),
        ("phrases", pa.list_(PHRASE_TYPE)),
        ("boxes", pa.list_(BOX_TYPE)),
        ("error", pa.string()),
    ]
)
# A key becomes a tar member name: letters, digits and "_-.:" only, never a path.
SAFE_KEY = re.compile(r"^[A-Za-z0-9_\-:][A-Za-z0-9_\-:.]{0,199}$")


def detections_folder(path: str) -> str:
    """Accept the pseudo-label output folder or its `detections/` subfolder."""
    nested = storage.join(path, DETECTIONS)
    return nested if storage.is_dir(nested) else path


def print_summary(stats: dict[str, object], out: str) -> None:
    """The last lines of a stage that writes pseudo shards (`pseudo-label`, `filter`)."""
    print_stage_summary(
        stats,
        out,
        counts=f"{stats['samples']:,} samples, {stats.get('images', 0):,} images grounded, "
        f"{stats['written']:,} pseudo-labelled with {stats.get('kept_boxes', 0):,} boxes",
    )


@dataclass(frozen=True)
class Box:
    """One teacher box: xyxy in original pixels, score, index into the image's phrase list."""

    bbox: tuple[float, float, float, float]
    score: float
    phrase: int


@dataclass
class DetectionRow:
    key: str
    image_ext: str = ""
    width: int = 0
    height: int = 0
    caption: str = ""
    phrases: list[dict[str, Any]] | None = None  # {"text", "start", "end"}
    boxes: list[Box] | None = None
    error: str | None = None


def is_safe_key(key: str) -> bool:
    return bool(SAFE_KEY.match(key)) and ".." not in key


def write_detections(uri: str, rows: Sequence[DetectionRow], metadata: dict[str, str]) -> None:
    table = pa.Table.from_pylist(
        [
            {
                "key": row.key,
                "image_ext": row.image_ext,
                "width": row.width,
                "height": row.height,
                "caption": row.caption,
                "phrases": row.phrases or [],
                "boxes": [{"bbox": list(b.bbox), "score": b.score, "phrase": b.phrase} for b in row.boxes or []],
                "error": row.error,
            }
            for row in rows
        ],
        schema=DETECTIONS_SCHEMA,
    ).replace_schema_metadata(metadata)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    storage.write_atomic(uri, sink.getvalue().to_pybytes())


def read_detections(uri: str, *, keys: set[str] | None = None) -> tuple[list[DetectionRow], dict[str, str]]:
    """Rows and file metadata of a detections file; with `keys`, only the rows of those keys."""
    with storage.open_read(uri) as handle:
        table = pq.read_table(handle)
    metadata = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    missing = set(DETECTIONS_SCHEMA.names) - set(table.schema.names)
    if missing:
        raise ValueError(f"{uri}: not a detections file (no columns {sorted(missing)})")
    if keys is not None:
        import pyarrow.compute as pc

        table = table.filter(pc.is_in(table.column("key"), value_set=pa.array(sorted(keys), pa.string())))
    rows = []
    for record in table.to_pylist():
        boxes = [
            Box(bbox=tuple(float(v) for v in b["bbox"]), score=float(b["score"]), phrase=int(b["phrase"]))
            for b in record["boxes"] or []
        ]
        rows.append(
            DetectionRow(
                key=record["key"], image_ext=record["image_ext"] or "", width=int(record["width"] or 0),
                height=int(record["height"] or 0), caption=record["caption"] or "", phrases=record["phrases"] or [],
                boxes=boxes, error=record["error"],
            )
        )
    return rows, metadata


def read_detection_keys(uri: str) -> list[str]:
    """The `key` column of a detections file alone (cheap: one column is read)."""
    with storage.open_read(uri) as handle:
        return [str(key) for key in pq.read_table(handle, columns=["key"]).column("key").to_pylist()]


def read_detections_metadata(uri: str) -> dict[str, str]:
    with storage.open_read(uri) as handle:
        schema = pq.read_schema(handle)
    return {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}


def write_pseudo_tar(uri: str, samples: Sequence[tuple[str, str, bytes, dict]]) -> None:
    """Write (key, image extension, image bytes, sample JSON) as a WebDataset tar, atomically."""
    with storage.atomic_writer(uri) as handle:
        with tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, ext, image, sample in samples:
                if not is_safe_key(key):
                    raise ValueError(f"{uri}: unsafe sample key {key!r}")
                _add_member(tar, f"{key}.{ext}", image)
                _add_member(tar, f"{key}.json", json.dumps(sample, ensure_ascii=False, sort_keys=True).encode("utf-8"))


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def iter_pseudo_samples(uri: str) -> Iterator[tuple[str, str, bytes, dict]]:
    """(key, image extension, image bytes, sample JSON) of a pseudo tar, in order; samples
    without an image or a JSON member are left out.

    Raises `shards.ShardReadError` for a broken or truncated tar (after yielding the complete
    samples before the damage) and ValueError naming the sample whose JSON does not parse.
    """
    from pipeline.io.images import IMAGE_EXTENSIONS
    from pipeline.io.shards import iter_webdataset_samples

    for sample in iter_webdataset_samples(uri):
        key = str(sample["__key__"])
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None or "json" not in sample:
            continue
        try:
            parsed = json.loads(sample["json"])  # type: ignore[arg-type]
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{uri}: sample {key}: JSON is not valid: {exc}") from None
        yield key, ext, sample[ext], parsed  # type: ignore[misc]
