"""Write a synthetic web corpus fast: N shards of K samples, real crops and real captions.

Images are small JPEG crops (64-160 px) of the 80 coco_mini photos of ../shared/data, encoded
once into a pool and reused; captions are the 15,833 CC3M validation alt-texts, in order. So a
corpus of 100,000 shards costs file writes, not image encoding. Layouts (`--format`):

* `webdataset` (img2dataset): `{shard}.tar` with `{key}.jpg`, `{key}.txt`, `{key}.json`;
* `parquet` (img2dataset's parquet output): `{shard}.parquet` with `key`, `caption`, `jpg`,
  `width`, `height`;
* `pseudo` (what pseudo-label/filter write, DESIGN.md): `{shard}.tar` with `{key}.jpg` and the
  sample JSON, one box per sample on the caption's first word: training-loader input.

`--detections DIR` also writes `DIR/{shard}.parquet` in the pseudo-label stage's detections
layout (one box per sample, score 0.9), so `pipeline filter` can run at sizes where running
the teacher would take too long. Keys are `{shard:07d}{slot:04d}`.

OUT is a local folder or an object-store URI (s3://bucket/prefix; the endpoint from
AWS_ENDPOINT_URL, as for every stage). Object-store shards are uploaded in concurrent batches.

Run: `.venv/bin/python bench/make_corpus.py /tmp/corpus --shards 1000 --samples 10`
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import sys
import tarfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHARED = Path(os.environ.get("GLIP_SHARED_DIR", REPO.parent / "shared"))
COCO_IMAGES = SHARED / "data" / "coco_mini" / "train2017"
CC3M = SHARED / "data" / "captions" / "cc3m_validation.tsv"
FORMATS = ("webdataset", "parquet", "pseudo")
UPLOAD_BATCH = 256  # objects per concurrent object-store upload


@dataclass(frozen=True)
class Sample:
    key: str
    jpeg: bytes
    width: int
    height: int
    caption: str


class SamplePool:
    """Pre-encoded JPEG crops and captions, handed out round-robin by a global sample index."""

    def __init__(self, *, images: int = 64, seed: int = 0) -> None:
        from PIL import Image

        rng = random.Random(seed)
        files = sorted(COCO_IMAGES.glob("*.jpg"))
        if not files:
            raise FileNotFoundError(f"no coco_mini images in {COCO_IMAGES} (set GLIP_SHARED_DIR)")
        self.images: list[tuple[bytes, int, int]] = []
        for index in range(images):
            with Image.open(files[index % len(files)]) as photo:
                photo = photo.convert("RGB")
                side = rng.randint(min(photo.size) // 3, min(photo.size))
                left, top = rng.randint(0, photo.width - side), rng.randint(0, photo.height - side)
                target = (rng.randint(64, 160), rng.randint(64, 160))
                crop = photo.crop((left, top, left + side, top + side)).resize(target)
            buffer = io.BytesIO()
            crop.save(buffer, format="JPEG", quality=85)
            self.images.append((buffer.getvalue(), *target))
        with open(CC3M, encoding="utf-8") as handle:
            self.captions = [row[0].strip() for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)]

    def sample(self, shard: int, slot: int, samples_per_shard: int) -> Sample:
        index = shard * samples_per_shard + slot
        jpeg, width, height = self.images[index % len(self.images)]
        return Sample(f"{shard:07d}{slot:04d}", jpeg, width, height, self.captions[index % len(self.captions)])


def _first_word(caption: str) -> tuple[int, int]:
    start = next((i for i, c in enumerate(caption) if c.isalpha()), 0)
    end = start
    while end < len(caption) and caption[end].isalpha():
        end += 1
    return start, max(end, start + 1)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def shard_bytes(samples: list[Sample], fmt: str) -> bytes:
    """One shard's file in layout `fmt`."""
    buffer = io.BytesIO()
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table(
            {
                "key": [s.key for s in samples],
                "caption": [s.caption for s in samples],
                "jpg": pa.array([s.jpeg for s in samples], pa.binary()),
                "width": pa.array([s.width for s in samples], pa.int32()),
                "height": pa.array([s.height for s in samples], pa.int32()),
            }
        )
        pq.write_table(table, buffer)
        return buffer.getvalue()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for s in samples:
            _add(tar, f"{s.key}.jpg", s.jpeg)
            if fmt == "webdataset":
                _add(tar, f"{s.key}.txt", s.caption.encode("utf-8"))
                _add(tar, f"{s.key}.json", json.dumps({"key": s.key, "caption": s.caption}).encode())
            else:
                _add(tar, f"{s.key}.json", json.dumps(pseudo_json(s)).encode())
    return buffer.getvalue()


