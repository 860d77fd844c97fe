"""`pipeline decontaminate`: drop web samples that are near-duplicates of evaluation images.

1. The evaluation images (`--against`: image files, folders of images, globs, or WebDataset
   shards) are decoded and hashed once on the driver, every variant of each
   (`near_duplicates`: pHash + dHash; crops and mirror images), and put in the Ray object
   store once (`ray.put`); every actor reads that one copy.
2. Each web shard runs through the shared stage runner (`stage.run_stage`: Ray actors, one
   shard per call, resume, retries): its samples are read in order, the image of each is
   hashed and compared with all evaluation variants; a sample within `--max-distance` on both
   hashes of some variant is dropped, every other sample is copied to `OUT/{shard}.tar` member
   by member as it is stored (same names, bytes and tar metadata; the images are never
   re-encoded). A sample whose image cannot be decoded, or that has none, is kept unchecked
   (counted as `unchecked`; the pseudo-label stage skips such images with a reason anyway).
3. `OUT/matches.parquet/{shard}.parquet` (a Parquet dataset folder:
   `pyarrow.parquet.read_table("OUT/matches.parquet")` reads all shards' matches as one table)
   gets one row per dropped sample: `web_shard`, `web_key`, `eval_image`, `eval_variant`,
   `phash_distance`, `dhash_distance`; it is written before the shard's tar, which is written
   last and marks the shard done. `OUT/_stats.json` last, with `hashed`, `unchecked` and the
   dropped samples under `skipped.near_duplicate` (with example keys).

A `.tar.gz` input gives an uncompressed `OUT/{shard}.tar`.
"""

from __future__ import annotations

import functools
import io
import os
import sys
import tarfile
import time
from dataclasses import dataclass
from typing import Optional, TextIO

import pyarrow as pa
import pyarrow.parquet as pq
import typer

from pipeline.cluster import init_ray, shutdown_ray
from pipeline.io import storage
from pipeline.io.images import IMAGE_EXTENSIONS, ImageDecodeError, decode_gray_small
from pipeline.io.shard_report import ShardReport, ShardTask
from pipeline.io.shards import (
    TAR_SUFFIXES,
    ShardReadError,
    discover_shards,
    iter_webdataset_members,
    iter_webdataset_samples,
    member_extension,
)
from pipeline.io.stage_stats import print_summary
from pipeline.stages.near_duplicates import DECODE_SIDE, DEFAULT_MAX_DISTANCE, HASHES, EvalHashes, eval_hashes, image_hashes, nearest_match
from pipeline.stages.stage import StageRun, plan_shards, run_stage
from pipeline.user_errors import user_errors

STAGE = "decontaminate"
MATCHES = "matches.parquet"
NEAR_DUPLICATE = "near_duplicate"
MATCHES_SCHEMA = pa.schema(
    [
        ("web_shard", pa.string()),
        ("web_key", pa.string()),
        ("eval_image", pa.string()),
        ("eval_variant", pa.string()),
        ("phash_distance", pa.int16()),
        ("dhash_distance", pa.int16()),
    ]
)


class DecontaminateError(ValueError):
    """Evaluation input that cannot be used (names the file and the reason)."""


@dataclass(frozen=True, kw_only=True)
class DecontaminateConfig:
    inputs: tuple[str, ...]
    against: tuple[str, ...]
    out: str
    max_distance: int = DEFAULT_MAX_DISTANCE
    workers: int | None = None
    address: str | None = None
    overwrite: bool = False


