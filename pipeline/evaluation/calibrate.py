"""`pipeline calibrate`: pick a filter policy for a precision (or recall) target, from stored
detections and a small human-checked gold sample; no teacher runs.

Inputs: the pseudo-label stage's `detections/{shard}.parquet` (every box above the floor) and
a COCO file of gold boxes on some of the same web images (a sample key names a gold image by
its id, leading zeros ignored, or by its file name's stem: `evaluate.gold_image_id`).

The candidates are the policies `filter` would apply: for each NMS setting (`--nms`, default
none, phrase:0.5, all:0.5, all:0.7) and each threshold 0.00, 0.01, ..., 0.99, with the
phrase matching `filter --assign` will use (`--assign caption`: objects assigned to the
caption's phrases jointly; default none). Every sample image's boxes go through the filter's
own steps (`filtering.filter_row`), then are matched to the gold greedily by descending score
at IoU 0.5 (`evaluate.greedy_matches`, the COCOeval rule), class-agnostic and phrase-aware (a
box's phrase must name the gold box's category: the category's words appear in the phrase,
the last one possibly plural: "two blue rings" names "ring"). Without assignment one pass with
no floor gives the whole curve (`policy_rating.threshold_counts` says why); with it each
threshold is filtered again.

Scope `box`: precision = matched kept boxes / kept boxes, recall = matched gold boxes / gold
boxes. Scope `image` (a pseudo-labelled image is one training sample): precision = kept images
whose every kept box matches / kept images; recall = those clean images / sample images with
gold boxes.

The chosen policy reaches the target with the most recall (for `--target-recall`, with the
most precision); it is run again through `apply_policy` exactly as `filter` applies it, and its
measured precision and recall, their bootstrap interval (images resampled with replacement)
and the sample size go into the policy file (`filtering.load_policy_file` reads it).

Refused with one line (exit 2): a sample whose overlap with the detections is empty, gold
images missing from the detections, no policy reaching the target, and a sample too small to
support the target: estimating a proportion p within +-m at 95% needs 1.96^2 p (1 - p) / m^2
units and at least 3 / (1 - p) (kept boxes or images for a precision target, gold ones for a
recall target).
"""

from __future__ import annotations

import json
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, TextIO

import numpy as np
import typer

from pipeline.evaluation.calibration_plot import plot_curves
from pipeline.evaluation.evaluate import EvalError, gold_image_id, gold_key_index, load_gold
from pipeline.evaluation.policy_rating import (
    THRESHOLDS,
    Counts,
    Curve,
    SampleImage,
    MATCHES,
    bootstrap_interval,
    match_image,
    nms_setting,
    positives_needed,
    scope_counts,
    threshold_counts,
)
from pipeline.io import storage
from pipeline.io.labels_io import DetectionRow, detections_folder, read_detection_keys, read_detections
from pipeline.stages.filtering import FILTER_OPTIONS, FilterPolicy
from pipeline.user_errors import user_errors

STAGE = "calibrate"
DEFAULT_NMS = ("none", "phrase:0.5", "all:0.5", "all:0.7")


class CalibrationError(ValueError):
    """A sample or detections folder that cannot support the calibration (one line: file, reason)."""


@dataclass(frozen=True, kw_only=True)
class CalibrateConfig:
    detections: str  # pseudo-label output folder or its detections/
    gold: str  # COCO JSON of the checked sample
    out: str  # policy file to write
    target_precision: float | None = 0.8
    target_recall: float | None = None
    scope: str = "box"  # "box" | "image"
    match: str = "agnostic"  # "agnostic" | "phrase": which matching the target is for
    nms: tuple[str, ...] = DEFAULT_NMS
    assign: str = "none"  # the phrase matching `filter --assign` will apply: "none" | "caption"
    margin: float = 0.05  # the +- the sample must support on the target metric (95%)
    bootstrap: int = 1000
    confidence: float = 0.95
    seed: int = 0
    iou: float = 0.5
    plot: str | None = None

    def __post_init__(self) -> None:
        if (self.target_precision is None) == (self.target_recall is None):
            raise ValueError("give one target: --target-precision P or --target-recall R")
        target = self.target_precision if self.target_precision is not None else self.target_recall
        if not 0.0 < float(target) < 1.0:  # type: ignore[arg-type]
            raise ValueError(f"the target must be between 0 and 1, got {target}")
        if self.scope not in ("box", "image"):
            raise ValueError(f"--scope must be 'box' or 'image', got {self.scope!r}")
        if self.match not in ("agnostic", "phrase"):
            raise ValueError(f"--match must be 'agnostic' or 'phrase', got {self.match!r}")
        if not 0.0 < self.margin < 0.5:
            raise ValueError(f"--margin must be in (0, 0.5), got {self.margin}")
        for spec in self.nms:
            nms_setting(spec)
        if self.assign not in ("none", "caption"):
            raise ValueError(f"--assign must be 'none' or 'caption', got {self.assign!r}")


