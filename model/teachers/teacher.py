"""What every teacher gives the pipeline: detections per image and an identity for provenance.

A teacher grounds phrases in images. Its one call,

    predict(images, captions, phrase_spans) -> list[Detections]

takes PIL images, one caption per image and, per image, one entry per phrase (a `(start, end)`
character span into the caption, or a list of such spans), and returns one `Detections` per
image: boxes xyxy in the ORIGINAL image's pixels, a score in [0, 1] per box and the index of
the phrase each box grounds. Implementations: `model.inference.predict.GLIPPredictor` (GLIP, the
official maths) and `model.teachers.hf_teachers` (Grounding DINO and OWLv2 through transformers).

`TeacherIdentity` says which weights produced a label: it goes into every pseudo sample's
`teacher` entry and into each stage's `_stats.json`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import torch
from PIL import Image

Span = tuple[int, int]
# Boxes narrower or lower than this many ORIGINAL pixels are dropped after rescaling. The official
# post-processing keeps any box of "+1" size >= 0, so a very thin image (8 x 4000 px, resized to
# 3 x 1333) yields boxes of zero width; none of the official reference runs holds such a box.
MIN_BOX_SIDE = 1.0


@dataclass
class Detections:
    """Detections of one image.

    boxes: [K, 4] float32 xyxy in the ORIGINAL image's pixels; scores: [K] in [0, 1];
    phrase_ids: [K] int64, index into the phrase list given for this image. `degenerate`:
    boxes the teacher dropped because they were under `MIN_BOX_SIDE` pixels wide or high in
    the original image.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    phrase_ids: torch.Tensor
    degenerate: int = 0

    def __len__(self) -> int:
        return int(self.scores.numel())

    @classmethod
    def empty(cls) -> "Detections":
        return cls(torch.zeros((0, 4)), torch.zeros((0,), dtype=torch.float32), torch.zeros((0,), dtype=torch.int64))

    def _select(self, index: torch.Tensor) -> "Detections":
        return Detections(self.boxes[index], self.scores[index], self.phrase_ids[index], self.degenerate)

    def above(self, threshold: float) -> "Detections":
        return self._select(self.scores > threshold)

    def sorted(self) -> "Detections":
        return self._select(torch.argsort(self.scores, descending=True, stable=True))

    def top(self, limit: int) -> "Detections":
        """The `limit` best-scoring boxes, best first."""
        return self.sorted()._select(torch.arange(min(limit, len(self))))

    def without_degenerate(self, min_side: float) -> "Detections":
        """The boxes at least `min_side` pixels wide and high; the others counted in `degenerate`."""
        keep = ((self.boxes[:, 2] - self.boxes[:, 0]) >= min_side) & ((self.boxes[:, 3] - self.boxes[:, 1]) >= min_side)
        kept = self._select(keep)
        kept.degenerate += int((~keep).sum())
        return kept


def merge_detections(parts: Sequence[Detections], limit: int) -> Detections:
    """One image's detections from several prompts (chunks), best first; capped at `limit`
    only when there were several parts (a single part is already the teacher's own output)."""
    if not parts:
        return Detections.empty()
    merged = Detections(
        torch.cat([p.boxes for p in parts]),
        torch.cat([p.scores for p in parts]),
        torch.cat([p.phrase_ids for p in parts]),
        sum(p.degenerate for p in parts),
    ).sorted()
    if len(parts) > 1 and len(merged) > limit:
        merged = merged._select(torch.arange(limit))
    return merged


def entity_spans(spans: Sequence[Span | Sequence[Span]]) -> list[list[Span]]:
    """Each phrase as a list of `(start, end)` spans (a bare span becomes a list of one)."""
    return [[tuple(s)] if not isinstance(s[0], (tuple, list)) else [tuple(x) for x in s] for s in spans]


@dataclass(frozen=True)
class TeacherIdentity:
    """Which weights, read how: written into every pseudo sample (`teacher`) and `_stats.json`.

    name: the checkpoint file or model folder name; kind: "glip", "grounding-dino" or "owlv2";
    sha256: of the weights file (for a folder of several weight files, of their names and
    hashes); variant: the model configuration; preprocessing: the test-time image settings.
    """

    name: str
    kind: str
    sha256: str
    variant: str
    preprocessing: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        # "checkpoint" is the key pseudo samples have always used for the name.
        return {
            "checkpoint": self.name,
            "kind": self.kind,
            "sha256": self.sha256,
            "variant": self.variant,
            "preprocessing": dict(self.preprocessing),
        }


class Teacher(Protocol):
    """A grounding model the pipeline can pseudo-label, ground and evaluate with."""

    identity: TeacherIdentity

    def predict(
        self,
        images: Sequence[Image.Image],
        captions: Sequence[str],
        phrase_spans: Sequence[Sequence[Span | Sequence[Span]]],
    ) -> list[Detections]: ...


def check_batch(images: Sequence, captions: Sequence, phrase_spans: Sequence) -> None:
    if not (len(images) == len(captions) == len(phrase_spans)):
        raise ValueError(
            f"images ({len(images)}), captions ({len(captions)}) and phrase_spans "
            f"({len(phrase_spans)}) must have the same length"
        )
