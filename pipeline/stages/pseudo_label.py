"""`pipeline pseudo-label`: a teacher (GLIP, Grounding DINO or OWLv2: `pipeline.stages.teachers`)
grounds each image's parsed phrases; confident boxes become WebDataset training shards.

For every input shard (img2dataset WebDataset: `{key}.jpg` + `{key}.txt`), with the
phrases of the parse stage (`PHRASES/{shard}.parquet`, joined by key):
1. a reader thread streams the tar, decodes each image (`pipeline.io.images.decode_rgb`: EXIF,
   modes, corrupt/tiny/bomb images skipped with a reason) while the model runs;
2. images are grouped by aspect ratio (within a window of a few batches) and grounded in
   batches of `--batch-size`, each with its own caption as the prompt (`model.teachers.teacher.Teacher`);
3. `OUT/detections/{shard}.parquet` gets every box above `--floor` for every sample
   (`pipeline.io.labels_io`), then `OUT/pseudo/{shard}.tar` the samples the filter policy keeps
   (source image bytes unchanged + the sample JSON of DESIGN.md). The tar is written last,
   atomically: it marks the shard done, and a re-run skips it.
`OUT/_stats.json` (written last) has the counts, skip reasons with example keys, images/s, the
teacher (name, kind, sha256, variant, preprocessing) and every setting.

The model is loaded once per Ray actor; `--num-gpus 1` gives each actor a GPU (`cuda`),
otherwise actors run on the CPU with `--cpus-per-worker` torch threads.
"""

from __future__ import annotations

import functools
import json
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional, TextIO

import typer

from pipeline.io import storage
from pipeline.io.images import IMAGE_EXTENSIONS, ImageDecodeError, decode_rgb
from pipeline.io.labels_io import (
    DETECTIONS,
    PSEUDO,
    Box,
    DetectionRow,
    is_safe_key,
    print_summary,
    read_detections_metadata,
    write_detections,
    write_pseudo_tar,
)
from pipeline.io.shard_report import ShardReport, ShardTask
from pipeline.io.shards import MemberTally, discover_shards
from pipeline.stages.filtering import FILTER_OPTIONS as _F
from pipeline.stages.filtering import PRESETS, FilterPolicy, policy_from_options, select_samples
from pipeline.stages.stage import StageRun, check_shard_files, run_stage
from pipeline.stages.teachers import TeacherSource, inspect_teacher, load_teacher
from pipeline.user_errors import user_errors

STAGE = "pseudo-label"


@dataclass(frozen=True, kw_only=True)
class PseudoLabelConfig:
    """One pseudo-label run; the CLI flags map onto it in `pseudo_label_command`."""

    inputs: tuple[str, ...]
    phrases: str
    teacher: str
    out: str
    config: str = "auto"
    policy: FilterPolicy = field(default_factory=lambda: PRESETS["glip"])
    floor: float = 0.05
    min_size: int | None = None  # None: the checkpoint's test size
    max_size: int | None = None
    batch_size: int = 4
    num_gpus: float = 0.0
    cpus_per_worker: float = 1.0
    bf16: bool = False
    phrase_score: str = "mean"  # a phrase's score from its tokens: mean (official) or max
    workers: int | None = None
    address: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.phrase_score not in ("mean", "max"):
            raise ValueError(f"--phrase-score {self.phrase_score!r}: choose mean or max")


@dataclass
class _Item:
    """One input sample on its way through a shard."""

    index: int
    row: DetectionRow
    image_bytes: bytes | None = None
    image: object | None = None  # PIL RGB when decoded
    degenerate_boxes: int = 0  # boxes under 1 px wide or high, dropped by the predictor


