"""Which teacher boxes become pseudo-labels: filter policies and the presets of the anchors.

A policy is a pure function of one image's detections (every box above the stage's low
floor, stored in `detections/`), so `pipeline filter` re-applies any policy to stored
detections and gets exactly what `pipeline pseudo-label` writes with the same policy.

Steps, in order (each is off when its knob is unset):
1. `min_score`: keep boxes scoring strictly above it.
2. size: keep boxes whose side lengths are at least `min_box_frac` and whose area is at most
   `max_box_frac` of the image's (fractions of the image width/height and area).
3. NMS at `nms_iou`, `nms_scope` "phrase" (within each phrase) or "all" (across phrases:
   one phrase per object, the best-scoring one).
4. `top_k_per_phrase`: the k best boxes of each phrase.
5. image rules: with `image_min_score` the image keeps its boxes only when one of its boxes
   (after the size rule) scores above it; `keep_best_if_empty` keeps the single best box of an
   image left with none (GLIP: every image contributes); `drop_empty` drops images with no box
   (the tar gets no sample for them, counted as `no_box` in the stats).

Presets (`PRESETS`):
- `glip`   (GLIP paper): score > 0.5, no NMS, the best box kept when none passes, so every
           image has >= 1 box.
- `grit`   (Kosmos-2's GRIT): score > 0.65, NMS 0.5 across phrases, images with no box dropped.
- `owlst`  (OWL-ST): boxes > 0.1 kept when the image has one > 0.3, otherwise the image is
           dropped.

A policy file (`--policy policy.json`, written by `pipeline calibrate`) holds a policy in
place of a preset: `{"policy": {<FilterPolicy fields>}, "calibration": {...}}`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class Box:
    """One teacher box: xyxy in original pixels, score, index into the image's phrase list."""

    bbox: tuple[float, float, float, float]
    score: float
    phrase: int


@dataclass(frozen=True)
class FilterPolicy:
    name: str = "custom"
    min_score: float = 0.5
    min_box_frac: float = 0.0
    max_box_frac: float = 1.0
    nms_iou: float | None = None
    nms_scope: str = "phrase"  # "phrase" | "all"
    top_k_per_phrase: int | None = None
    image_min_score: float | None = None
    keep_best_if_empty: bool = False
    drop_empty: bool = True

    def __post_init__(self) -> None:
        if self.nms_scope not in ("phrase", "all"):
            raise ValueError(f"nms_scope must be 'phrase' or 'all', got {self.nms_scope!r}")
        if not 0.0 <= self.min_box_frac <= self.max_box_frac <= 1.0:
            raise ValueError(f"need 0 <= min_box_frac <= max_box_frac <= 1, got {self.min_box_frac}, {self.max_box_frac}")
        if self.top_k_per_phrase is not None and self.top_k_per_phrase < 1:
            raise ValueError(f"top_k_per_phrase must be >= 1, got {self.top_k_per_phrase}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_overrides(self, **overrides: Any) -> "FilterPolicy":
        """A copy with the given knobs changed (None values are ignored)."""
        changes = {k: v for k, v in overrides.items() if v is not None}
        if not changes:
            return self
        name = self.name if self.name.endswith("+custom") or self.name == "custom" else f"{self.name}+custom"
        return dataclasses.replace(self, name=name, **changes)


PRESETS: dict[str, FilterPolicy] = {
    "glip": FilterPolicy(name="glip", min_score=0.5, keep_best_if_empty=True, drop_empty=True),
    "grit": FilterPolicy(name="grit", min_score=0.65, nms_iou=0.5, nms_scope="all", drop_empty=True),
    "owlst": FilterPolicy(name="owlst", min_score=0.1, image_min_score=0.3, drop_empty=True),
}


def get_preset(name: str) -> FilterPolicy:
    if name not in PRESETS:
        raise ValueError(f"unknown filter preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def load_policy_file(uri: str) -> FilterPolicy:
    """The policy of a policy file (`{"policy": {...}}`, or the fields alone); ValueError naming the file."""
    import json

    from pipeline import storage

    try:
        data = json.loads(storage.read_bytes(uri))
    except FileNotFoundError:
        raise ValueError(f"--policy {uri}: file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"--policy {uri}: not a JSON policy file ({error})") from None
    fields = data.get("policy", data) if isinstance(data, dict) else None
    if not isinstance(fields, dict):
        raise ValueError(f"--policy {uri}: expected an object with a 'policy' entry")
    known = {f.name for f in dataclasses.fields(FilterPolicy)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"--policy {uri}: unknown policy fields {unknown} (known: {', '.join(sorted(known))})")
    try:
        return FilterPolicy(**fields)
    except (TypeError, ValueError) as error:
        raise ValueError(f"--policy {uri}: {error}") from None


def apply_policy(boxes: Sequence[Box], width: int, height: int, policy: FilterPolicy) -> list[Box] | None:
    """The boxes `policy` keeps for one image, best first; None when the image is dropped."""
    ordered = sorted(boxes, key=lambda b: -b.score)
    sized = [b for b in ordered if _size_ok(b, width, height, policy)]
    if policy.image_min_score is not None and not any(b.score > policy.image_min_score for b in sized):
        return None
    kept = [b for b in sized if b.score > policy.min_score]
    if policy.nms_iou is not None and len(kept) > 1:
        kept = _nms(kept, policy.nms_iou, per_phrase=policy.nms_scope == "phrase")
    if policy.top_k_per_phrase is not None:
        counts: dict[int, int] = {}
        limited = []
        for box in kept:
            counts[box.phrase] = counts.get(box.phrase, 0) + 1
            if counts[box.phrase] <= policy.top_k_per_phrase:
                limited.append(box)
        kept = limited
    if not kept and policy.keep_best_if_empty and sized:
        kept = [sized[0]]
    if not kept and policy.drop_empty:
        return None
    return kept


def _size_ok(box: Box, width: int, height: int, policy: FilterPolicy) -> bool:
    x0, y0, x1, y1 = box.bbox
    box_w, box_h = max(0.0, x1 - x0), max(0.0, y1 - y0)
    if box_w <= 0 or box_h <= 0:
        return False
    if box_w < policy.min_box_frac * width or box_h < policy.min_box_frac * height:
        return False
    return box_w * box_h <= policy.max_box_frac * width * height


def _nms(boxes: list[Box], iou: float, *, per_phrase: bool) -> list[Box]:
    """torchvision NMS (plain IoU) over `boxes` sorted by score; returns the kept ones in order."""
    import torch  # here, so the CLI starts without loading torch
    from torchvision.ops import batched_nms

    coords = torch.tensor([b.bbox for b in boxes], dtype=torch.float64)
    scores = torch.tensor([b.score for b in boxes], dtype=torch.float64)
    groups = torch.tensor([b.phrase if per_phrase else 0 for b in boxes])
    keep = batched_nms(coords, scores, groups, iou).tolist()
    return [boxes[i] for i in sorted(keep)]

