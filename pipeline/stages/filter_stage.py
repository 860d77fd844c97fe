"""`pipeline filter`: rebuild pseudo shards from stored detections with another policy.

No teacher runs: for each source shard, the rows of `DETECTIONS/{shard}.parquet` (written by
`pseudo-label`, every box above its floor) are filtered with the chosen policy, the source
image bytes are copied from the shard, and `OUT/pseudo/{shard}.tar` is written exactly as
`pseudo-label` writes it (same function, `filtering.select_samples`): for the same policy the
two tars are byte-identical. `OUT/_stats.json` last. Resume and `--overwrite` as every stage.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
from typing import Optional, TextIO

import typer

from pipeline.io import storage
from pipeline.io.images import IMAGE_EXTENSIONS
from pipeline.io.labels_io import (
    PSEUDO,
    detections_folder,
    iter_pseudo_samples,
    print_summary,
    read_detections,
    write_pseudo_tar,
)
from pipeline.io.shard_report import ShardReport, ShardTask
from pipeline.io.shards import discover_shards, iter_webdataset_samples
from pipeline.stages.filtering import FILTER_OPTIONS as _F
from pipeline.stages.filtering import FilterPolicy, policy_from_options, select_samples
from pipeline.stages.stage import StageRun, check_shard_files, run_stage
from pipeline.user_errors import user_errors

STAGE = "filter"


@dataclass(frozen=True, kw_only=True)
class FilterConfig:
    inputs: tuple[str, ...]
    detections: str  # the detections/ folder (or the pseudo-label output folder holding it)
    out: str
    policy: FilterPolicy
    workers: int | None = None
    address: str | None = None
    overwrite: bool = False


class FilterWorker:
    def __init__(self, *, config: FilterConfig) -> None:
        self.config = config

    def __call__(self, task: ShardTask) -> ShardReport:
        started = time.perf_counter()
        uri = storage.join(detections_folder(self.config.detections), f"{task.shard_id}.parquet")
        if not storage.exists(uri):
            raise FileNotFoundError(f"{uri}: no detections for this shard (run pseudo-label on it first)")
        rows, metadata = read_detections(uri)
        teacher = json.loads(metadata.get("teacher", "{}"))
        wanted = {row.key for row in rows if row.error is None}
        image_bytes: dict[str, bytes] = {}
        for sample in iter_webdataset_samples(task.input_uri):
            key = str(sample["__key__"])
            if key in wanted:
                ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
                if ext is not None:
                    image_bytes[key] = sample[ext]  # type: ignore[assignment]
        report = ShardReport(shard_id=task.shard_id, input_uri=task.input_uri, output_uri=task.output_uri)
        samples = select_samples(rows, image_bytes, policy=self.config.policy, teacher=teacher, report=report)
        write_pseudo_tar(task.output_uri, samples)
        report.seconds = round(time.perf_counter() - started, 4)
        return report


def _done_report(task: ShardTask) -> ShardReport:
    """A finished shard's counts, rebuilt from its tar (a resumed run's `_stats.json`)."""
    count = sum(1 for _ in iter_pseudo_samples(task.output_uri))
    return ShardReport(shard_id=task.shard_id, input_uri=task.input_uri, output_uri=task.output_uri, written=count)


def run_filter(config: FilterConfig, *, progress_stream: TextIO | None = None) -> dict[str, object]:
    shards = [s for s in discover_shards(config.inputs) if s.kind == "webdataset"]
    if not shards:
        raise FileNotFoundError(f"no WebDataset .tar shards in {list(config.inputs)}")
    if not storage.is_dir(config.detections):
        raise FileNotFoundError(f"--detections {config.detections}: folder not found")
    storage.ensure_writable_folder(config.out)
    check_shard_files(
        shards, detections_folder(config.detections), suffix=".parquet", flag="--detections", made_by="pseudo-label",
        stream=progress_stream,
    )
    run = StageRun(
        stage=STAGE, out=config.out, suffix=".tar", marker_dir=storage.join(config.out, PSEUDO),
        overwrite=config.overwrite, workers=config.workers, address=config.address, num_cpus=1.0,
    )
    return run_stage(
        run,
        shards=shards,
        inputs=config.inputs,
        worker_factory=functools.partial(FilterWorker, config=config),
        read_done_report=_done_report,
        settings={"detections": config.detections, "filter": config.policy.to_dict()},
        versions={},
        progress_stream=progress_stream,
    )


@user_errors(FileNotFoundError, ValueError)
def filter_command(
    inputs: list[str] = typer.Argument(..., help="The source image shards the detections were made from."),
    detections: str = typer.Option(..., "--detections", help="pseudo-label output folder (or its detections/)."),
    out: str = typer.Option(..., "--out", help="Output folder: pseudo/{shard}.tar and _stats.json."),
    preset: str = _F["preset"],
    policy_file: Optional[str] = _F["policy_file"],
    min_score: Optional[float] = _F["min_score"],
    nms_iou: Optional[float] = _F["nms_iou"],
    nms_scope: Optional[str] = _F["nms_scope"],
    top_k: Optional[int] = _F["top_k"],
    min_box_frac: Optional[float] = _F["min_box_frac"],
    max_box_frac: Optional[float] = _F["max_box_frac"],
    keep_empty: Optional[bool] = _F["keep_empty"],
    assign: Optional[str] = _F["assign"],
    workers: Optional[int] = typer.Option(
        None, "--workers", min=1, help="Actors, fixed (default: one per CPU, more on nodes that join)."
    ),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: embedded local Ray)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo shards whose output exists."),
) -> None:
    """Re-filter stored detections into pseudo shards with another policy (no teacher needed)."""
    policy = policy_from_options(
        preset, min_score=min_score, nms_iou=nms_iou, nms_scope=nms_scope, top_k=top_k,
        min_box_frac=min_box_frac, max_box_frac=max_box_frac, keep_empty=keep_empty, policy_file=policy_file,
        assign=assign,
    )
    stats = run_filter(
        FilterConfig(
            inputs=tuple(inputs), detections=detections, out=out, policy=policy, workers=workers,
            address=address, overwrite=overwrite,
        )
    )
    print_summary(stats, out)
