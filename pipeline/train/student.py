"""`pipeline train-student`: train a GLIP student on gold + pseudo boxes with Ray Train.

The flags resolve into one `TrainConfig` (its defaults are the configuration's own) that
`pipeline.train.driver.run_training` runs; its module doc gives what a run writes to OUT.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import typer

from pipeline.train.config import (
    CheckpointPolicy,
    DataConfig,
    OptimizerConfig,
    Resources,
    StudentModel,
    TrainConfig,
    Tracking,
)
from pipeline.train.data.specs import AugmentSettings, PseudoWeighting, SourceSpec, TrainDataError
from pipeline.train.driver import TrainingInterrupted, run_training
from pipeline.user_errors import user_errors


# The one source of the defaults: the configuration's own (`pipeline.train.config`).
_RUN = TrainConfig(out="", steps=1)
_MODEL, _DATA, _OPT, _RES, _CKPT, _TRACK = _RUN.model, _RUN.data, _RUN.optimizer, _RUN.resources, _RUN.checkpoints, _RUN.tracking
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


def student_variant(config: str | None, init: str | None) -> str:
    """The variant to build, checked against `--init` before Ray starts: `auto` (the default
    with `--init`) takes the file's own (our metadata, else the official key layout); a given
    variant the file does not fit is refused in one line naming the variant it holds."""
    from model.weights.checkpoint import CheckpointError, inspect_checkpoint
    from model.config import VARIANTS, get_config

    auto = config in (None, "auto")
    if not auto:
        try:
            asked = get_config(config).name
        except KeyError:
            raise ValueError(f"--config {config!r}: not a variant; choose auto or one of {', '.join(VARIANTS)}") from None
    if init is None:
        return _MODEL.variant if auto else config
    if "://" in init:  # an object-store checkpoint is read by the workers only
        if auto:
            raise ValueError(f"--init {init}: give --config with a checkpoint on an object store (only the workers read it)")
        return config
    try:
        held = inspect_checkpoint(init).config.name
    except CheckpointError:
        if auto:
            raise
        inspect_checkpoint(init, config=config)  # a file that names no variant must fit the given one
        return config
    if auto:
        if held not in VARIANTS:
            raise ValueError(f"--init {init} holds a model of a configuration of its own ({held!r}): give --config")
        return held
    if asked != held:
        raise ValueError(f"--init {init} holds a {held} model, not --config {config}: leave --config out (auto) to train a {held}")
    return config


def default_pseudo_per_step(sources: tuple[SourceSpec, ...], *, batch_size: int, mix: list[str]) -> int:
    """Paired batches (as many pseudo images as gold ones per step) when both kinds are given
    and no --mix weight asks for mixing by weight; else 0 (one mixed stream)."""
    kinds = {spec.kind for spec in sources}
    if "pseudo" in kinds and kinds - {"pseudo"} and not mix:
        return batch_size
    return 0


@user_errors(ValueError, FileNotFoundError, FileExistsError, TrainingInterrupted)
def train_student(
    out: str = typer.Option(..., "--out", help="Output folder (or s3:// URI) for checkpoints and the student."),
    config: Optional[str] = typer.Option(
        None, "--config",
        help=f"Student variant: glip-l, glip-t, glip-t-a, tiny, tiny-mnv2, or auto: the variant the --init checkpoint holds "
        f"(the default with --init; {_MODEL.variant} without).",
    ),
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
    batch_size: int = typer.Option(_DATA.batch_size, "--batch-size", help="Images per worker per step (the gold images with --pseudo-per-step)."),
    pseudo_per_step: Optional[int] = typer.Option(
        None, "--pseudo-per-step",
        help="Pseudo images added to each step's --batch-size gold images, per worker (Unbiased/Soft Teacher batches: the gold "
        "part is what a gold-only run with the same seed draws). Default: --batch-size when both --pseudo and gold data are "
        "given (paired batches, the demo's recipe), else 0. 0: every source mixed into the batch by its --mix weight.",
    ),
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
    max_failures: int = typer.Option(
        _RUN.max_failures, "--max-failures", min=-1,
        help="Worker-group failures (a node or worker lost, an error in a worker) restarted from the last checkpoint "
        "before the run stops; 0: stop at the first (then --resume), -1: no limit.",
    ),
    workers: int = typer.Option(_RES.workers, "--workers", help="Ray Train workers (DDP)."),
    use_gpu: bool = typer.Option(_RES.use_gpu, "--use-gpu", help="One GPU per worker."),
    cpus_per_worker: Optional[int] = typer.Option(None, help="CPUs per worker (default: all cores / workers locally, 4 with GPUs)."),
    bf16: bool = typer.Option(_RES.bf16, "--bf16/--no-bf16", help="bf16 autocast on CUDA."),
    grad_checkpointing: bool = typer.Option(_MODEL.grad_checkpointing, "--grad-checkpointing", help="Recompute activations (Swin-L)."),
    freeze_text: bool = typer.Option(
        _MODEL.freeze_text, "--freeze-text",
        help="Keep the text encoder's weights fixed (MODEL.LANGUAGE_BACKBONE.FREEZE); fusion layers still train.",
    ),
    freeze_backbone: bool = typer.Option(
        _MODEL.freeze_backbone, "--freeze-backbone",
        help="Keep the visual body's weights fixed (MODEL.BACKBONE.FREEZE); the FPN and the head still train.",
    ),
    regularisers: str = typer.Option(
        _MODEL.regularisers, "--regularisers",
        help="official: the variant's dropouts, Swin drop path and FPN DropBlock (docs/training-recipe.md); off: none (parity runs).",
    ),
    drop_path: Optional[float] = typer.Option(None, "--drop-path", help="Swin stochastic depth rate (official: 0.2 GLIP-T, 0.4 GLIP-L)."),
    text_dropout: Optional[float] = typer.Option(
        None, "--text-dropout", help="BERT hidden and attention dropout, text encoder and the head's BERT layers (official 0.1)."
    ),
    fusion_dropout: Optional[float] = typer.Option(None, "--fusion-dropout", help="Dropout on the fusion's attention maps (official 0.1)."),
    drop_block: Optional[float] = typer.Option(
        None, "--drop-block", help="FPN DropBlock probability, block 3 (official 0.3; the tiny variants 0)."
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
    pseudo_prompt: str = typer.Option(
        _PSEUDO.prompt, "--pseudo-prompt",
        help="caption: pseudo samples keep their caption as the prompt; names: each box's phrase becomes its head noun and the "
        "prompt lists class names with negatives from other pseudo samples (OWL-ST, GLIP's od_to_grounding).",
    ),
    pseudo_known_weight: float = typer.Option(
        _PSEUDO.known_weight, "--pseudo-known-weight",
        help="Weight of a pseudo box whose name (its phrase's head noun) the gold sources already name; 0 ignores it: "
        "gold teaches those words with clean boxes.",
    ),
    augment: str = typer.Option(
        "weak", "--augment", help="weak (resize + flip, official) or strong (+ scale jitter, box-keeping crop, cutout; Noisy Student)."
    ),
    tensorboard: bool = typer.Option(
        _TRACK.tensorboard, "--tensorboard/--no-tensorboard", help="TensorBoard event files of every logged scalar in OUT/tensorboard/."
    ),
    mlflow_uri: Optional[str] = typer.Option(
        None, "--mlflow-uri",
        help="Also log the scalars, the configuration and the final checkpoint's path to this MLflow tracking URI "
        "(http://HOST:5000, file:///path/mlruns); needs the mlflow extra.",
    ),
    mlflow_experiment: str = typer.Option(_TRACK.mlflow_experiment, "--mlflow-experiment", help="MLflow experiment name."),
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
    variant = student_variant(config, init)
    if pseudo_per_step is None:
        pseudo_per_step = default_pseudo_per_step(sources, batch_size=batch_size, mix=mix)
    total_steps = steps if steps is not None else steps_for_epochs(
        epochs, sources, batch_size=batch_size + pseudo_per_step, workers=workers
    )
    if cpus_per_worker is None:
        cpus_per_worker = 4 if use_gpu else max(1, (os.cpu_count() or 1) // workers)
    train_config = TrainConfig(
        out=out,
        steps=total_steps,
        seed=seed,
        log_every=log_every,
        max_failures=max_failures,
        model=StudentModel(
            variant=variant, init=init, init_text=init_text, init_backbone=init_backbone, freeze_text=freeze_text,
            freeze_backbone=freeze_backbone, grad_checkpointing=grad_checkpointing, regularisers=regularisers,
            drop_path=drop_path, text_dropout=text_dropout, fusion_dropout=fusion_dropout, drop_block=drop_block,
        ),
        data=DataConfig(
            sources=sources,
            batch_size=batch_size,
            pseudo_per_step=pseudo_per_step,
            augment=AugmentSettings(
                min_sizes=tuple(min_size) if min_size else _AUG.min_sizes, max_size=max_size, **augment_options(augment)
            ),
            pseudo=PseudoWeighting(
                score_weight=pseudo_score_weight, ignore_below=pseudo_ignore_below, background_weight=pseudo_background_weight,
                prompt=pseudo_prompt, known_weight=pseudo_known_weight,
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
        tracking=Tracking(tensorboard=tensorboard, mlflow_uri=mlflow_uri, mlflow_experiment=mlflow_experiment),
    )
    outcome = run_training(train_config, resume=resume, address=address)
    typer.echo(f"student: {outcome.student} ({outcome.steps} steps, final loss {outcome.final_loss})")