def pseudo_json(s: Sample) -> dict:
    start, end = _first_word(s.caption)
    box = [s.width * 0.1, s.height * 0.1, s.width * 0.9, s.height * 0.9]
    return {
        "key": s.key, "width": s.width, "height": s.height,
        "grounding": {"caption": s.caption, "regions": [
            {"bbox": box, "phrase": s.caption[start:end], "tokens_positive": [[start, end]], "score": 0.9}
        ]},
        "teacher": {"checkpoint": "synthetic", "sha256": "0" * 64}, "filter": {"min_score": 0.5},
    }


def detections_bytes(samples: list[Sample], source_shard: str) -> bytes:
    """The detections file pseudo-label would write for `samples` (one box each)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.io.labels_io import DETECTIONS_SCHEMA
    from pipeline.io.shard_report import ShardReport

    rows = []
    for s in samples:
        start, end = _first_word(s.caption)
        box = [s.width * 0.1, s.height * 0.1, s.width * 0.9, s.height * 0.9]
        rows.append({
            "key": s.key, "image_ext": "jpg", "width": s.width, "height": s.height, "caption": s.caption,
            "phrases": [{"text": s.caption[start:end], "start": start, "end": end}],
            "boxes": [{"bbox": box, "score": 0.9, "phrase": 0}], "error": None,
        })
    report = ShardReport(shard_id=source_shard, input_uri=source_shard, output_uri=None, samples=len(samples))
    metadata = {"stage": "pseudo-label", "source_shard": source_shard, "floor": "0.05",
                "teacher": json.dumps({"checkpoint": "synthetic", "sha256": "0" * 64}),
                "shard_report": report.to_file_json()}
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=DETECTIONS_SCHEMA).replace_schema_metadata(metadata), buffer)
    return buffer.getvalue()


def corpus_files(
    *, shards: int, samples: int, fmt: str, detections: bool, pool: SamplePool
) -> Iterator[tuple[str, bytes, bytes | None]]:
    """(file name, shard bytes, detections bytes or None) for every shard."""
    suffix = ".parquet" if fmt == "parquet" else ".tar"
    for shard in range(shards):
        chunk = [pool.sample(shard, slot, samples) for slot in range(samples)]
        shard_id = f"{shard:07d}"
        yield shard_id + suffix, shard_bytes(chunk, fmt), detections_bytes(chunk, shard_id) if detections else None


def write_corpus(
    out: str, *, shards: int, samples: int, fmt: str = "webdataset", detections: str | None = None, seed: int = 0
) -> float:
    """Write the corpus; returns seconds taken."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if shards < 1 or samples < 1:
        raise ValueError("--shards and --samples must be >= 1")
    started = time.perf_counter()
    pool = SamplePool(seed=seed)
    sinks = [_Sink(out)] + ([_Sink(detections)] if detections else [])
    for name, data, found in corpus_files(shards=shards, samples=samples, fmt=fmt, detections=bool(detections), pool=pool):
        sinks[0].add(name, data)
        if found is not None:
            sinks[1].add(name.rsplit(".", 1)[0] + ".parquet", found)
    for sink in sinks:
        sink.close()
    return time.perf_counter() - started


class _Sink:
    """Files into a local folder (plain writes: a fresh corpus needs no atomicity) or an
    object-store prefix (concurrent uploads, `UPLOAD_BATCH` at a time)."""

    def __init__(self, out: str) -> None:
        self.remote = "://" in out
        self.out = out.rstrip("/")
        self.pending: dict[str, bytes] = {}
        if self.remote:
            import fsspec

            self.fs, self.root = fsspec.core.url_to_fs(self.out)
            self.pool = ThreadPoolExecutor(4)
            self.futures: list = []
        else:
            os.makedirs(self.out, exist_ok=True)

    def add(self, name: str, data: bytes) -> None:
        if not self.remote:
            with open(os.path.join(self.out, name), "wb") as handle:
                handle.write(data)
            return
        self.pending[f"{self.root}/{name}"] = data
        if len(self.pending) >= UPLOAD_BATCH:
            self._flush()

    def _flush(self) -> None:
        batch, self.pending = self.pending, {}
        self.futures.append(self.pool.submit(self.fs.pipe, batch))
        if len(self.futures) > 8:  # bounded memory: wait for the oldest batches
            for future in self.futures[:-8]:
                future.result()
            self.futures = self.futures[-8:]

    def close(self) -> None:
        if self.remote:
            if self.pending:
                self._flush()
            for future in self.futures:
                future.result()
            self.pool.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="Output folder or s3:// URI.")
    parser.add_argument("--shards", type=int, required=True)
    parser.add_argument("--samples", type=int, default=10, help="Samples per shard.")
    parser.add_argument("--format", default="webdataset", choices=FORMATS)
    parser.add_argument("--detections", default=None, help="Also write pseudo-label detections here.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    seconds = write_corpus(
        args.out, shards=args.shards, samples=args.samples, fmt=args.format, detections=args.detections, seed=args.seed
    )
    print(f"{args.shards:,} {args.format} shards x {args.samples} samples -> {args.out} in {seconds:.1f} s")


if __name__ == "__main__":
    main()