def load_sample(config: CalibrateConfig, *, progress_stream: TextIO | None = None) -> tuple[list[SampleImage], dict[str, str]]:
    """The gold images of the sample joined with their detection rows; refuses unknown keys."""
    stream = progress_stream if progress_stream is not None else sys.stderr
    try:
        gold = load_gold(config.gold)
    except EvalError as error:
        raise CalibrationError(str(error)) from None
    folder = detections_folder(config.detections)
    if not storage.is_dir(folder):
        raise CalibrationError(f"{config.detections}: detections folder not found")
    files = [storage.join(folder, name) for name in storage.list_names(folder) if name.endswith(".parquet")]
    if not files:
        raise CalibrationError(f"{folder}: no detections/*.parquet files (run pseudo-label first)")
    index = gold_key_index(gold)
    found, metadata, example_key = _sample_rows(files, index, stream=stream)
    images = gold.dataset["images"]
    known = {int(i["id"]) for i in images}
    strays = sorted({int(a["image_id"]) for a in gold.dataset["annotations"]} - known)
    if strays:
        raise CalibrationError(
            f"{config.gold}: annotations name {len(strays)} image ids that are not in its 'images' "
            f"(e.g. {', '.join(map(str, strays[:5]))})"
        )
    if not found:
        gold_examples = ", ".join(repr(Path(i["file_name"]).stem) for i in images[:2])
        raise CalibrationError(
            f"{config.gold}: none of its {len(images)} images is in {folder} (gold names such as {gold_examples}; "
            f"detection keys such as {example_key!r}): the sample must come from the detected shards"
        )
    missing = [int(i["id"]) for i in images if int(i["id"]) not in found]
    if missing:
        raise CalibrationError(
            f"{config.gold}: {len(missing)} of {len(images)} gold images have no detections in {folder} "
            f"(image ids {', '.join(map(str, missing[:5]))}{', ...' if len(missing) > 5 else ''}): "
            "label images of the detected shards, or remove these from the sample"
        )
    names = {int(c["id"]): str(c["name"]) for c in gold.dataset["categories"]}
    sample = []
    for info in sorted(images, key=lambda i: int(i["id"])):
        anns = [a for a in gold.imgToAnns.get(int(info["id"]), []) if not a.get("iscrowd", 0)]
        sample.append(
            SampleImage(
                image_id=int(info["id"]), row=found[int(info["id"])][1],
                gold_boxes=[list(map(float, a["bbox"])) for a in anns], gold_names=[names.get(int(a["category_id"]), "") for a in anns],
            )
        )
    return sample, metadata


def _sample_rows(
    files: list[str], index: dict[str, int], *, stream: TextIO
) -> tuple[dict[int, tuple[str, DetectionRow]], dict[str, str], str | None]:
    """The detection rows of the sample's gold images in `files` ({gold image id: (file, row)}),
    the detections' metadata (of the first file that has any) and an example key; refuses a
    gold image that two rows name."""

    def read(uri: str) -> tuple[str, list[DetectionRow], dict[str, str], str | None]:
        import pyarrow as pa

        try:
            keys = read_detection_keys(uri)
            wanted = {key for key in keys if gold_image_id(index, key) is not None}
            rows, metadata = read_detections(uri, keys=wanted) if wanted else ([], {})
        except (pa.ArrowException, OSError, KeyError) as error:
            raise CalibrationError(f"{uri}: not a readable detections file ({type(error).__name__}: {error})") from None
        return uri, rows, metadata, keys[0] if keys else None

    found: dict[int, tuple[str, DetectionRow]] = {}
    metadata: dict[str, str] = {}
    example_key = None
    last_print = time.perf_counter()
    with ThreadPoolExecutor(max_workers=8) as pool:  # object stores are slow per file
        for done, (uri, rows, file_metadata, first_key) in enumerate(pool.map(read, files), start=1):
            example_key = example_key or first_key
            metadata = metadata or file_metadata
            for row in rows:
                image_id = gold_image_id(index, row.key)
                assert image_id is not None
                if image_id in found:
                    raise CalibrationError(f"{uri}: key {row.key!r} names gold image {image_id}, as {found[image_id][0]} does")
                found[image_id] = (uri, row)
            if time.perf_counter() - last_print >= 5.0 or done == len(files):
                last_print = time.perf_counter()
                print(f"[{STAGE}] detections {done}/{len(files)} files, {len(found)} sample images found", file=stream, flush=True)
    return found, metadata, example_key


