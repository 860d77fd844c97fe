"""Rating a filter policy on a checked gold sample: the measures `pipeline calibrate` searches
over (its module doc gives the method).

A sample image's boxes go through `filtering.filter_row` (the filter's own steps, `assign`
included) and are matched to its gold boxes greedily by descending score
(`evaluate.greedy_matches`, the COCOeval rule), class-agnostic and phrase-aware
(`names_category`). `threshold_counts` turns the matches into per-image counts at every score
threshold; precision, recall and their bootstrap interval come from those counts.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import numpy as np

from pipeline.evaluation.evaluate import greedy_matches, xyxy_to_coco
from pipeline.io.labels_io import DetectionRow
from pipeline.stages.filtering import FilterPolicy, filter_row

THRESHOLDS = np.round(np.arange(0.0, 1.0, 0.01), 2)  # candidate min_score values
MATCHES = ("agnostic", "phrase")
Z95 = 1.959964


def nms_setting(spec: str) -> tuple[float | None, str]:
    """"none" -> (None, "phrase"); "all:0.5" -> (0.5, "all"); "phrase:0.7" -> (0.7, "phrase")."""
    if spec == "none":
        return None, "phrase"
    scope, _, value = spec.partition(":")
    try:
        iou = float(value)
    except ValueError:
        iou = -1.0
    if scope not in ("phrase", "all") or not 0.0 < iou <= 1.0:
        raise ValueError(f"--nms {spec!r}: expected 'none', 'phrase:IOU' or 'all:IOU' with 0 < IOU <= 1")
    return iou, scope


def names_category(phrase: str, category: str) -> bool:
    """True when the phrase's words contain the category's ("two blue rings" names "ring")."""
    words = re.findall(r"[a-z0-9]+", phrase.lower())
    name = re.findall(r"[a-z0-9]+", category.lower())
    if not name:
        return False
    forms = {name[-1], name[-1] + "s", name[-1] + "es"}
    for start in range(len(words) - len(name) + 1):
        if words[start : start + len(name) - 1] == name[:-1] and words[start + len(name) - 1] in forms:
            return True
    return False


@dataclass
class SampleImage:
    """One gold image of the sample with its detections row."""

    image_id: int
    row: DetectionRow
    gold_boxes: list[list[float]]  # COCO xywh, crowd boxes left out
    gold_names: list[str]


@dataclass
class Matched:
    """One image under one NMS setting: kept boxes' scores (best first) and which match gold."""

    scores: np.ndarray  # [K]
    agnostic: np.ndarray  # bool [K]
    phrase: np.ndarray  # bool [K]
    gold: int


def match_image(image: SampleImage, policy: FilterPolicy, *, iou: float) -> Matched:
    """The boxes `filter` keeps for the image under `policy`, matched to its gold."""
    row = image.row
    kept = filter_row(row, policy) or []
    predictions = [xyxy_to_coco(box.bbox) for box in kept]
    phrases = row.phrases or []
    allowed = np.asarray(
        [[names_category(phrases[box.phrase]["text"], name) for name in image.gold_names] for box in kept], dtype=bool
    ).reshape(len(kept), len(image.gold_names))
    return Matched(
        scores=np.asarray([box.score for box in kept], dtype=np.float64),
        agnostic=greedy_matches(predictions, image.gold_boxes, iou=iou) >= 0,
        phrase=greedy_matches(predictions, image.gold_boxes, allowed=allowed, iou=iou) >= 0,
        gold=len(image.gold_boxes),
    )


@dataclass
class Counts:
    """Per image and threshold: `hits` (true positives of the scope), `kept` (its predicted
    positives), and per image `positives` (its gold units): precision = sum hits / sum kept,
    recall = sum hits / sum positives."""

    hits: np.ndarray  # [N, T]
    kept: np.ndarray  # [N, T]
    positives: np.ndarray  # [N]

    def precision(self, weights: np.ndarray | None = None) -> np.ndarray:
        hits, kept = (self.hits.sum(0), self.kept.sum(0)) if weights is None else (weights @ self.hits, weights @ self.kept)
        return np.divide(hits, kept, out=np.zeros(hits.shape), where=kept > 0)

    def recall(self, weights: np.ndarray | None = None) -> np.ndarray:
        if weights is None:
            hits, positives = self.hits.sum(0), np.asarray(self.positives.sum())
        else:
            hits, positives = weights @ self.hits, (weights @ self.positives)[:, None]  # [B, T], [B, 1]
        return np.divide(hits, positives, out=np.zeros(hits.shape), where=positives > 0)