def read_eval_images(against: tuple[str, ...], *, progress_stream: TextIO | None = None) -> EvalHashes:
    """Hash every evaluation image named by `against`; DecontaminateError for one that cannot be decoded."""
    stream = progress_stream if progress_stream is not None else sys.stderr
    suffixes = tuple(f".{e}" for e in IMAGE_EXTENSIONS) + tuple(f".{e.upper()}" for e in IMAGE_EXTENSIONS) + TAR_SUFFIXES
    try:
        files = storage.expand_inputs(list(against), suffixes=suffixes)
    except FileNotFoundError as error:
        raise DecontaminateError(f"--against: {error}") from None

    def named_images():
        for uri in files:
            if uri.endswith(TAR_SUFFIXES):
                for sample in iter_webdataset_samples(uri):
                    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
                    if ext is not None:
                        yield f"{uri}:{sample['__key__']}", sample[ext]
            else:
                yield uri, storage.read_bytes(uri)

    def decoded():
        last_print = time.perf_counter()
        for count, (name, data) in enumerate(named_images(), start=1):
            try:
                yield name, decode_gray_small(data, side=DECODE_SIDE)  # type: ignore[arg-type]
            except ImageDecodeError as error:
                raise DecontaminateError(f"{name}: evaluation image cannot be used ({error})") from None
            if time.perf_counter() - last_print >= 5.0:
                last_print = time.perf_counter()
                print(f"[{STAGE}] evaluation images: {count:,} hashed", file=stream, flush=True)

    try:
        index = eval_hashes(decoded())
    except ShardReadError as error:
        raise DecontaminateError(f"--against: {error}") from None
    if not index.names:
        raise DecontaminateError(f"--against {' '.join(against)}: no evaluation images found")
    print(f"[{STAGE}] evaluation images: {len(index.names):,} hashed ({len(index.variant):,} variants)", file=stream, flush=True)
    return index


class DecontaminateWorker:
    """Hashes one web shard per call against the broadcast evaluation hashes."""

    def __init__(self, *, config: DecontaminateConfig, eval_ref) -> None:
        import ray

        self.config = config
        self.index: EvalHashes = ray.get(eval_ref)

    def __call__(self, task: ShardTask) -> ShardReport:
        started = time.perf_counter()
        report = ShardReport(shard_id=task.shard_id, input_uri=task.input_uri, output_uri=task.output_uri)
        for name in ("hashed", "unchecked"):
            report.count(name, 0)
        matches = []
        with storage.atomic_writer(task.output_uri) as handle:
            with tarfile.open(fileobj=handle, mode="w") as tar:
                for key, members in iter_webdataset_members(task.input_uri):
                    if key is not None:
                        report.samples += 1
                        match = self._match(key, members, report)
                        if match is not None:
                            report.skip(NEAR_DUPLICATE, key)
                            matches.append(
                                {"web_shard": task.shard_id, "web_key": key, "eval_image": match.eval_image,
                                 "eval_variant": match.eval_variant, "phash_distance": match.distances[0],
                                 "dhash_distance": match.distances[1]}
                            )
                            continue
                        report.written += 1
                    for member, data in members:
                        tar.addfile(member, io.BytesIO(data))
            report.seconds = round(time.perf_counter() - started, 4)
            write_matches(storage.join(self.config.out, MATCHES, f"{task.shard_id}.parquet"), matches, report)
        return report  # the tar got its final name last: the shard is done

    def _match(self, key: str, members, report: ShardReport):
        by_extension = {member_extension(member.name): data for member, data in members}
        image = next((by_extension[ext] for ext in IMAGE_EXTENSIONS if ext in by_extension), None)  # as pseudo-label picks it
        if image is None:
            report.count("unchecked")
            return None
        try:
            hashes = image_hashes(decode_gray_small(image, side=DECODE_SIDE))
        except ImageDecodeError:
            report.count("unchecked")
            return None
        report.count("hashed")
        return nearest_match(hashes, self.index, max_distance=self.config.max_distance)


