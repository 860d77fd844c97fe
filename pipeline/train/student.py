"""`pipeline train-student`: train a GLIP student on gold + pseudo boxes with Ray Train.

The driver resolves the flags into one `TrainConfig`, starts (or joins) Ray, and runs
`pipeline.train.loop.train_worker` under a `TorchTrainer`: one CPU worker locally by default,
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
from typing import Optional

import typer

from pipeline.io import storage
from pipeline.train.config import (
    CheckpointPolicy,
    DataConfig,
    OptimizerConfig,
    Resources,
    StudentModel,
    TrainConfig,
    setting,
)
from pipeline.train.data.specs import AugmentSettings, PseudoWeighting, SourceSpec, TrainDataError
from pipeline.user_errors import first_line, user_errors

RUN_NAME = "run"
STUDENT_FILE = "student.pth"
CONFIG_FILE = "train_config.json"
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
        for spec in config.data.sources
    )
    model = config.model
    backbone = model.init_backbone if model.init_backbone == "imagenet" else _absolute(model.init_backbone)
    return dataclasses.replace(
        config,
        out=_absolute(config.out),
        data=dataclasses.replace(config.data, sources=sources),
        model=dataclasses.replace(model, init=_absolute(model.init), init_backbone=backbone),
    )


def _worker_error(error: BaseException) -> str:
    """The worker's exception line of a Ray Train failure (its message ends with the traceback)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def run_training(config: TrainConfig, *, resume: bool = False, address: str | None = None) -> TrainOutcome:
    """Train (or continue, with `resume`) the run in `config.out`; returns the final weights."""
    config = with_absolute_paths(config)
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.cluster import init_ray, shutdown_ray
    from pipeline.train.loop import train_worker

    out, storage_path = config.out, _storage(config.out)
    snapshot = f"{storage_path}/{RUN_NAME}/{_SNAPSHOT}"
    if resume and not storage.exists(snapshot):
        raise FileNotFoundError(f"--resume: {out} holds no run to resume (no {snapshot})")
    if not resume and storage.exists(snapshot):
        raise FileExistsError(f"{out} already holds a training run: continue it with --resume, or use a new --out")
    storage.makedirs(out)
    if resume:
        _check_resumable(storage.join(out, CONFIG_FILE), config)
    storage.write_atomic(storage.join(out, CONFIG_FILE), json.dumps(config.to_dict(), indent=2).encode("utf-8"))

    # Embedded loopback-only Ray unless --address. Ray Train's controller watchdog polls the
    # state API, which lives in the dashboard: without it every poll logs a warning.
    started_ray = init_ray(address, include_dashboard=True)
    started = time.time()
    resources = config.resources
    try:
        trainer = TorchTrainer(
            train_worker,
            train_loop_config=config.to_dict(),
            torch_config=TorchConfig(backend="nccl" if resources.use_gpu else "gloo"),
            scaling_config=ScalingConfig(
                num_workers=resources.workers,
                use_gpu=resources.use_gpu,
                resources_per_worker={"CPU": resources.cpus_per_worker, **({"GPU": 1} if resources.use_gpu else {})},
            ),
            run_config=RunConfig(
                name=RUN_NAME,
                storage_path=storage_path,
                checkpoint_config=CheckpointConfig(num_to_keep=config.checkpoints.keep),
                failure_config=FailureConfig(max_failures=0),
            ),
        )
        try:
            result = trainer.fit()
        except TrainingFailedError as exc:
            raise TrainingInterrupted(
                f"training stopped before step {config.steps}: {_worker_error(exc)}; "
                f"its last checkpoint is under {storage_path}/{RUN_NAME}: continue with --resume"
            ) from exc
    finally:
        shutdown_ray(started_ray)
    if result.checkpoint is None:
        raise TrainingInterrupted(f"the run in {out} reported no checkpoint")
    return _finish(config, result, time.time() - started)


def _finish(config: TrainConfig, result, seconds: float) -> TrainOutcome:
    """Copy the last checkpoint's weights to OUT/student.pth and write OUT/_stats.json."""
    from pipeline.train.checkpoints import MODEL_FILE

    student = storage.join(config.out, STUDENT_FILE)
    with result.checkpoint.as_directory() as directory, open(Path(directory) / MODEL_FILE, "rb") as source:
        with storage.atomic_writer(student) as handle:
            while chunk := source.read(16 << 20):
                handle.write(chunk)
    metrics = result.metrics or {}
    _write_stats(config, metrics, result.checkpoint.path, seconds)
    return TrainOutcome(
        student=student,
        checkpoint=result.checkpoint.path,
        steps=int(metrics.get("step", config.steps)),
        final_loss=metrics.get("loss"),
    )


# Settings that must not change when a run is resumed (the rest, e.g. logging, may).
_RESUME_KEYS = (
    "model.variant", "steps", "data.batch_size", "resources.workers", "seed", "data.sources",
    "data.augment.min_sizes", "data.augment.max_size", "optimizer.schedule", "model.init", "model.init_backbone",
    "data.pseudo.score_weight", "data.pseudo.ignore_below", "data.pseudo.background_weight",
    "data.augment.crop_probability", "data.augment.cutout_probability", "data.augment.scale_jitter",
)


