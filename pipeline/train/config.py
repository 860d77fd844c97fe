"""The configuration of a student training run: one typed dataclass per concern.

`TrainConfig` holds the run (output, steps, seed, logging) and nests:
* `StudentModel`: the variant and where its weights start (`--init`, `--init-text`,
  `--init-backbone`), what is frozen, gradient checkpointing;
* `DataConfig`: the sources and their mixing weights, batch size, augmentation
  (`AugmentSettings`), pseudo-box weighting (`PseudoWeighting`), negatives, loader threads;
* `OptimizerConfig`: the official AdamW recipe and its LR schedule;
* `Resources`: Ray Train workers, GPUs, CPUs per worker, bf16;
* `CheckpointPolicy`: how often checkpoints are reported and how many are kept;
* `Tracking`: where rank 0 sends the run's scalars (TensorBoard, MLflow).

The field defaults here are the only defaults: `pipeline train-student` declares its options
from them. No torch import, so the CLI builds and checks a config before loading anything
heavy. `to_dict()` / `from_dict()` round-trip through JSON (`train_config.json`, Ray's
`train_loop_config`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pipeline.train.data.specs import AugmentSettings, PseudoWeighting, SourceSpec, paired_sources

SCHEDULES = ("step", "cosine")
REGULARISER_PRESETS = ("official", "off")


@dataclass(frozen=True, kw_only=True)
class StudentModel:
    """The student network and its starting weights."""

    variant: str = "tiny"
    init: str | None = None  # a GLIP checkpoint (official or ours), local or s3://, gs://
    init_text: str | None = None  # "minilm": the real all-MiniLM-L6-v2 text weights (tiny variants)
    init_backbone: str | None = None  # "imagenet" or the file: MobileNetV2 body weights (tiny-mnv2)
    freeze_text: bool = False  # MODEL.LANGUAGE_BACKBONE.FREEZE: the fusion layers still train
    freeze_backbone: bool = False  # MODEL.BACKBONE.FREEZE: the visual body keeps its weights; FPN and head train
    grad_checkpointing: bool = False
    # Training-time regularisers: "official" keeps the variant's (model.config), "off" turns every
    # one off (parity runs); a per-kind value, when given, replaces the preset's for that kind.
    regularisers: str = "official"
    drop_path: float | None = None  # Swin stochastic depth rate
    text_dropout: float | None = None  # BERT hidden + attention dropout (text encoder, head BERT layers)
    fusion_dropout: float | None = None  # X-MHA fusion attention maps
    drop_block: float | None = None  # FPN DropBlock probability

    def __post_init__(self) -> None:
        if self.regularisers not in REGULARISER_PRESETS:
            raise ValueError(f"--regularisers {self.regularisers!r}: choose one of {', '.join(REGULARISER_PRESETS)}")
        self.regulariser_settings()  # a value out of [0, 1) is refused here, before any worker starts
        if self.init_text not in (None, "minilm"):
            raise ValueError(f"init_text must be 'minilm' or None, got {self.init_text!r}")
        if self.init_backbone:
            from model.config import get_config

            backbone = get_config(self.variant).backbone
            if backbone != "mobilenet_v2":
                raise ValueError(
                    f"--init-backbone {self.init_backbone}: only the mobilenet_v2 backbone (variant tiny-mnv2) has ImageNet "
                    f"weights available offline; variant {self.variant} uses {backbone} (start it from --init instead)"
                )

    def regulariser_settings(self):
        """The `model.config.Regularisers` to build the student with."""
        from model.config import OFF, Regularisers

        chosen = {
            "drop_path": self.drop_path, "text_dropout": self.text_dropout, "fusion_dropout": self.fusion_dropout,
            "drop_block": self.drop_block,
        }
        base = OFF if self.regularisers == "off" else Regularisers()
        return dataclasses.replace(base, **{kind: value for kind, value in chosen.items() if value is not None})


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """Official recipe (SPEC section 6, `solver/build.py`): AdamW, a separate LR for the
    language backbone, linear warm-up from `warmup_factor`, then steps (x`gamma` at each
    milestone, fractions of the run) or a cosine decay to `min_lr_ratio`; clipping over the
    full model."""

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

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be 'step' or 'cosine', got {self.schedule!r}")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """What each worker reads; `batch_size` is per worker. `pseudo_per_step` > 0 pairs batches:
    each step takes `batch_size` gold samples (as a gold-only run draws them) plus that many
    pseudo samples per worker (`PairedSampleStream`); 0 mixes every source by its weight."""

    sources: tuple[SourceSpec, ...] = ()
    batch_size: int = 2
    pseudo_per_step: int = 0
    augment: AugmentSettings = field(default_factory=AugmentSettings)
    pseudo: PseudoWeighting = field(default_factory=PseudoWeighting)
    max_negative_phrases: int = 8
    loader_threads: int = 2
    pad_to_max: bool = False

    def __post_init__(self) -> None:
        if self.pseudo_per_step < 0:
            raise ValueError(f"--pseudo-per-step must be >= 0, got {self.pseudo_per_step}")
        if self.pseudo_per_step:
            paired_sources(self.sources)


@dataclass(frozen=True, kw_only=True)
class Resources:
    """Ray Train workers (DDP) and what each one gets."""

    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1
    bf16: bool = True  # autocast on CUDA


@dataclass(frozen=True, kw_only=True)
class CheckpointPolicy:
    every: int = 500  # steps between checkpoints (and one at the end)
    keep: int | None = 3  # the latest checkpoints kept; None: all


@dataclass(frozen=True, kw_only=True)
class Tracking:
    """Where rank 0 logs the run's scalars (`pipeline.train.tracking`). Not a resume key: a
    resumed run may log elsewhere."""

    tensorboard: bool = True  # event files under OUT/tensorboard/
    mlflow_uri: str | None = None  # an MLflow tracking URI (http://..., file://..., databricks)
    mlflow_experiment: str = "train-student"
    # Set by the driver: the MLflow run that every worker, restart and --resume of this run logs to.
    mlflow_run_id: str | None = None


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything a training run needs; `steps` is the total number of optimizer steps."""

    out: str
    steps: int
    seed: int = 0
    model: StudentModel = field(default_factory=StudentModel)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    resources: Resources = field(default_factory=Resources)
    checkpoints: CheckpointPolicy = field(default_factory=CheckpointPolicy)
    tracking: Tracking = field(default_factory=Tracking)
    log_every: int = 10
    fail_at_step: int | None = None  # fault injection for resume drills
    # Worker-group failures (a node or worker lost, an error in a worker) restarted from the
    # last checkpoint before the run stops (Ray Train's FailureConfig.max_failures; -1: no limit).
    max_failures: int = 3

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.max_failures < -1:
            raise ValueError(f"--max-failures must be >= -1 (-1: no limit), got {self.max_failures}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        data = dict(data)
        for name in ("model", "data", "optimizer", "resources", "checkpoints"):
            if not isinstance(data.get(name), dict):
                raise ValueError(f"not a train config: no {name!r} section (written by an older layout?)")
        loaded = dict(data["data"])
        loaded["sources"] = tuple(SourceSpec(**{**s, "paths": tuple(s["paths"])}) for s in loaded["sources"])
        loaded["augment"] = AugmentSettings(**{**loaded["augment"], "min_sizes": tuple(loaded["augment"]["min_sizes"])})
        loaded["pseudo"] = PseudoWeighting(**loaded["pseudo"])
        optimizer = data["optimizer"]
        sections = ("model", "data", "optimizer", "resources", "checkpoints", "tracking")
        return cls(
            **{k: v for k, v in data.items() if k not in sections},
            model=StudentModel(**data["model"]),
            data=DataConfig(**loaded),
            optimizer=OptimizerConfig(**{**optimizer, "milestones": tuple(optimizer["milestones"])}),
            resources=Resources(**data["resources"]),
            checkpoints=CheckpointPolicy(**data["checkpoints"]),
            tracking=Tracking(**data.get("tracking", {})),  # absent in runs before it existed
        )


def setting(config: dict[str, Any], dotted: str) -> Any:
    """The value at a dotted path of a `to_dict()` config ("data.augment.max_size"), None when absent."""
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value