class PseudoLabelWorker:
    """Grounds one shard per call; holds the teacher model for the actor's lifetime."""

    def __init__(self, *, config: PseudoLabelConfig, source: TeacherSource) -> None:
        import torch

        device = "cuda" if config.num_gpus > 0 else "cpu"
        if device == "cpu":
            torch.set_num_threads(max(1, int(config.cpus_per_worker)))
        self.predictor = load_teacher(source, device=device, bf16=config.bf16, phrase_score=config.phrase_score)
        self.config = config
        self.teacher = source.to_dict()
        self.metadata = {
            "stage": STAGE,
            "teacher": json.dumps(self.teacher),
            "floor": str(config.floor),
            "phrase_score": config.phrase_score,
            "policy": json.dumps(config.policy.to_dict()),
        }

    def __call__(self, task: ShardTask) -> ShardReport:
        started = time.perf_counter()
        report = ShardReport(shard_id=task.shard_id, input_uri=task.input_uri, output_uri=task.output_uri)
        phrases = _read_phrases(storage.join(self.config.phrases, f"{task.shard_id}.parquet"))
        rows: list[DetectionRow] = []
        image_bytes: dict[str, bytes] = {}
        tally = MemberTally()
        report.count("degenerate_boxes", 0)
        for items in self._grounded_windows(task, phrases, tally):
            for item in items:
                rows.append(item.row)
                report.count("degenerate_boxes", item.degenerate_boxes)
                if item.image_bytes is not None:
                    image_bytes[item.row.key] = item.image_bytes
        report.count_members(tally.members, tally.ignored)
        kept_samples = select_samples(rows, image_bytes, policy=self.config.policy, teacher=self.teacher, report=report)
        report.written = len(kept_samples)
        report.seconds = round(time.perf_counter() - started, 4)
        detections_uri = storage.join(self.config.out, DETECTIONS, f"{task.shard_id}.parquet")
        metadata = {**self.metadata, "source_shard": task.input_uri, "shard_report": report.to_file_json()}
        write_detections(detections_uri, rows, metadata)
        write_pseudo_tar(task.output_uri, kept_samples)  # last: marks the shard done
        return report

    def _grounded_windows(
        self, task: ShardTask, phrases: dict[str, dict], tally: MemberTally
    ) -> Iterator[list[_Item]]:
        """Windows of samples in input order, the decodable ones grounded (aspect-ratio batches)."""
        batch = self.config.batch_size
        window = 4 * batch
        pending: list[_Item] = []
        for item in _prefetch(_decoded_items(task.input_uri, phrases, tally), depth=2 * window):
            pending.append(item)
            if len(pending) >= window:
                self._ground(pending)
                yield pending
                pending = []
        if pending:
            self._ground(pending)
            yield pending

    def _ground(self, items: list[_Item]) -> None:
        ready = [item for item in items if item.image is not None]
        ready.sort(key=lambda item: (item.row.width / max(item.row.height, 1), item.index))
        batch = self.config.batch_size
        for start in range(0, len(ready), batch):
            chunk = ready[start : start + batch]
            spans = [[(int(p["start"]), int(p["end"])) for p in item.row.phrases or []] for item in chunk]
            results = self.predictor.predict([item.image for item in chunk], [item.row.caption for item in chunk], spans)
            for item, detections in zip(chunk, results):
                above = detections.above(self.config.floor).sorted()
                item.row.boxes = [
                    Box(bbox=tuple(round(float(v), 2) for v in box), score=round(float(score), 4), phrase=int(phrase))
                    for box, score, phrase in zip(
                        above.boxes.tolist(), above.scores.tolist(), above.phrase_ids.tolist()
                    )
                ]
                item.degenerate_boxes = detections.degenerate
                item.image = None  # release the decoded pixels


def _read_phrases(uri: str) -> dict[str, dict]:
    """key -> phrases row of the parse stage's output for this shard."""
    from pipeline.io.phrases_file import read_phrases_file

    if not storage.exists(uri):
        raise FileNotFoundError(f"{uri}: no phrases for this shard (run parse-captions on it first)")
    return {row["key"]: row for row in read_phrases_file(uri).to_pylist()}


