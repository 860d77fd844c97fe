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
5. `assign` "caption" (off: "none"): the caption says which objects the image holds, so the
   boxes are matched to its phrases jointly instead of each keeping its best phrase. Boxes of
   all phrases are grouped into objects (IoU >= `assign_iou` with the object's best box); the
   objects whose best score passed step 1 are assigned to the phrases by maximum total score
   (Hungarian), each phrase taking as many objects as its count word says ("two blue rings":
   2, otherwise 1) and each object one phrase. A phrase the teacher scores low everywhere (a
   concept gold never taught) then gets the object the other phrases leave: "a red square
   beside a green hexagon" grounds the hexagon even when the teacher does not know the word.
   Each kept box is the assigned phrase's own box on that object, with its own score.
6. image rules: with `image_min_score` the image keeps its boxes only when one of its boxes
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

`select_samples` turns one shard's stored detections (`labels_io.DetectionRow`) into the
pseudo samples a policy keeps; `pseudo-label` and `filter` both write their tars with it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import typer

from pipeline.io.labels_io import Box, DetectionRow
from pipeline.io.shard_report import ShardReport


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
    assign: str = "none"  # "none" | "caption"
    assign_iou: float = 0.6

    def __post_init__(self) -> None:
        if self.nms_scope not in ("phrase", "all"):
            raise ValueError(f"nms_scope must be 'phrase' or 'all', got {self.nms_scope!r}")
        if self.assign not in ("none", "caption"):
            raise ValueError(f"assign must be 'none' or 'caption', got {self.assign!r}")
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

    from pipeline.io import storage

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


def policy_from_options(
    preset: str,
    *,
    min_score: float | None = None,
    nms_iou: float | None = None,
    nms_scope: str | None = None,
    top_k: int | None = None,
    min_box_frac: float | None = None,
    max_box_frac: float | None = None,
    keep_empty: bool | None = None,
    policy_file: str | None = None,
    assign: str | None = None,
) -> FilterPolicy:
    """A preset, or the policy of `policy_file` in its place, with the CLI's knobs applied on top."""
    policy = load_policy_file(policy_file) if policy_file else get_preset(preset)
    overrides: dict[str, object] = {
        "min_score": min_score,
        "nms_iou": nms_iou,
        "nms_scope": nms_scope,
        "top_k_per_phrase": top_k,
        "min_box_frac": min_box_frac,
        "max_box_frac": max_box_frac,
        "assign": assign,
    }
    if keep_empty is not None:
        overrides["drop_empty"] = not keep_empty
    return policy.with_overrides(**overrides)


def _filter_options() -> dict:
    return dict(
        preset=typer.Option("glip", "--preset", help=f"Filter preset: {', '.join(PRESETS)}."),
        policy_file=typer.Option(None, "--policy", help="Policy file (from `pipeline calibrate`) in place of --preset."),
        min_score=typer.Option(None, "--min-score", help="Keep boxes scoring above this (overrides the preset)."),
        nms_iou=typer.Option(None, "--nms-iou", help="NMS IoU threshold (default: the preset's)."),
        nms_scope=typer.Option(None, "--nms-scope", help="NMS within each 'phrase' or across 'all' phrases."),
        top_k=typer.Option(None, "--top-k", min=1, help="Best k boxes per phrase."),
        min_box_frac=typer.Option(None, "--min-box-frac", help="Drop boxes with a side below this fraction of the image's."),
        max_box_frac=typer.Option(None, "--max-box-frac", help="Drop boxes covering more than this fraction of the image."),
        keep_empty=typer.Option(None, "--keep-empty/--drop-empty", help="Keep images left with no box (default: preset's)."),
        assign=typer.Option(
            None, "--assign", help="caption: match objects to the caption's phrases jointly (count words allowed); none: each box keeps its best phrase."
        ),
    )


# The filter flags of `pseudo-label` and `filter`, declared once: `name: type = FILTER_OPTIONS["name"]`
# in a command's signature, and `policy_from_options` turns their values into the policy.
FILTER_OPTIONS = _filter_options()


def apply_policy(
    boxes: Sequence[Box], width: int, height: int, policy: FilterPolicy, *, phrases: Sequence[str] = ()
) -> list[Box] | None:
    """The boxes `policy` keeps for one image, best first; None when the image is dropped.
    `phrases`: the image's phrase texts (for `assign="caption"` counts; index = Box.phrase)."""
    ordered = sorted(boxes, key=lambda b: -b.score)
    sized = [b for b in ordered if _size_ok(b, width, height, policy)]
    if policy.image_min_score is not None and not any(b.score > policy.image_min_score for b in sized):
        return None
    if policy.assign == "caption":
        kept = assign_to_caption(sized, phrases, min_score=policy.min_score, iou=policy.assign_iou)
    else:
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


_COUNT_WORDS = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10}


