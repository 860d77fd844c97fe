"""The student's training loop, run by every Ray Train worker (`train_worker`).

Official recipe (SPEC section 6, `solver/build.py`, `engine/trainer.py`): AdamW with base LR
1e-4 and a separate LR (1e-5) for every parameter of the language backbone, no weight decay on
biases, a linear warm-up from 1/3 of the LR, then steps (x0.1 at 67% and 89% of training) or a
cosine decay, gradient clipping at norm 1.0 over the full model; bf16 autocast on CUDA.

`StudentTrainer` is one worker's run in four parts: setup (model, optimizer, data stream;
`restore` from a checkpoint), `step` (one optimizer step), `log` (rank 0: `metrics.jsonl`, a
progress line, `progress_line`, and TensorBoard/MLflow scalars, `pipeline.train.tracking`) and `checkpoint` (`pipeline.train.checkpoints`, reported through
`ray.train.report` every `checkpoints.every` steps and at the end), so a resumed run
continues exactly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from model.training.loss import GLIPLoss, total_loss
from pipeline.train.checkpoints import restore_training_checkpoint, save_training_checkpoint
from pipeline.train.config import OptimizerConfig, StudentModel, TrainConfig
from pipeline.train.data.loader import LoadedBatch, TrainLoader
from pipeline.train.data.mixing import make_stream
from pipeline.train.data.specs import paired_sources
from pipeline.train.tracking import RunTracker, step_scalars

METRICS_FILE = "metrics.jsonl"
# The worker's lines go through logging, not print: Ray Train patches print on its workers to
# write both to stdout and to the root logger (whose console handler writes to stderr), and
# Ray forwards both streams, so every printed line reached the driver twice. The root logger
# Ray Train configures writes each record once.
logger = logging.getLogger(__name__)


class SimulatedInterruption(RuntimeError):
    """Raised by `fail_at_step` (fault-injection for resume drills)."""


# -- schedule and optimizer ---------------------------------------------------------------


def lr_factor(step: int, optimizer: OptimizerConfig, *, steps: int) -> float:
    """Multiplier of each group's base LR after `step` of `steps` optimizer steps.

    Warm-up: linear from `warmup_factor` to 1 over `warmup_steps` (WarmupMultiStepLR /
    WarmupCosineAnnealingLR, method "linear"). Step: x`gamma` at each milestone (fractions of
    the run, rounded as the official `round(step * MAX_ITER)`). Cosine: from 1 down to
    `min_lr_ratio` over the steps after warm-up.
    """
    warmup = 1.0
    if step < optimizer.warmup_steps:
        alpha = step / optimizer.warmup_steps
        warmup = optimizer.warmup_factor * (1 - alpha) + alpha
    if optimizer.schedule == "step":
        milestones = [round(m * steps) if m < 1 else int(m) for m in optimizer.milestones]
        return warmup * optimizer.gamma ** sum(step >= m for m in milestones)
    if step < optimizer.warmup_steps:
        return warmup
    span = max(steps - optimizer.warmup_steps, 1)
    progress = min((step - optimizer.warmup_steps) / span, 1.0)
    return optimizer.min_lr_ratio + (1 - optimizer.min_lr_ratio) * (1 + math.cos(math.pi * progress)) / 2


def make_optimizer(model: torch.nn.Module, optimizer: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW with the official parameter groups: `language_backbone` at `lang_lr`, the rest at
    `lr`; biases without weight decay (WEIGHT_DECAY_BIAS 0). Each group carries a `name`
    ("text", "text_no_decay", "model", "model_no_decay": the tracked `lr/<name>` scalars)."""
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        lr = optimizer.lang_lr if "language_backbone" in name else optimizer.lr
        decay = 0.0 if "bias" in name else optimizer.weight_decay
        groups.setdefault((lr, decay), []).append(parameter)

    def group_name(lr: float, decay: float) -> str:  # equal LRs (or decays) share one group
        text = lr == optimizer.lang_lr and optimizer.lang_lr != optimizer.lr
        return ("text" if text else "model") + ("_no_decay" if decay != optimizer.weight_decay else "")

    return torch.optim.AdamW(
        [{"params": params, "lr": lr, "weight_decay": decay, "name": group_name(lr, decay)} for (lr, decay), params in groups.items()],
        lr=optimizer.lr,
    )


def group_learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """{group name: its current LR}; groups of a checkpoint from before they were named are
    `group<i>`."""
    return {group.get("name", f"group{index}"): float(group["lr"]) for index, group in enumerate(optimizer.param_groups)}


def make_scheduler(optimizer: torch.optim.Optimizer, config: OptimizerConfig, *, steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config, steps=steps))


# -- the student model --------------------------------------------------------------------