def curves(sample: list[SampleImage], config: CalibrateConfig) -> list[Curve]:
    result = []
    for spec in config.nms:
        iou, nms_scope = nms_setting(spec)
        candidate = FilterPolicy(nms_iou=iou, nms_scope=nms_scope, drop_empty=False, assign=config.assign)
        counts = threshold_counts(sample, candidate, iou=config.iou, scope=config.scope, thresholds=THRESHOLDS)
        agnostic, phrase = counts["agnostic"], counts["phrase"]
        chosen = phrase if config.match == "phrase" else agnostic
        result.append(
            Curve(
                nms=spec, precision=chosen.precision(), recall=chosen.recall(), phrase_precision=phrase.precision(),
                phrase_recall=phrase.recall(), agnostic_precision=agnostic.precision(), agnostic_recall=agnostic.recall(),
                kept=chosen.kept.sum(0),
            )
        )
    return result


def choose(curve_list: list[Curve], config: CalibrateConfig) -> tuple[int, int]:
    """(curve index, threshold index) of the policy meeting the target with the most recall
    (a recall target: the most precision); CalibrationError when none meets it."""
    best: tuple[float, float, int, int] | None = None
    for c, curve in enumerate(curve_list):
        for t in range(len(THRESHOLDS)):
            precision, recall = float(curve.precision[t]), float(curve.recall[t])
            if curve.kept[t] == 0:
                continue
            if config.target_precision is not None:
                key = (recall, precision) if precision >= config.target_precision else None
            else:
                key = (precision, recall) if recall >= config.target_recall else None  # type: ignore[operator]
            if key is not None and (best is None or key > best[:2]):
                best = (*key, c, t)
    if best is None:
        metric = "precision" if config.target_precision is not None else "recall"
        values = [curve.precision if metric == "precision" else curve.recall for curve in curve_list]
        top = max(float(v.max()) for v in values)
        raise CalibrationError(
            f"{config.gold}: no policy reaches {metric} {config.target_precision or config.target_recall} "
            f"({config.scope} scope, {config.match} matching) on this sample: the best is {top:.3f}"
        )
    return best[2], best[3]


def run_calibrate(config: CalibrateConfig, *, progress_stream: TextIO | None = None) -> dict[str, object]:
    """Calibrate, write the policy file (and the plot); returns the policy file's content."""
    sample, metadata = load_sample(config, progress_stream=progress_stream)
    curve_list = curves(sample, config)
    c, t = choose(curve_list, config)
    iou, nms_scope = nms_setting(config.nms[c])
    policy = FilterPolicy(
        name="calibrated", min_score=float(THRESHOLDS[t]), nms_iou=iou, nms_scope=nms_scope, drop_empty=True, assign=config.assign
    )
    # The chosen policy exactly as `filter` applies it: the numbers written are its own.
    matched = [match_image(image, policy, iou=config.iou) for image in sample]
    at_floor = np.asarray([-1.0])
    measures = {
        match: scope_counts(matched, scope=config.scope, phrase=match == "phrase", thresholds=at_floor)
        for match in MATCHES
    }
    counts = measures[config.match]
    precision, recall = float(counts.precision()[0]), float(counts.recall()[0])
    interval = bootstrap_interval(counts, resamples=config.bootstrap, confidence=config.confidence, seed=config.seed)
    target_metric = "precision" if config.target_precision is not None else "recall"
    target = float(config.target_precision if config.target_precision is not None else config.target_recall)  # type: ignore[arg-type]
    units = "boxes" if config.scope == "box" else "images"
    needed = _check_sample_size(config, counts, images=len(sample), target_metric=target_metric, target=target, units=units)
    result = {
        "policy": policy.to_dict(),
        "calibration": {
            "target": {"metric": target_metric, "value": target, "scope": config.scope, "match": config.match, "iou": config.iou},
            "precision": round(precision, 4),
            "recall": round(recall, 4),
            "precision_interval": interval["precision"],
            "recall_interval": interval["recall"],
            "confidence": config.confidence,
            "bootstrap": {"resamples": config.bootstrap, "seed": config.seed, "unit": "image"},
            "by_match": {
                match: {"precision": round(float(m.precision()[0]), 4), "recall": round(float(m.recall()[0]), 4)}
                for match, m in measures.items()
            },
            "sample": {
                "gold": config.gold,
                "images": len(sample),
                "gold_boxes": sum(len(image.gold_boxes) for image in sample),
                "not_grounded": sum(image.row.error is not None for image in sample),
                f"kept_{units}": int(counts.kept.sum()),
                f"gold_{units}": int(counts.positives.sum()),
                "positives_needed": needed,
                "margin": config.margin,
            },
            "detections": config.detections,
            "teacher": json.loads(metadata.get("teacher", "{}")),
            "floor": float(metadata["floor"]) if "floor" in metadata else None,
            "curves": _curve_rows(curve_list, units),
        },
    }
    storage.write_atomic(config.out, (json.dumps(result, indent=1) + "\n").encode("utf-8"))
    if config.plot:
        plot_curves(result, config.plot, stream=progress_stream)
    return result