def _check_resumable(path: str, config: TrainConfig) -> None:
    if not storage.exists(path):
        return
    previous = json.loads(storage.read_bytes(path))
    try:
        TrainConfig.from_dict(previous)
    except (TypeError, ValueError) as error:
        raise ValueError(f"--resume: {path} is not a configuration this version reads ({first_line(error)})") from None
    current = json.loads(json.dumps(config.to_dict()))
    changed = [key for key in _RESUME_KEYS if setting(previous, key) != setting(current, key)]
    if changed:
        details = ", ".join(f"{k}: {setting(previous, k)!r} -> {setting(current, k)!r}" for k in changed)
        raise ValueError(f"--resume: these settings differ from the interrupted run ({path}): {details}")


def _write_stats(config: TrainConfig, metrics: dict, checkpoint: str, seconds: float) -> None:
    from pipeline.train.loop import METRICS_FILE

    lines = []
    metrics_path = storage.join(config.out, METRICS_FILE)
    if storage.exists(metrics_path):
        lines = [json.loads(line) for line in storage.read_bytes(metrics_path).decode("utf-8").splitlines() if line.strip()]
    rates = [line["samples_per_s"] for line in lines[1:]] or [line["samples_per_s"] for line in lines]
    steps = int(metrics.get("step", config.steps))
    stats = {
        "stage": "train-student",
        "variant": config.model.variant,
        "inputs": [s.name for s in config.data.sources],
        "steps": steps,
        "samples": steps * config.data.batch_size * config.resources.workers,
        "final_loss": metrics.get("loss"),
        "skipped_samples": metrics.get("skipped_samples", 0),
        "samples_by_source_worker0": {k[len("samples_"):]: v for k, v in metrics.items() if k.startswith("samples_")},
        "samples_per_s": sum(rates) / len(rates) if rates else None,
        "wall_s_this_session": seconds,
        "workers": config.resources.workers,
        "use_gpu": config.resources.use_gpu,
        "checkpoint": checkpoint,
        "student": storage.join(config.out, STUDENT_FILE),
        "config": config.to_dict(),
    }
    storage.write_atomic(storage.join(config.out, "_stats.json"), json.dumps(stats, indent=2).encode("utf-8"))


# -- CLI ----------------------------------------------------------------------------------

# The one source of the defaults: the configuration's own (`pipeline.train.config`).
_RUN = TrainConfig(out="", steps=1)
_MODEL, _DATA, _OPT, _RES, _CKPT = _RUN.model, _RUN.data, _RUN.optimizer, _RUN.resources, _RUN.checkpoints
_AUG, _PSEUDO = _DATA.augment, _DATA.pseudo


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
    "weak": {"crop_probability": _AUG.crop_probability, "cutout_probability": _AUG.cutout_probability, "scale_jitter": _AUG.scale_jitter},
    "strong": {"crop_probability": 0.5, "cutout_probability": 0.5, "scale_jitter": 0.25},
}


def augment_options(name: str) -> dict[str, float]:
    if name not in AUGMENT_PRESETS:
        raise ValueError(f"--augment {name!r}: choose one of {', '.join(AUGMENT_PRESETS)}")
    return dict(AUGMENT_PRESETS[name])


def steps_for_epochs(epochs: float, sources: tuple[SourceSpec, ...], *, batch_size: int, workers: int) -> int:
    from pipeline.train.data.mixing import count_samples

    total = sum(count_samples(spec) for spec in sources)
    return max(1, math.ceil(epochs * total / (batch_size * workers)))