def scope_counts(matched: list[Matched], *, scope: str, phrase: bool, thresholds: np.ndarray) -> Counts:
    """`Counts` of every image at every threshold (a box is kept when it scores above it)."""
    hits = np.zeros((len(matched), len(thresholds)))
    kept = np.zeros_like(hits)
    positives = np.zeros(len(matched))
    for i, image in enumerate(matched):
        correct = image.phrase if phrase else image.agnostic
        n_kept = np.searchsorted(-image.scores, -thresholds, side="left")  # boxes scoring > t
        n_hits = np.concatenate([[0], np.cumsum(correct)])[n_kept]
        if scope == "box":
            hits[i], kept[i], positives[i] = n_hits, n_kept, image.gold
        else:
            hits[i], kept[i], positives[i] = (n_kept > 0) & (n_hits == n_kept), n_kept > 0, image.gold > 0
    return Counts(hits=hits, kept=kept, positives=positives)


def threshold_counts(
    sample: list[SampleImage], policy: FilterPolicy, *, iou: float, scope: str, thresholds: np.ndarray
) -> dict[str, Counts]:
    """`Counts` of `policy` with `min_score` at each of `thresholds`, per matching (`MATCHES`).

    Without caption assignment one pass with no floor gives every threshold: greedy NMS and
    greedy matching both go in score order, so `min_score = t` keeps (and matches) the boxes of
    that pass scoring above t. `assign="caption"` breaks that: which objects pass t changes the
    assignment of the others to phrases (and so their boxes, phrases and NMS), so each image is
    filtered again at each threshold, once per distinct set of boxes above it (a threshold
    between two box scores keeps what the next lower one keeps)."""
    if policy.assign == "none":
        matched = [match_image(image, replace(policy, min_score=-1.0), iou=iou) for image in sample]
        return {m: scope_counts(matched, scope=scope, phrase=m == "phrase", thresholds=thresholds) for m in MATCHES}
    above = [np.sort([box.score for box in image.row.boxes or []])[::-1] for image in sample]
    cache: dict[tuple[int, int], Matched] = {}
    columns: dict[str, list[Counts]] = {m: [] for m in MATCHES}
    for threshold in thresholds:
        at_threshold = replace(policy, min_score=float(threshold))
        matched = []
        for i, image in enumerate(sample):
            key = (i, int(np.searchsorted(-above[i], -threshold, side="left")))  # boxes scoring > threshold
            if key not in cache:
                cache[key] = match_image(image, at_threshold, iou=iou)
            matched.append(cache[key])
        for m in MATCHES:
            columns[m].append(scope_counts(matched, scope=scope, phrase=m == "phrase", thresholds=np.asarray([-1.0])))
    return {
        m: Counts(
            hits=np.concatenate([c.hits for c in cols], axis=1), kept=np.concatenate([c.kept for c in cols], axis=1),
            positives=cols[0].positives,
        )
        for m, cols in columns.items()
    }


def positives_needed(target: float, margin: float) -> int:
    """Units a proportion near `target` needs: a 95% interval of +-`margin` (normal
    approximation), and at least 3 / (1 - target) so that even an error-free sample bounds the
    error rate below 1 - target (the rule of three: 0 errors in n gives a 95% bound of 3 / n)."""
    return max(math.ceil(Z95**2 * target * (1.0 - target) / margin**2), math.ceil(3.0 / (1.0 - target)))


@dataclass
class Curve:
    nms: str
    precision: np.ndarray  # [T] of the target's matching
    recall: np.ndarray
    phrase_precision: np.ndarray  # the other matchings, for the report
    phrase_recall: np.ndarray
    agnostic_precision: np.ndarray
    agnostic_recall: np.ndarray
    kept: np.ndarray  # [T] predicted units


def bootstrap_interval(counts: Counts, *, resamples: int, confidence: float, seed: int) -> dict[str, list[float]]:
    """Percentile interval of precision and recall over `resamples` resamplings of the images."""
    rng = np.random.default_rng(seed)
    n = len(counts.positives)
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)  # [B, N]
    low, high = 100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2
    precision, recall = counts.precision(weights)[:, 0], counts.recall(weights)[:, 0]
    return {
        "precision": [round(float(v), 4) for v in np.percentile(precision, [low, high])],
        "recall": [round(float(v), 4) for v in np.percentile(recall, [low, high])],
    }