def build_student(spec: StudentModel, *, seed: int) -> torch.nn.Module:
    """A fresh model of `spec.variant`, or `--init` weights (official or ours), in train mode."""
    from model.weights.checkpoint import load_glip
    from model.config import get_config, with_regularisers
    from model.network.glip import GLIP
    from model.weights.pretrained import load_imagenet_backbone, load_minilm_text_encoder
    from pipeline.io.storage import local_copy

    torch.manual_seed(seed)  # identical initial weights on every worker
    regularisers = spec.regulariser_settings()  # dropouts, drop path, DropBlock: no weights of their own
    if spec.init:
        model, _ = load_glip(local_copy(spec.init), config=spec.variant, regularisers=regularisers)  # s3://, gs:// or local
    else:
        model = GLIP(with_regularisers(get_config(spec.variant), regularisers))
    if spec.init_text == "minilm":
        load_minilm_text_encoder(model)
    if spec.init_backbone and not spec.init:
        load_imagenet_backbone(model, None if spec.init_backbone == "imagenet" else local_copy(spec.init_backbone))
    # The 80-class cls_logits head is never trained in GLIP (its loss is multiplied by 0).
    # A frozen text encoder (MODEL.LANGUAGE_BACKBONE.FREEZE) keeps its weights; the fusion
    # and extra BERT layers of the head still train.
    for name, parameter in model.named_parameters():
        if (
            name.startswith("rpn.head.cls_logits")
            or (spec.freeze_text and name.startswith("language_backbone."))
            or (spec.freeze_backbone and name.startswith("backbone.body."))
        ):
            parameter.requires_grad_(False)
    if spec.grad_checkpointing:
        model.set_gradient_checkpointing(True)
    return model.train()


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
    if "gold" in state:  # a PairedSampleStream's: the gold stream's sources, then the pseudo stream's
        gold, pseudo = paired_sources(config.data.sources)
        pairs = [*zip(gold, state["gold"]["source_counts"]), *zip(pseudo, state["pseudo"]["source_counts"])]
    else:
        pairs = list(zip(config.data.sources, state["source_counts"]))
    counts: dict[str, int] = {}
    for spec, count in pairs:
        counts[f"samples_{spec.kind}"] = counts.get(f"samples_{spec.kind}", 0) + int(count)
    return counts


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def progress_line(record: dict, steps: int) -> str:
    """The progress line of one `metrics.jsonl` record of a `steps`-step run."""
    return (
        f"train-student: step {record['step']}/{steps} loss {record['loss']:.4f} "
        f"(reg {record['loss_reg']:.3f} ctr {record['loss_centerness']:.3f} "
        f"tok {record['loss_dot_product_token']:.3f}) lr {record['lr']:.2e} "
        f"{record['samples_per_s']:.2f} samples/s ETA {_format_eta(record['eta_s'])}"
    )


# -- the trainer --------------------------------------------------------------------------


@dataclass
class StepResult:
    loss: float
    losses: dict[str, torch.Tensor]  # GLIPLoss's terms and `num_positives`
    grad_norm: float