def _decoded_items(uri: str, phrases: dict[str, dict], tally: MemberTally) -> Iterator[_Item]:
    """Samples of a shard joined with their phrases, decoded; errors recorded on the row."""
    from pipeline.io.shards import iter_webdataset_samples

    for index, sample in enumerate(iter_webdataset_samples(uri, tally=tally)):
        key = str(sample["__key__"])
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), "")
        entry = phrases.get(key)
        row = DetectionRow(key=key, image_ext=ext)
        item = _Item(index=index, row=row)
        if entry is not None:
            row.caption = entry["caption"] or ""
            row.phrases = entry["phrases"] or []
        if not is_safe_key(key):
            row.error = f"bad_key: {key!r} cannot name a tar member"
        elif not ext:
            row.error = "no_image: the sample has no image member"
        elif entry is None:
            row.error = "no_phrases_row: the key is missing from the phrases file"
        elif entry["error"] is not None:
            row.error = f"caption_error: {entry['error']}"
        elif not row.phrases:
            row.error = "no_phrases: the caption has no groundable phrase"
        if row.error is None:
            data = sample[ext]
            assert isinstance(data, bytes)
            try:
                decoded = decode_rgb(data)
            except ImageDecodeError as error:
                row.error = str(error)
            else:
                item.image, item.image_bytes = decoded.image, data
                row.width, row.height = decoded.width, decoded.height
        yield item


