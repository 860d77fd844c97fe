"""What a training run reads and how: data sources, augmentation and pseudo-box weighting.

Plain frozen dataclasses without torch, so that the CLI and `pipeline.train.config` build and
check them before anything heavy is imported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.config import TRAIN_MAX_SIZE, TRAIN_MIN_SIZES

SOURCE_KINDS = ("pseudo", "coco", "grounding", "odvg")


class TrainDataError(ValueError):
    """A training data file that cannot be used (names the file, the record and the reason)."""


@dataclass(frozen=True)
class SourceSpec:
    """One data source of a training run.

    kind: pseudo | coco | grounding | odvg; paths: pseudo shard folders/tars, or the one
    annotation file; images: image folder (gold sources); weight: mixing weight.
    """

    kind: str
    paths: tuple[str, ...]
    images: str = ""
    weight: float = 1.0
    label_map: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise TrainDataError(f"unknown source kind {self.kind!r}; expected one of {SOURCE_KINDS}")
        if self.weight <= 0:
            raise TrainDataError(f"{self.kind} source: mixing weight must be > 0, got {self.weight}")
        if self.kind != "pseudo" and not self.images:
            raise TrainDataError(f"{self.kind} source {self.paths}: needs an image folder (--images)")

    @property
    def name(self) -> str:
        return f"{self.kind}:{','.join(self.paths)}"


def paired_sources(specs) -> tuple[list[SourceSpec], list[SourceSpec]]:
    """(gold specs, pseudo specs) of a `--pseudo-per-step` run, each in the run's order; refused
    unless both are there."""
    gold = [s for s in specs if s.kind != "pseudo"]
    pseudo = [s for s in specs if s.kind == "pseudo"]
    if not gold or not pseudo:
        raise TrainDataError(
            "--pseudo-per-step adds pseudo samples to each step's gold batch: it needs gold sources "
            f"(--coco, --grounding, --odvg) and --pseudo shards; this run gives {[s.name for s in specs] or 'none'}"
        )
    return gold, pseudo


@dataclass(frozen=True)
class AugmentSettings:
    """Training transform: random short side from `min_sizes`, long side <= `max_size`, and
    the strong augmentation of `model.training.augment.augment` (off by default)."""

    min_sizes: tuple[int, ...] = TRAIN_MIN_SIZES
    max_size: int = TRAIN_MAX_SIZE
    flip_probability: float = 0.5
    crop_probability: float = 0.0
    cutout_probability: float = 0.0
    scale_jitter: float = 0.0

    def __post_init__(self) -> None:
        for name in ("crop_probability", "cutout_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.scale_jitter < 1.0:
            raise ValueError(f"scale_jitter must be in [0, 1), got {self.scale_jitter}")


PSEUDO_PROMPTS = ("caption", "names")


@dataclass(frozen=True)
class PseudoWeighting:
    """How the student learns from pseudo samples: their prompt and their boxes' loss weights
    (gold boxes always weigh 1).

    prompt: "caption" (the sample's own caption with its phrases' spans, other samples' phrases
    appended as negatives, as for gold grounding data) or "names" (OWL-ST's and Detic's way, GLIP's
    `od_to_grounding` applied to pseudo-labels: each box's phrase becomes its head noun as a class
    name, "two blue rings" -> "ring", and the prompt lists the image's names with negative names
    drawn from recent pseudo samples, "ring. square. cross. star", the way detection data and
    class-name evaluation prompt the model);

    score_weight: a pseudo box's classification loss is scaled by its teacher score (Soft
    Teacher); ignore_below: boxes scoring under it are ignored, their anchors neither positive
    nor negative (Unbiased Teacher's band: shards filtered at a low floor keep them);
    background_weight: the negative loss of a pseudo image's unassigned anchors (the objects the
    teacher missed are background there), 1 as for gold;
    known_weight: the weight of a pseudo box whose name (its phrase's head noun,
    `nlp.vocabulary.phrase_name`) the gold sources already name (a COCO category, the head of a
    grounding phrase): gold teaches those words with clean boxes, and the teacher's own mistakes
    on them are what a student copies (Detic's and OWL-ST's practice of learning novel classes
    from weak labels and base classes from boxes); 0 ignores such boxes (neither positive nor
    negative), 1 (default) weighs them as the other pseudo boxes.
    """

    score_weight: bool = False
    ignore_below: float = 0.0
    background_weight: float = 1.0
    prompt: str = "caption"
    known_weight: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.known_weight <= 1.0:
            raise ValueError(f"--pseudo-known-weight must be in [0, 1], got {self.known_weight}")
        if self.prompt not in PSEUDO_PROMPTS:
            raise ValueError(f"--pseudo-prompt {self.prompt!r}: choose one of {', '.join(PSEUDO_PROMPTS)}")
        if not 0.0 <= self.ignore_below <= 1.0:
            raise ValueError(f"pseudo_ignore_below must be in [0, 1], got {self.ignore_below}")
        if self.background_weight < 0:
            raise ValueError(f"pseudo_background_weight must be >= 0, got {self.background_weight}")

    @property
    def active(self) -> bool:
        return self.score_weight or self.ignore_below > 0 or self.background_weight != 1.0 or self.known_weight != 1.0

    def box_weights(self, scores: np.ndarray, known: np.ndarray | None = None) -> np.ndarray:
        """Loss weight per pseudo box from its teacher score and, with `known` ([N] bool: the
        gold names the box's class), `known_weight`."""
        weights = scores.astype(np.float32) if self.score_weight else np.ones(len(scores), dtype=np.float32)
        if known is not None:
            weights = np.where(known, weights * np.float32(self.known_weight), weights)
        return np.where(scores < self.ignore_below, np.float32(0), weights)
