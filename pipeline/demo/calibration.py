"""The demo's calibration check: `pipeline calibrate` on the hidden gold of a small random
part of the web split (a person would check that many images by hand), `pipeline filter` of
every web image with the calibrated policy, and the precision it reaches on the other images,
against the target and the interval the sample gave.

With `--preset calibrated` (the default and large sizes' default) the student trains on the
calibrated policy's labels. Everything is box scope, class-agnostic, IoU 0.5 (the presets'
figures in the report use the same matching), and the presets are rated on the same held-out
images beside the calibrated policy.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class DemoCalibration:
    fraction: float = 0.1  # of the web split's images, drawn at random, as the checked sample
    target_precision: float = 0.8
    # The +- (95%) the sample must support: 0.1 needs 62 kept boxes at precision 0.8, which 10%
    # of the default web split gives (0.05 would need 246: a third of it).
    margin: float = 0.1


def split_gold(web_gold: Path, out: Path, *, fraction: float, seed: int) -> tuple[Path, Path]:
    """Write `out/sample.json` (a random `fraction` of the images, with their boxes) and
    `out/rest.json` (the others); same seed, same split."""
    gold = json.loads(Path(web_gold).read_text())
    ids = sorted(int(info["id"]) for info in gold["images"])
    count = min(len(ids), max(1, round(fraction * len(ids))))
    chosen = {int(i) for i in np.random.default_rng([seed, 16]).choice(ids, size=count, replace=False)}
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for name, keep in (("sample", lambda i: i in chosen), ("rest", lambda i: i not in chosen)):
        part = {
            **gold,
            "images": [info for info in gold["images"] if keep(int(info["id"]))],
            "annotations": [ann for ann in gold["annotations"] if keep(int(ann["image_id"]))],
        }
        (out / f"{name}.json").write_text(json.dumps(part))
        files.append(out / f"{name}.json")
    return files[0], files[1]


def calibrate_on_part(
    *, shards: str, detections: str, web_gold: Path, out: Path, filtered: dict[str, str], seed: int,
    settings: DemoCalibration = DemoCalibration(), assign: str = "none",
) -> dict:
    """Calibrate on a sample of `web_gold`, filter `shards` with the policy into `out/filtered`,
    and rate it and each preset's output (`filtered`: name -> filter output folder) on the rest.
    `assign` ("caption") is the filter's phrase matching (`--assign`), as for the presets:
    calibrate rates its candidates with it and the policy file keeps it, so the precision on
    the rest is measured on what the rated policy keeps.

    A calibration the sample cannot support is part of the result (`refused`: calibrate's own
    one-line reason), not an error: the small world's 4-step teacher reaches no target."""
    from pipeline.evaluation.calibrate import CalibrateConfig, CalibrationError, run_calibrate
    from pipeline.stages.filter_stage import FilterConfig, run_filter
    from pipeline.stages.filtering import load_policy_file

    sample, rest = split_gold(web_gold, out, fraction=settings.fraction, seed=seed)
    result: dict = {"settings": asdict(settings), "seed": seed}
    try:
        calibration = run_calibrate(
            CalibrateConfig(
                detections=detections, gold=str(sample), out=str(out / "policy.json"),
                target_precision=settings.target_precision, margin=settings.margin, seed=seed, assign=assign,
            )
        )
    except CalibrationError as error:
        return {**result, "refused": str(error), "rest": _rate_presets(rest, filtered)}
    measured = calibration["calibration"]
    folder = out / "filtered"
    policy = load_policy_file(str(out / "policy.json"))
    stats = run_filter(FilterConfig(inputs=(shards,), detections=detections, out=str(folder), policy=policy))
    on_rest = _rate(rest, str(folder / "pseudo"))
    low, high = measured["precision_interval"]
    return {
        **result,
        "policy": calibration["policy"],
        "sample": {
            "images": measured["sample"]["images"],
            "kept_boxes": measured["sample"]["kept_boxes"],
            "precision": measured["precision"],
            "precision_interval": measured["precision_interval"],
            "recall": measured["recall"],
            "recall_interval": measured["recall_interval"],
        },
        "calibrated_on_rest": on_rest,
        "filtered_images": stats["written"],  # the whole split's images with a kept box
        "inside_interval": bool(low <= on_rest["precision50"] <= high),
        "rest": _rate_presets(rest, filtered),
    }


def _rate(gold_file: Path, pseudo_folder: str) -> dict:
    """Class-agnostic precision/recall at IoU 0.5 of the pseudo-labels on `gold_file`'s images."""
    from pipeline.evaluation.evaluate import load_gold, pseudo_predictions, score_boxes

    gold = load_gold(gold_file)
    predictions = pseudo_predictions(gold, [pseudo_folder])
    quality = score_boxes(gold, predictions, class_agnostic=True)
    return {"gold_images": quality.num_images, "boxes": quality.num_predictions,
            "precision50": round(quality.precision50, 4), "recall50": round(quality.recall50, 4)}


def _rate_presets(rest: Path, filtered: dict[str, str]) -> dict:
    return {name: _rate(rest, str(Path(folder) / "pseudo")) for name, folder in filtered.items()}