@user_errors(ValueError, FileNotFoundError, FileExistsError, TrainingInterrupted)
def train_student(
    out: str = typer.Option(..., "--out", help="Output folder (or s3:// URI) for checkpoints and the student."),
    config: str = typer.Option(_MODEL.variant, "--config", help="Student variant: glip-l, glip-t, glip-t-a or tiny."),
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
    batch_size: int = typer.Option(_DATA.batch_size, "--batch-size", help="Images per worker per step."),
    min_size: list[int] = typer.Option(
        [], "--min-size",
        help=f"Training short side, repeatable: one drawn per image (default {'/'.join(map(str, _AUG.min_sizes))}).",
    ),
    max_size: int = typer.Option(_AUG.max_size, "--max-size", help="Long-side cap."),
    seed: int = typer.Option(_RUN.seed, "--seed"),
    lr: float = typer.Option(_OPT.lr, "--lr", help="Base learning rate (AdamW)."),
    lang_lr: float = typer.Option(_OPT.lang_lr, "--lang-lr", help="Learning rate of the language backbone."),
    weight_decay: float = typer.Option(_OPT.weight_decay, "--weight-decay"),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", help="Linear warm-up steps (default: 5% of the run, at most 2000)."),
    schedule: str = typer.Option(_OPT.schedule, "--schedule", help="step (x0.1 at 67% and 89%) or cosine."),
    clip_grad: float = typer.Option(_OPT.clip_grad_norm, "--clip-grad", help="Gradient norm clip over the full model."),
    init: Optional[str] = typer.Option(None, "--init", help="Start from this checkpoint (official or ours)."),
    init_text: Optional[str] = typer.Option(None, "--init-text", help="'minilm': real all-MiniLM-L6-v2 text weights (tiny variant)."),
    init_backbone: Optional[str] = typer.Option(
        None, "--init-backbone", help="'imagenet' (or the file's path): ImageNet MobileNetV2 weights for the visual body (tiny-mnv2)."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in --out exactly."),
    workers: int = typer.Option(_RES.workers, "--workers", help="Ray Train workers (DDP)."),
    use_gpu: bool = typer.Option(_RES.use_gpu, "--use-gpu", help="One GPU per worker."),
    cpus_per_worker: Optional[int] = typer.Option(None, help="CPUs per worker (default: all cores / workers locally, 4 with GPUs)."),
    bf16: bool = typer.Option(_RES.bf16, "--bf16/--no-bf16", help="bf16 autocast on CUDA."),
    grad_checkpointing: bool = typer.Option(_MODEL.grad_checkpointing, "--grad-checkpointing", help="Recompute activations (Swin-L)."),
    freeze_text: bool = typer.Option(
        _MODEL.freeze_text, "--freeze-text",
        help="Keep the text encoder's weights fixed (MODEL.LANGUAGE_BACKBONE.FREEZE); fusion layers still train.",
    ),
    checkpoint_every: int = typer.Option(_CKPT.every, "--checkpoint-every", help="Steps between checkpoints."),
    keep_checkpoints: Optional[int] = typer.Option(_CKPT.keep, "--keep-checkpoints", help="Checkpoints kept (latest)."),
    log_every: int = typer.Option(_RUN.log_every, "--log-every", help="Steps between progress lines."),
    loader_threads: int = typer.Option(_DATA.loader_threads, "--loader-threads", help="Decode/augment threads per worker."),
    negatives: int = typer.Option(_DATA.max_negative_phrases, "--negatives", help="Most other-sample phrases appended to a caption as negatives."),
    pseudo_score_weight: bool = typer.Option(
        _PSEUDO.score_weight, "--pseudo-score-weight/--no-pseudo-score-weight",
        help="Scale a pseudo box's classification loss by its teacher score (Soft Teacher).",
    ),
    pseudo_ignore_below: float = typer.Option(
        _PSEUDO.ignore_below, "--pseudo-ignore-below",
        help="Pseudo boxes scoring under T are ignored: their anchors are neither positive nor negative (filter at a lower floor to keep them).",
    ),
    pseudo_background_weight: float = typer.Option(
        _PSEUDO.background_weight, "--pseudo-background-weight", help="Weight of the background (negative) loss in pseudo images (0..1)."
    ),
    augment: str = typer.Option(
        "weak", "--augment", help="weak (resize + flip, official) or strong (+ scale jitter, box-keeping crop, cutout; Noisy Student)."
    ),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: embedded local Ray)."),
) -> None:
    """Train a GLIP student on gold grounding/detection data plus pseudo-label shards."""
    if (steps is None) == (epochs is None):
        raise typer.BadParameter("give exactly one of --steps N or --epochs N")
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
        out=out,
        steps=total_steps,
        seed=seed,
        log_every=log_every,
        model=StudentModel(
            variant=config, init=init, init_text=init_text, init_backbone=init_backbone, freeze_text=freeze_text,
            grad_checkpointing=grad_checkpointing,
        ),
        data=DataConfig(
            sources=sources,
            batch_size=batch_size,
            augment=AugmentSettings(
                min_sizes=tuple(min_size) if min_size else _AUG.min_sizes, max_size=max_size, **augment_options(augment)
            ),
            pseudo=PseudoWeighting(
                score_weight=pseudo_score_weight, ignore_below=pseudo_ignore_below, background_weight=pseudo_background_weight
            ),
            max_negative_phrases=negatives,
            loader_threads=loader_threads,
        ),
        optimizer=OptimizerConfig(
            lr=lr, lang_lr=lang_lr, weight_decay=weight_decay, schedule=schedule, clip_grad_norm=clip_grad,
            warmup_steps=warmup_steps if warmup_steps is not None else min(2000, total_steps // 20),
        ),
        resources=Resources(workers=workers, use_gpu=use_gpu, cpus_per_worker=cpus_per_worker, bf16=bf16),
        checkpoints=CheckpointPolicy(every=checkpoint_every, keep=keep_checkpoints),
    )
    outcome = run_training(train_config, resume=resume, address=address)
    typer.echo(f"student: {outcome.student} ({outcome.steps} steps, final loss {outcome.final_loss})")