class StudentTrainer:
    """One worker's training run: setup here, then `restore` (optional) and `run`."""

    def __init__(self, config: TrainConfig, *, rank: int, world_size: int, device: torch.device) -> None:
        from model.inputs.text import load_tokenizer

        self.config, self.rank, self.world_size, self.device = config, rank, world_size, device
        self.model = build_student(config.model, seed=config.seed).to(device)
        self.optimizer = make_optimizer(self.model, config.optimizer)
        self.scheduler = make_scheduler(self.optimizer, config.optimizer, steps=config.steps)
        data = config.data
        self.stream = make_stream(
            specs=data.sources, pseudo_per_step=data.pseudo_per_step, tokenizer=load_tokenizer(), seed=config.seed,
            rank=rank, world_size=world_size, max_query_len=self.model.config.max_query_len,
            max_negative_phrases=data.max_negative_phrases, pseudo_weighting=data.pseudo,
        )
        torch.manual_seed(config.seed * 1009 + rank + 1)  # dropout/drop-path differ per worker
        self.step_count = 0
        self.skipped: dict[str, str] = {}

    def restore(self, directory: Path) -> None:
        self.step_count = restore_training_checkpoint(
            directory, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, stream=self.stream,
            rank=self.rank,
        )
        if self.rank == 0:
            logger.info("train-student: resumed at step %d/%d", self.step_count, self.config.steps)

    def run(self) -> None:
        """Train up to `config.steps`, logging and reporting checkpoints on the way."""
        import ray.train.torch

        config = self.config
        self.parallel = ray.train.torch.prepare_model(
            self.model, move_to_device=self.device, parallel_strategy_kwargs={"find_unused_parameters": False}
        )
        local_out = None if "://" in config.out else Path(config.out)
        self.metrics_log = MetricsLog(
            local_out / METRICS_FILE if (local_out and self.rank == 0) else None, resume_step=self.step_count
        )
        self.tracker = RunTracker(config, resume_step=self.step_count) if self.rank == 0 else None
        try:
            self._train(config)
        finally:
            if self.tracker is not None:
                self.tracker.close()

    def _train(self, config: TrainConfig) -> None:
        self.loss_fn = GLIPLoss()
        loader = TrainLoader(
            stream=self.stream, batch_size=config.data.batch_size, settings=config.data.augment,
            num_threads=config.data.loader_threads, max_query_len=self.model.config.max_query_len,
            pad_to_max=config.data.pad_to_max,
        )
        use_bf16 = config.resources.bf16 and self.device.type == "cuda"
        self.autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
        self.parameters = [p for p in self.parallel.parameters() if p.requires_grad]
        self.started = self.window_start = time.perf_counter()
        self.first_step, self.window_samples = self.step_count, 0
        if self.step_count >= config.steps:
            return
        for loaded in loader:
            self.skipped.update(loaded.skipped)
            self.step_count += 1
            result = self.step(loaded)
            if self.rank == 0 and self._logs_now():
                self.log(result)
            if self.step_count % config.checkpoints.every == 0 or self.step_count == config.steps:
                self.checkpoint(result, loaded)
            if config.fail_at_step is not None and self.step_count == config.fail_at_step:
                raise SimulatedInterruption(f"simulated interruption after step {self.step_count}")
            if self.step_count >= config.steps:
                break
        if self.rank == 0 and self.skipped:
            logger.warning("train-student: skipped %d unreadable samples, e.g. %s", len(self.skipped), next(iter(self.skipped.items())))

    def step(self, loaded: LoadedBatch) -> StepResult:
        """One optimizer step on a batch; a non-finite loss stops the run naming the samples."""
        batch, device = loaded.batch, self.device
        images = batch.images.to(device, non_blocking=True)
        input_ids = batch.input_ids.to(device)
        attention_mask = batch.attention_mask.to(device)
        with self.autocast:
            outputs = self.parallel(images, input_ids, attention_mask)
        losses = self.loss_fn(
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
            terms = {k: float(v.detach()) for k, v in losses.items()}
            raise FloatingPointError(f"step {self.step_count}: loss is {loss_value} ({terms}) on samples {batch.keys}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.config.optimizer.clip_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.window_samples += len(batch) * self.world_size
        return StepResult(loss=loss_value, losses=losses, grad_norm=float(grad_norm))

    def _logs_now(self) -> bool:
        step = self.step_count
        return step % self.config.log_every == 0 or step == self.config.steps or step == self.first_step + 1

    def log(self, result: StepResult) -> None:
        """A `metrics.jsonl` line and a progress line with the rate since the last one."""
        now = time.perf_counter()
        rate = self.window_samples / max(now - self.window_start, 1e-9)
        per_step = (now - self.started) / (self.step_count - self.first_step)
        record = {
            "step": self.step_count,
            "loss": result.loss,
            **{k: float(v.detach()) for k, v in result.losses.items() if k.startswith("loss_")},
            "num_positives": float(result.losses["num_positives"]),
            "grad_norm": result.grad_norm,
            "lr": self.scheduler.get_last_lr()[0],
            "lr_groups": group_learning_rates(self.optimizer),
            "samples_per_s": rate,
            "skipped_samples": len(self.skipped),
            "eta_s": round(per_step * (self.config.steps - self.step_count), 1),
            "time": time.time(),
        }
        self.metrics_log.write(record)
        self.tracker.log(self.step_count, step_scalars(record))
        logger.info(progress_line(record, self.config.steps))
        self.window_start, self.window_samples = now, 0

    def checkpoint(self, result: StepResult, loaded: LoadedBatch) -> None:
        """Write this worker's part of a checkpoint and report it with the step's metrics."""
        import ray.train

        step = self.step_count
        metrics = {"step": step, "loss": result.loss, "skipped_samples": len(self.skipped), **source_samples(self.config, loaded.state)}
        with tempfile.TemporaryDirectory(prefix="glip-ckpt-") as directory:
            save_training_checkpoint(
                Path(directory), model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, step=step,
                data_state=loaded.state, rank=self.rank, config=self.config,
            )
            ray.train.report(
                metrics, checkpoint=ray.train.Checkpoint.from_directory(directory), checkpoint_dir_name=f"checkpoint_{step:08d}"
            )
        if self.tracker is not None:
            self.tracker.sync()


def train_worker(config_dict: dict) -> None:
    """Ray Train entry point: train `config.steps` steps, reporting checkpoints."""
    import ray.train
    import ray.train.torch

    config = TrainConfig.from_dict(config_dict)
    context = ray.train.get_context()
    torch.set_num_threads(max(1, config.resources.cpus_per_worker))
    device = ray.train.torch.get_device() if config.resources.use_gpu else torch.device("cpu")
    trainer = StudentTrainer(config, rank=context.get_world_rank(), world_size=context.get_world_size(), device=device)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            trainer.restore(Path(directory))
    trainer.run()