def _check_sample_size(
    config: CalibrateConfig, counts: Counts, *, images: int, target_metric: str, target: float, units: str
) -> int:
    """The positives the target needs (`positives_needed`); CalibrationError when the sample
    (`counts` of its `images` images under the chosen policy) gives fewer."""
    needed = positives_needed(target, config.margin)
    have = int(counts.kept.sum()) if target_metric == "precision" else int(counts.positives.sum())
    if have < needed:
        per_image = have / images
        more = math.ceil((needed - have) / per_image) if per_image > 0 else None
        what = f"kept {units} at the operating point" if target_metric == "precision" else f"gold {units}"
        raise CalibrationError(
            f"{config.gold}: the sample is too small for {target_metric} {target} +- {config.margin}: it needs "
            f"{needed} positives ({what}) and gives {have} from {images} images"
            + (f"; label about {more} more images, or widen --margin" if more else "; widen --margin")
        )
    return needed


def _curve_rows(curve_list: list[Curve], units: str) -> list[dict[str, object]]:
    """The policy file's `curves`: per NMS setting, precision and recall at every threshold."""
    return [
        {
            "nms": curve.nms,
            "min_score": THRESHOLDS.tolist(),
            f"kept_{units}": curve.kept.astype(int).tolist(),
            **{
                name: np.round(getattr(curve, name), 4).tolist()
                for name in ("agnostic_precision", "agnostic_recall", "phrase_precision", "phrase_recall")
            },
        }
        for curve in curve_list
    ]


@user_errors(ValueError, FileNotFoundError)
def calibrate_command(
    detections: str = typer.Argument(..., help="pseudo-label output folder (or its detections/)."),
    gold: str = typer.Option(..., "--gold", help="COCO JSON of checked boxes on some of the detected images."),
    out: str = typer.Option(..., "--out", help="Policy file to write (use it with --policy)."),
    target_precision: Optional[float] = typer.Option(None, "--target-precision", help="Precision to reach (default 0.8)."),
    target_recall: Optional[float] = typer.Option(None, "--target-recall", help="Recall to reach instead (most precise policy)."),
    scope: str = typer.Option("box", "--scope", help="Unit of precision/recall: box or image."),
    match: str = typer.Option("agnostic", "--match", help="Target's matching: agnostic (boxes) or phrase (box and phrase)."),
    nms: list[str] = typer.Option(list(DEFAULT_NMS), "--nms", help="NMS settings to try: none, phrase:IOU, all:IOU (repeatable)."),
    assign: Optional[str] = FILTER_OPTIONS["assign"],
    margin: float = typer.Option(0.05, "--margin", help="The +- (95%) the sample must support on the target metric."),
    bootstrap: int = typer.Option(1000, "--bootstrap", min=10, help="Bootstrap resamples of the images."),
    seed: int = typer.Option(0, "--seed", help="Bootstrap seed."),
    plot: Optional[str] = typer.Option(None, "--plot", help="Write the precision/recall curves here (PNG; needs matplotlib)."),
) -> None:
    """Pick the filter policy that reaches a precision (or recall) target on a gold sample.

    Example: pipeline calibrate runs/pl --gold checked.json --target-precision 0.8 --out policy.json --plot pr.png

    Then: pipeline filter shards/ --detections runs/pl --policy policy.json --out runs/filtered

    Give calibrate the --assign the filter will use: the policy file keeps it, and the figures are those of that filter.

    Reads the stored detections only (no teacher runs).

    Refuses (exit 2) a sample that does not overlap the detections, gold images without detections, and a sample too small for the target.
    """
    config = CalibrateConfig(
        detections=detections, gold=gold, out=out,
        target_precision=target_precision if target_precision is not None or target_recall is not None else 0.8,
        target_recall=target_recall, scope=scope, match=match, nms=tuple(nms), assign=assign or "none", margin=margin, bootstrap=bootstrap,
        seed=seed, plot=plot,
    )
    result = run_calibrate(config)
    calibration = result["calibration"]
    policy = result["policy"]
    nms_text = "none" if policy["nms_iou"] is None else f"{policy['nms_scope']}:{policy['nms_iou']}"
    low, high = calibration["precision_interval"]
    r_low, r_high = calibration["recall_interval"]
    print(
        f"calibrate: min_score {policy['min_score']}, NMS {nms_text}, assign {policy['assign']}: precision {calibration['precision']:.3f} "
        f"[{low:.3f}, {high:.3f}], recall {calibration['recall']:.3f} [{r_low:.3f}, {r_high:.3f}] "
        f"({calibration['target']['scope']} scope, {calibration['sample']['images']} images). Policy: {out}"
    )
