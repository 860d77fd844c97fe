"""`pipeline train-student`: train a GLIP student on gold + pseudo boxes with Ray Train.

The driver resolves the flags into one `TrainConfig`, starts (or joins) Ray, and runs
`pipeline.train_loop.train_worker` under a `TorchTrainer`: one CPU worker locally by default,
`--workers N --use-gpu` on a cluster (DDP; bf16 autocast and optional gradient checkpointing
on GPUs). Checkpoints are reported through `ray.train.report` into `OUT/ray/run/` (a local
folder or an object-store URI); `--resume` re-attaches to that run, and Ray Train hands the
latest checkpoint back to the workers. At the end the last checkpoint's `model.pth` (official
GLIP layout + metadata, loadable by `pipeline ground`/`pseudo-label`/`eval`) is copied to
`OUT/student.pth`, and `OUT/_stats.json` records the run.

Layout of OUT:
    student.pth            final weights (official layout)
    metrics.jsonl          one line per logged step (loss terms, lr, samples/s)
    train_config.json      the resolved configuration
    _stats.json            steps, throughput, skipped samples, final loss
    ray/run/checkpoint_*/  model.pth, train_state.pt, rank_{r}.pt
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

if TYPE_CHECKING:  # the heavy modules (torch, ray) load inside the command
    from pipeline.train_data import SourceSpec
    from pipeline.train_loop import TrainConfig

RUN_NAME = "run"
STUDENT_FILE = "student.pth"
_SNAPSHOT = "checkpoint_manager_snapshot.json"


class TrainingInterrupted(RuntimeError):
    """The run stopped before its last step; its checkpoints allow `--resume`."""


@dataclass(frozen=True)
class TrainOutcome:
    """Where a finished run left its results."""

    student: str
    checkpoint: str
    steps: int
    final_loss: float | None


def _storage(out: str) -> str:
    return f"{out.rstrip('/')}/ray" if "://" in out else str(Path(out).resolve() / "ray")


def _exists(uri: str) -> bool:
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    return fs.exists(path)


def _absolute(path: str | None) -> str | None:
    """Local paths made absolute (Ray Train workers do not run in the caller's directory)."""
    if not path or "://" in path:
        return path
    return os.path.abspath(path)


def with_absolute_paths(config: TrainConfig) -> TrainConfig:
    sources = tuple(
        dataclasses.replace(
            spec,
            paths=tuple(_absolute(p) for p in spec.paths),
            images=_absolute(spec.images) or "",
            label_map=_absolute(spec.label_map),
        )
        for spec in config.sources
    )
    backbone = config.init_backbone if config.init_backbone == "imagenet" else _absolute(config.init_backbone)
    return dataclasses.replace(
        config, out=_absolute(config.out), sources=sources, init=_absolute(config.init), init_backbone=backbone
    )


def run_training(config: TrainConfig, *, resume: bool = False, address: str | None = None) -> TrainOutcome:
    """Train (or continue, with `resume`) the run in `config.out`; returns the final weights."""
    config = with_absolute_paths(config)
    import fsspec
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.cluster import init_ray, shutdown_ray
    from pipeline.train_loop import train_worker

    out = config.out
    storage = _storage(out)
    snapshot = f"{storage}/{RUN_NAME}/{_SNAPSHOT}"
    if resume and not _exists(snapshot):
        raise FileNotFoundError(f"--resume: {out} holds no run to resume (no {snapshot})")
    if not resume and _exists(snapshot):
        raise FileExistsError(f"{out} already holds a training run: continue it with --resume, or use a new --out")
    fs, out_path = fsspec.core.url_to_fs(out)
    fs.makedirs(out_path, exist_ok=True)
    if resume:
        _check_resumable(fs, f"{out_path}/train_config.json", config)
    with fs.open(f"{out_path}/train_config.json", "w") as handle:
        json.dump(config.to_dict(), handle, indent=2)

    # Embedded loopback-only Ray unless --address. Ray Train's controller watchdog polls the
    # state API, which lives in the dashboard: without it every poll logs a warning.
    started_ray = init_ray(address, include_dashboard=True)
    started = time.time()
    try:
        trainer = TorchTrainer(
            train_worker,
            train_loop_config=config.to_dict(),
            torch_config=TorchConfig(backend="nccl" if config.use_gpu else "gloo"),
            scaling_config=ScalingConfig(
                num_workers=config.workers,
                use_gpu=config.use_gpu,
                resources_per_worker={"CPU": config.cpus_per_worker, **({"GPU": 1} if config.use_gpu else {})},
            ),
            run_config=RunConfig(
                name=RUN_NAME,
                storage_path=storage,
                checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
                failure_config=FailureConfig(max_failures=0),
            ),
        )
        try:
            result = trainer.fit()
        except TrainingFailedError as exc:
            raise TrainingInterrupted(
                f"training stopped before step {config.steps}: {exc}\n"
                f"its last checkpoint is under {storage}/{RUN_NAME}; continue with --resume"
            ) from exc
    finally:
        shutdown_ray(started_ray)
    if result.checkpoint is None:
        raise TrainingInterrupted(f"the run in {out} reported no checkpoint")
    from pipeline.train_loop import MODEL_FILE

    student = f"{out_path}/{STUDENT_FILE}"
    with result.checkpoint.as_directory() as directory:
        fs.put_file(str(Path(directory) / MODEL_FILE), student + ".tmp")
        fs.mv(student + ".tmp", student)
    metrics = result.metrics or {}
    _write_stats(fs, out_path, config, metrics, result.checkpoint.path, time.time() - started)
    return TrainOutcome(
        student=student if "://" not in out else f"{out.rstrip('/')}/{STUDENT_FILE}",
        checkpoint=result.checkpoint.path,
        steps=int(metrics.get("step", config.steps)),
        final_loss=metrics.get("loss"),
    )


# Settings that must not change when a run is resumed (the rest, e.g. logging, may).
_RESUME_KEYS = (
    "variant", "steps", "batch_size", "workers", "seed", "sources", "min_sizes", "max_size", "schedule", "init",
    "init_backbone", "pseudo_score_weight", "pseudo_ignore_below", "pseudo_background_weight", "crop_probability",
    "cutout_probability", "scale_jitter",
)


def _check_resumable(fs, path: str, config: TrainConfig) -> None:
    if not fs.exists(path):
        return
    with fs.open(path, "r") as handle:
        previous = json.load(handle)
    current = json.loads(json.dumps(config.to_dict()))
    changed = [key for key in _RESUME_KEYS if previous.get(key) != current.get(key)]
    if changed:
        details = ", ".join(f"{k}: {previous.get(k)!r} -> {current.get(k)!r}" for k in changed)
        raise ValueError(f"--resume: these settings differ from the interrupted run ({path}): {details}")


def _write_stats(fs, out_path: str, config: TrainConfig, metrics: dict, checkpoint: str, seconds: float) -> None:
    from pipeline.train_loop import METRICS_FILE

    lines = []
    metrics_path = f"{out_path}/{METRICS_FILE}"
    if fs.exists(metrics_path):
        with fs.open(metrics_path, "r") as handle:
            lines = [json.loads(line) for line in handle if line.strip()]
    rates = [line["samples_per_s"] for line in lines[1:]] or [line["samples_per_s"] for line in lines]
    stats = {
        "stage": "train-student",
        "variant": config.variant,
        "inputs": [s.name for s in config.sources],
        "steps": int(metrics.get("step", config.steps)),
        "samples": int(metrics.get("step", config.steps)) * config.batch_size * config.workers,
        "final_loss": metrics.get("loss"),
        "skipped_samples": metrics.get("skipped_samples", 0),
        "samples_by_source_worker0": {k[len("samples_"):]: v for k, v in metrics.items() if k.startswith("samples_")},
        "samples_per_s": sum(rates) / len(rates) if rates else None,
        "wall_s_this_session": seconds,
        "workers": config.workers,
        "use_gpu": config.use_gpu,
        "checkpoint": checkpoint,
        "student": f"{out_path}/{STUDENT_FILE}",
        "config": config.to_dict(),
    }
    with fs.open(f"{out_path}/_stats.json", "w") as handle:
        json.dump(stats, handle, indent=2)


# -- CLI ----------------------------------------------------------------------------------


def build_sources(
    *,
    pseudo: list[str],
    coco: list[str],
    grounding: list[str],
    odvg: list[str],
    images: str | None,
    coco_images: str | None = None,
    grounding_images: str | None = None,
    odvg_images: str | None = None,
    odvg_label_map: str | None = None,
    mix: list[str] = (),
) -> tuple[SourceSpec, ...]:
    """SourceSpecs of the data flags; `mix` entries are KIND=WEIGHT (default weight 1)."""
    from pipeline.train_data import SourceSpec, TrainDataError

    weights: dict[str, float] = {}
    for entry in mix:
        kind, _, value = entry.partition("=")
        try:
            weights[kind.strip()] = float(value)
        except ValueError:
            raise TrainDataError(f"--mix {entry!r}: expected KIND=WEIGHT, e.g. pseudo=2") from None
    specs: list[SourceSpec] = []
    if pseudo:
        specs.append(SourceSpec(kind="pseudo", paths=tuple(pseudo), weight=weights.get("pseudo", 1.0)))
    for kind, files, folder in (
        ("coco", coco, coco_images or images),
        ("grounding", grounding, grounding_images or images),
        ("odvg", odvg, odvg_images or images),
    ):
        for path in files:
            specs.append(
                SourceSpec(
                    kind=kind, paths=(path,), images=folder or "", weight=weights.get(kind, 1.0),
                    label_map=odvg_label_map if kind == "odvg" else None,
                )
            )
    unknown = set(weights) - {s.kind for s in specs}
    if unknown:
        raise TrainDataError(f"--mix names {sorted(unknown)} but no such data was given")
    return tuple(specs)


# `--augment strong`: the student's noise (Noisy Student); colours are never jittered (labels).
AUGMENT_PRESETS = {
    "weak": {"crop_probability": 0.0, "cutout_probability": 0.0, "scale_jitter": 0.0},
    "strong": {"crop_probability": 0.5, "cutout_probability": 0.5, "scale_jitter": 0.25},
}


def augment_options(name: str) -> dict[str, float]:
    if name not in AUGMENT_PRESETS:
        raise ValueError(f"--augment {name!r}: choose one of {', '.join(AUGMENT_PRESETS)}")
    return dict(AUGMENT_PRESETS[name])


def steps_for_epochs(epochs: float, sources: tuple[SourceSpec, ...], *, batch_size: int, workers: int) -> int:
    from pipeline.train_data import count_samples

    total = sum(count_samples(spec) for spec in sources)
    return max(1, math.ceil(epochs * total / (batch_size * workers)))


def train_student(
    out: str = typer.Option(..., "--out", help="Output folder (or s3:// URI) for checkpoints and the student."),
    config: str = typer.Option("tiny", "--config", help="Student variant: glip-l, glip-t, glip-t-a or tiny."),
    pseudo: list[str] = typer.Option([], "--pseudo", help="Pseudo shard folder or tar (repeatable)."),
    coco: list[str] = typer.Option([], "--coco", help="COCO detection JSON (repeatable)."),
    grounding: list[str] = typer.Option([], "--grounding", help="MDETR/GoldG grounding JSON (repeatable)."),
    odvg: list[str] = typer.Option([], "--odvg", help="ODVG JSONL (repeatable)."),
    images: Optional[str] = typer.Option(None, "--images", help="Image folder of the gold annotation files."),
    coco_images: Optional[str] = typer.Option(None, help="Image folder of --coco files (default: --images)."),
    grounding_images: Optional[str] = typer.Option(None, help="Image folder of --grounding files (default: --images)."),
    odvg_images: Optional[str] = typer.Option(None, help="Image folder of --odvg files (default: --images)."),
    odvg_label_map: Optional[str] = typer.Option(None, help="JSON {label: name} for ODVG detection lines."),
    mix: list[str] = typer.Option([], "--mix", help="Mixing weight KIND=WEIGHT, e.g. --mix pseudo=3 --mix coco=1."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Passes over all data (instead of --steps)."),
    batch_size: int = typer.Option(2, "--batch-size", help="Images per worker per step."),
    min_size: list[int] = typer.Option([], "--min-size", help="Training short side, repeatable: one drawn per image (default 480..800)."),
    max_size: int = typer.Option(1333, "--max-size", help="Long-side cap."),
    seed: int = typer.Option(0, "--seed"),
    lr: float = typer.Option(1e-4, "--lr", help="Base learning rate (AdamW)."),
    lang_lr: float = typer.Option(1e-5, "--lang-lr", help="Learning rate of the language backbone."),
    weight_decay: float = typer.Option(1e-4, "--weight-decay"),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", help="Linear warm-up steps (default: 5% of the run, at most 2000)."),
    schedule: str = typer.Option("step", "--schedule", help="step (x0.1 at 67% and 89%) or cosine."),
    clip_grad: float = typer.Option(1.0, "--clip-grad", help="Gradient norm clip over the full model."),
    init: Optional[str] = typer.Option(None, "--init", help="Start from this checkpoint (official or ours)."),
    init_text: Optional[str] = typer.Option(None, "--init-text", help="'minilm': real all-MiniLM-L6-v2 text weights (tiny variant)."),
    init_backbone: Optional[str] = typer.Option(
        None, "--init-backbone", help="'imagenet' (or the file's path): ImageNet MobileNetV2 weights for the visual body (tiny-mnv2)."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in --out exactly."),
    workers: int = typer.Option(1, "--workers", help="Ray Train workers (DDP)."),
    use_gpu: bool = typer.Option(False, "--use-gpu", help="One GPU per worker."),
    cpus_per_worker: Optional[int] = typer.Option(None, help="CPUs per worker (default: all cores / workers locally, 4 with GPUs)."),
    bf16: bool = typer.Option(True, "--bf16/--no-bf16", help="bf16 autocast on CUDA."),
    grad_checkpointing: bool = typer.Option(False, "--grad-checkpointing", help="Recompute activations (Swin-L)."),
    freeze_text: bool = typer.Option(
        False, "--freeze-text", help="Keep the text encoder's weights fixed (MODEL.LANGUAGE_BACKBONE.FREEZE); fusion layers still train."
    ),
    checkpoint_every: int = typer.Option(500, "--checkpoint-every", help="Steps between checkpoints."),
    keep_checkpoints: Optional[int] = typer.Option(3, "--keep-checkpoints", help="Checkpoints kept (latest)."),
    log_every: int = typer.Option(10, "--log-every", help="Steps between progress lines."),
    loader_threads: int = typer.Option(2, "--loader-threads", help="Decode/augment threads per worker."),
    negatives: int = typer.Option(8, "--negatives", help="Most other-sample phrases appended to a caption as negatives."),
    pseudo_score_weight: bool = typer.Option(
        False, "--pseudo-score-weight/--no-pseudo-score-weight",
        help="Scale a pseudo box's classification loss by its teacher score (Soft Teacher).",
    ),
    pseudo_ignore_below: float = typer.Option(
        0.0, "--pseudo-ignore-below",
        help="Pseudo boxes scoring under T are ignored: their anchors are neither positive nor negative (filter at a lower floor to keep them).",
    ),
    pseudo_background_weight: float = typer.Option(
        1.0, "--pseudo-background-weight", help="Weight of the background (negative) loss in pseudo images (0..1)."
    ),
    augment: str = typer.Option(
        "weak", "--augment", help="weak (resize + flip, official) or strong (+ scale jitter, box-keeping crop, cutout; Noisy Student)."
    ),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: embedded local Ray)."),
) -> None:
    """Train a GLIP student on gold grounding/detection data plus pseudo-label shards."""
    from model.train_targets import TRAIN_MIN_SIZES
    from pipeline.train_data import TrainDataError
    from pipeline.train_loop import TrainConfig

    if (steps is None) == (epochs is None):
        raise typer.BadParameter("give exactly one of --steps N or --epochs N")
    try:
        sources = build_sources(
            pseudo=pseudo, coco=coco, grounding=grounding, odvg=odvg, images=images,
            coco_images=coco_images, grounding_images=grounding_images, odvg_images=odvg_images,
            odvg_label_map=odvg_label_map, mix=mix,
        )
        if not sources:
            raise TrainDataError("no training data: give --pseudo, --coco, --grounding or --odvg")
        total_steps = steps if steps is not None else steps_for_epochs(epochs, sources, batch_size=batch_size, workers=workers)
        if cpus_per_worker is None:
            cpus_per_worker = 4 if use_gpu else max(1, (os.cpu_count() or 1) // workers)
        train_config = TrainConfig(
            variant=config,
            out=out,
            sources=sources,
            steps=total_steps,
            batch_size=batch_size,
            min_sizes=tuple(min_size) if min_size else TRAIN_MIN_SIZES,
            max_size=max_size,
            seed=seed,
            lr=lr,
            lang_lr=lang_lr,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps if warmup_steps is not None else min(2000, total_steps // 20),
            schedule=schedule,
            clip_grad_norm=clip_grad,
            init=init,
            init_text=init_text,
            init_backbone=init_backbone,
            workers=workers,
            use_gpu=use_gpu,
            cpus_per_worker=cpus_per_worker,
            bf16=bf16,
            grad_checkpointing=grad_checkpointing,
            freeze_text=freeze_text,
            checkpoint_every=checkpoint_every,
            keep_checkpoints=keep_checkpoints,
            log_every=log_every,
            loader_threads=loader_threads,
            max_negative_phrases=negatives,
            pseudo_score_weight=pseudo_score_weight,
            pseudo_ignore_below=pseudo_ignore_below,
            pseudo_background_weight=pseudo_background_weight,
            **augment_options(augment),
        )
        outcome = run_training(train_config, resume=resume, address=address)
    except (TrainDataError, ValueError, FileNotFoundError, FileExistsError, TrainingInterrupted) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    typer.echo(f"student: {outcome.student} ({outcome.steps} steps, final loss {outcome.final_loss})")