def write_matches(uri: str, matches: list[dict], report: ShardReport) -> None:
    table = pa.Table.from_pylist(matches, schema=MATCHES_SCHEMA).replace_schema_metadata(
        {"stage": STAGE, "shard_report": report.to_json()}
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    storage.write_atomic(uri, sink.getvalue().to_pybytes())


def read_done_report(task: ShardTask, *, out: str) -> ShardReport:
    with storage.open_read(storage.join(out, MATCHES, f"{task.shard_id}.parquet")) as handle:
        metadata = pq.read_schema(handle).metadata or {}
    return ShardReport.from_json(metadata[b"shard_report"].decode())


def run_decontaminate(config: DecontaminateConfig, *, progress_stream: TextIO | None = None) -> dict[str, object]:
    """Run the stage; returns the `_stats.json` dict."""
    shards = [s for s in discover_shards(config.inputs) if s.kind == "webdataset"]
    if not shards:
        raise FileNotFoundError(f"no WebDataset .tar shards in {list(config.inputs)}")
    storage.makedirs(storage.join(config.out, MATCHES))
    plan = plan_shards(shards, out=config.out, suffix=".tar", overwrite=config.overwrite)
    names: list[str] = []
    started = False
    eval_ref = None
    if plan.pending:  # a finished run re-runs nothing: no hashing, no Ray
        import ray

        index = read_eval_images(config.against, progress_stream=progress_stream)
        names = index.names
        started = init_ray(config.address, num_cpus=None if config.address else max(os.cpu_count() or 1, config.workers or 0))
        eval_ref = ray.put(index)  # once; every actor reads this copy
    try:
        run = StageRun(stage=STAGE, out=config.out, suffix=".tar", overwrite=config.overwrite, workers=config.workers,
                       address=config.address, num_cpus=1.0)
        import imagehash

        return run_stage(
            run,
            shards=shards,
            inputs=config.inputs,
            worker_factory=functools.partial(DecontaminateWorker, config=config, eval_ref=eval_ref),
            read_done_report=functools.partial(read_done_report, out=config.out),
            settings={"against": list(config.against), "eval_images": len(names) or None, "max_distance": config.max_distance,
                      "hashes": list(HASHES), "decode_side": DECODE_SIDE},
            versions={"imagehash": imagehash.__version__},
            progress_stream=progress_stream,
        )
    finally:
        shutdown_ray(started)


@user_errors(FileNotFoundError, ValueError)
def decontaminate_command(
    inputs: list[str] = typer.Argument(..., help="Web image shards (img2dataset WebDataset .tar): files, globs or folders."),
    against: list[str] = typer.Option(..., "--against", help="Evaluation images: files, folders, globs or WebDataset shards (repeatable)."),
    out: str = typer.Option(..., "--out", help="Output folder: {shard}.tar without the matches, matches.parquet/, _stats.json."),
    max_distance: int = typer.Option(DEFAULT_MAX_DISTANCE, "--max-distance", min=0, max=64, help="Most bits (of 64) apart on both pHash and dHash for a match."),
    workers: Optional[int] = typer.Option(
        None, "--workers", min=1, help="Actors, fixed (default: one per CPU, more on nodes that join)."
    ),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: embedded local Ray)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo shards whose output exists."),
) -> None:
    """Drop web samples that are near-duplicates (resized, recompressed, cropped, flipped) of evaluation images.

    Example: pipeline decontaminate web/shards --against coco/val2017 --out web/clean

    Example: pipeline decontaminate 'web/*.tar' --against test_shards/ --against extra.jpg --out clean --max-distance 12

    Kept samples are copied member by member, unchanged; the matches go to OUT/matches.parquet (web key, eval image, distances).
    """
    stats = run_decontaminate(
        DecontaminateConfig(inputs=tuple(inputs), against=tuple(against), out=out, max_distance=max_distance,
                            workers=workers, address=address, overwrite=overwrite)
    )
    removed = dict(stats["skipped"]).get(NEAR_DUPLICATE, {}).get("count", 0)  # type: ignore[union-attr]
    print_summary(stats, out, counts=f"{stats['samples']:,} samples, {stats.get('hashed', 0):,} hashed, {removed:,} near-duplicates dropped")