def phrase_count(text: str) -> int:
    """How many objects a phrase names: its leading count word or number ("two dogs": 2), else 1."""
    words = text.lower().split()
    if not words:
        return 1
    if words[0].isdigit():
        return max(1, min(int(words[0]), 20))
    return _COUNT_WORDS.get(words[0], 1)


def assign_to_caption(boxes: Sequence[Box], phrases: Sequence[str], *, min_score: float, iou: float) -> list[Box]:
    """Step 5 of the module doc: objects (grouped boxes) matched to the caption's phrases by
    maximum total score, phrases taking `phrase_count` objects each; best first."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    objects: list[dict[int, Box]] = []  # per object: phrase -> its best box there
    for box in boxes:  # best first
        for members in objects:
            if box.phrase not in members and _iou(box.bbox, next(iter(members.values())).bbox) >= iou:
                members[box.phrase] = box
                break
        else:
            if not any(box.phrase in m and _iou(box.bbox, m[box.phrase].bbox) >= iou for m in objects):
                objects.append({box.phrase: box})
    objects = [m for m in objects if max(b.score for b in m.values()) > min_score]
    if not objects:
        return []
    count = max(max(b.phrase for m in objects for b in m.values()) + 1, len(phrases))
    slots = [p for p in range(count) for _ in range(phrase_count(phrases[p]) if p < len(phrases) else 1)]
    scores = np.asarray([[m[p].score if p in m else 0.0 for p in slots] for m in objects])  # [objects, slots]
    rows, cols = linear_sum_assignment(scores, maximize=True)
    kept = [objects[r][slots[c]] for r, c in zip(rows, cols) if scores[r, c] > 0]
    return sorted(kept, key=lambda b: -b.score)


def _iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


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


def sample_json(row: DetectionRow, kept: Sequence[Box], *, teacher: dict[str, Any], policy: FilterPolicy) -> dict:
    """DESIGN.md's pseudo sample: ODVG-style grounding + scores + provenance."""
    phrases = row.phrases or []
    regions = []
    for box in kept:
        phrase = phrases[box.phrase]
        regions.append(
            {
                "bbox": [round(float(v), 2) for v in box.bbox],
                "phrase": phrase["text"],
                "tokens_positive": [[int(phrase["start"]), int(phrase["end"])]],
                "score": round(float(box.score), 4),
            }
        )
    return {
        "key": row.key,
        "width": row.width,
        "height": row.height,
        "grounding": {"caption": row.caption, "regions": regions},
        "teacher": teacher,
        "filter": policy.to_dict(),
    }


def filter_row(row: DetectionRow, policy: FilterPolicy) -> list[Box] | None:
    """The policy's boxes for a grounded row; None when the row is skipped or dropped."""
    if row.error is not None:
        return None
    phrases = [str(p["text"]) for p in row.phrases or []]
    return apply_policy(row.boxes or [], row.width, row.height, policy, phrases=phrases)


NO_BOX = "no_box"  # grounded, but the filter policy kept nothing and dropped the image


def select_samples(
    rows: Sequence[DetectionRow],
    image_bytes: dict[str, bytes],
    *,
    policy: FilterPolicy,
    teacher: dict[str, Any],
    report: ShardReport,
) -> list[tuple[str, str, bytes, dict]]:
    """The pseudo samples of one shard, in input order, counting every row in `report`.

    Shared by `pseudo-label` and `filter`, so both write the same tar for the same policy.
    Rows with an error are skipped under the error's reason; rows the policy drops under
    `no_box`. Counters: `images` (grounded), `boxes` (above the floor), `kept_boxes`.
    """
    for name in ("images", "boxes", "kept_boxes"):
        report.count(name, 0)
    samples = []
    for row in rows:
        report.samples += 1
        if row.error is not None:
            report.skip(row.error.split(":", 1)[0], row.key)
            continue
        report.count("images")
        report.count("boxes", len(row.boxes or []))
        kept = filter_row(row, policy)
        if kept is None:
            report.skip(NO_BOX, row.key)
            continue
        if row.key not in image_bytes:
            report.skip("image_missing", row.key)
            continue
        report.count("kept_boxes", len(kept))
        samples.append((row.key, row.image_ext, image_bytes[row.key], sample_json(row, kept, teacher=teacher, policy=policy)))
    report.written = len(samples)
    return samples