def _prefetch(items: Iterator[_Item], *, depth: int) -> Iterator[_Item]:
    """Run `items` (tar reading + decoding) on a thread, `depth` ahead of the consumer."""
    buffer: queue.Queue = queue.Queue(maxsize=max(1, depth))
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put(done)
        except BaseException as error:  # noqa: BLE001 - re-raised in the consumer
            buffer.put(error)

    thread = threading.Thread(target=produce, name="pseudo-label-decode", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def read_done_report(task: ShardTask, *, out: str) -> ShardReport:
    uri = storage.join(out, DETECTIONS, f"{task.shard_id}.parquet")
    metadata = read_detections_metadata(uri)
    return ShardReport.from_file_json(metadata["shard_report"], task)


def run_pseudo_label(config: PseudoLabelConfig, *, progress_stream: TextIO | None = None) -> dict[str, object]:
    """Run the stage; returns the `_stats.json` dict. An unwritable `--out` raises before the
    teacher is read (`storage.UnwritableOutput`)."""
    found = discover_shards(config.inputs)
    shards = [s for s in found if s.kind == "webdataset"]
    if not shards:
        # The Parquet inputs parse-captions reads hold captions; the images must come as tars.
        parquet = found[0].uri if found else "FILE.parquet"
        raise FileNotFoundError(
            f"no WebDataset .tar shards in {list(config.inputs)}: pseudo-label reads images from tars; "
            f"pack a Parquet of image bytes or paths with `pipeline pack {parquet} --out SHARDS`"
        )
    storage.ensure_writable_folder(config.out)
    if not storage.is_dir(config.phrases):
        raise FileNotFoundError(f"--phrases {config.phrases}: folder not found (the parse-captions output)")
    check_shard_files(shards, config.phrases, suffix=".parquet", flag="--phrases", made_by="parse-captions", stream=progress_stream)
    source = inspect_teacher(config.teacher, config=config.config, min_size=config.min_size, max_size=config.max_size)
    teacher = source.to_dict()
    for folder in (DETECTIONS,):
        _remove_temporaries(storage.join(config.out, folder))
    run = StageRun(
        stage=STAGE,
        out=config.out,
        suffix=".tar",
        marker_dir=storage.join(config.out, PSEUDO),
        overwrite=config.overwrite,
        workers=config.workers,
        address=config.address,
        num_cpus=config.cpus_per_worker,
        num_gpus=config.num_gpus,
    )
    settings = {
        "phrases": config.phrases,
        "config": config.config,
        "floor": config.floor,
        "phrase_score": config.phrase_score,
        "filter": config.policy.to_dict(),
        "min_size": config.min_size,
        "max_size": config.max_size,
        "batch_size": config.batch_size,
        "num_gpus": config.num_gpus,
        "bf16": config.bf16,
    }
    stats = run_stage(
        run,
        shards=shards,
        inputs=config.inputs,
        worker_factory=functools.partial(PseudoLabelWorker, config=config, source=source),
        read_done_report=functools.partial(read_done_report, out=config.out),
        settings=settings,
        versions={"teacher": teacher},  # an object, as in each pseudo sample
        progress_stream=progress_stream,
    )
    return stats


def _remove_temporaries(folder: str) -> None:
    if storage.is_dir(folder):
        for name in storage.list_names(folder):
            if storage.is_temporary_name(name):
                storage.remove(storage.join(folder, name))


@user_errors(FileNotFoundError, ValueError)
def pseudo_label_command(
    inputs: list[str] = typer.Argument(..., help="Image shards (img2dataset WebDataset .tar): files, globs or folders."),
    phrases: str = typer.Option(..., "--phrases", help="parse-captions output folder ({shard}.parquet per shard)."),
    teacher: str = typer.Option(
        ..., "--teacher", help="GLIP checkpoint (official or trained here), or hf:FOLDER of a saved Grounding DINO / OWLv2."
    ),
    out: str = typer.Option(..., "--out", help="Output folder: detections/, pseudo/, _stats.json."),
    config: str = typer.Option("auto", "--config", help="GLIP: auto (from the checkpoint) or glip-t, glip-t-a, glip-l, tiny."),
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
    floor: float = typer.Option(0.05, "--floor", help="Lowest score kept in detections/ (re-filtering cannot go below)."),
    min_size: Optional[int] = typer.Option(None, "--min-size", help="Test-time short side (default: the checkpoint's)."),
    max_size: Optional[int] = typer.Option(None, "--max-size", help="Test-time long-side cap."),
    batch_size: int = typer.Option(4, "--batch-size", min=1, help="Images per forward."),
    num_gpus: float = typer.Option(0.0, "--num-gpus", help="GPUs per actor (1: one actor per GPU; 0: CPU actors)."),
    cpus_per_worker: float = typer.Option(1.0, "--cpus-per-worker", help="CPUs (torch threads) per actor."),
    bf16: bool = typer.Option(False, "--bf16", help="bf16 autocast on CUDA."),
    phrase_score: str = typer.Option(
        "mean", "--phrase-score", help="A phrase's score from its tokens' probabilities: mean (official) or max."
    ),
    workers: Optional[int] = typer.Option(
        None, "--workers", min=1, help="Actors, fixed (default: one per CPU or GPU, more on nodes that join)."
    ),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: embedded local Ray)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo shards whose output exists."),
) -> None:
    """Ground the parsed phrases of every image with a teacher (GLIP, Grounding DINO, OWLv2); write detections and pseudo shards."""
    policy = policy_from_options(
        preset, min_score=min_score, nms_iou=nms_iou, nms_scope=nms_scope, top_k=top_k,
        min_box_frac=min_box_frac, max_box_frac=max_box_frac, keep_empty=keep_empty, policy_file=policy_file,
        assign=assign,
    )
    run_config = PseudoLabelConfig(
        inputs=tuple(inputs), phrases=phrases, teacher=teacher, out=out, config=config, policy=policy,
        floor=floor, min_size=min_size, max_size=max_size, batch_size=batch_size, num_gpus=num_gpus,
        cpus_per_worker=cpus_per_worker, bf16=bf16, phrase_score=phrase_score, workers=workers, address=address,
        overwrite=overwrite,
    )
    stats = run_pseudo_label(run_config)
    print_summary(stats, out)
