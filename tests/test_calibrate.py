"""`pipeline calibrate` on real COCO boxes: detections files written by the stage's own writer
from the gold boxes of coco_mini (a simulated teacher: jittered true boxes, duplicates, wrong
phrases and false boxes with overlapping scores), a 40-image gold sample, and the calibrated
policy applied by a real `pipeline filter` run on the other 40 images."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.evaluation.calibrate import CalibrateConfig, load_sample, run_calibrate
from pipeline.evaluation.evaluate import load_gold, pseudo_predictions, score_boxes, xyxy_to_coco
from pipeline.evaluation.policy_rating import THRESHOLDS, match_image, names_category, positives_needed, scope_counts
from pipeline.io.labels_io import Box, DetectionRow, write_detections
from pipeline.stages.filtering import FilterPolicy, filter_row, load_policy_file
from tests.pseudo_fixtures import COCO_IMAGES, write_shard

COCO = "coco_mini/annotations/instances_train2017_subset.json"


def _subset(coco: dict, ids: set[int]) -> dict:
    return {
        **coco,
        "images": [i for i in coco["images"] if i["id"] in ids],
        "annotations": [a for a in coco["annotations"] if a["image_id"] in ids],
    }


def _teacher_row(image: dict, anns: list[dict], names: dict[int, str], rng: np.random.Generator) -> DetectionRow:
    """What a teacher might store for one image: most gold boxes found (jittered), some twice,
    some under another category's phrase, and false boxes; true boxes score higher on average."""
    width, height = image["width"], image["height"]
    texts = sorted({f"the {name}" for name in names.values()})
    caption = ", ".join(texts)
    phrases, cursor = [], 0
    for text in texts:
        start = caption.index(text, cursor)
        cursor = start + len(text)
        phrases.append({"text": text, "start": start, "end": cursor})
    phrase_of = {text: index for index, text in enumerate(texts)}
    boxes = []
    for ann in anns:
        if ann["iscrowd"] or rng.random() > 0.85:
            continue
        x, y, w, h = ann["bbox"]
        jitter = rng.normal(0, 0.04, 4) * [w, h, w, h]
        bbox = (x + jitter[0], y + jitter[1], x + w + jitter[2], y + h + jitter[3])
        name = names[ann["category_id"]] if rng.random() > 0.15 else names[int(rng.choice(list(names)))]
        score = float(np.clip(rng.normal(0.62, 0.15), 0.06, 0.99))
        boxes.append(Box(bbox=bbox, score=score, phrase=phrase_of[f"the {name}"]))
        if rng.random() < 0.3:  # a duplicate a little off, scoring lower: NMS removes it
            shift = 0.08 * w
            boxes.append(Box(bbox=(bbox[0] + shift, bbox[1], bbox[2] + shift, bbox[3]), score=max(0.06, score - 0.2), phrase=boxes[-1].phrase))
    for _ in range(rng.poisson(3)):
        w, h = rng.uniform(0.1, 0.5) * width, rng.uniform(0.1, 0.5) * height
        x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
        score = float(np.clip(rng.normal(0.35, 0.15), 0.06, 0.99))
        boxes.append(Box(bbox=(x, y, x + w, y + h), score=score, phrase=int(rng.integers(len(texts)))))
    boxes.sort(key=lambda b: -b.score)
    boxes = [Box(bbox=tuple(round(float(v), 2) for v in b.bbox), score=round(b.score, 4), phrase=b.phrase) for b in boxes]
    return DetectionRow(key=Path(image["file_name"]).stem, image_ext="jpg", width=width, height=height, caption=caption, phrases=phrases, boxes=boxes)


@pytest.fixture(scope="module")
def world(tmp_path_factory, shared_data):
    """4 image shards of 20 coco_mini images, their detections, gold of the even and odd images."""
    root = tmp_path_factory.mktemp("calibrate")
    coco = json.loads((shared_data / COCO).read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    images = sorted(coco["images"], key=lambda i: i["id"])
    rng = np.random.default_rng(0)
    (root / "pl" / "detections").mkdir(parents=True)
    (root / "shards").mkdir()
    for shard in range(4):
        chunk = images[shard * 20 : (shard + 1) * 20]
        rows = [_teacher_row(i, [a for a in coco["annotations"] if a["image_id"] == i["id"]], names, rng) for i in chunk]
        write_detections(str(root / "pl" / "detections" / f"{shard:05d}.parquet"), rows, {"floor": "0.05", "teacher": "{}"})
        write_shard(root / "shards" / f"{shard:05d}.tar", [(r.key, "jpg", (shared_data / COCO_IMAGES / f"{r.key}.jpg").read_bytes(), r.caption) for r in rows])
    sample_ids = {i["id"] for i in images[0::2]}
    (root / "sample.json").write_text(json.dumps(_subset(coco, sample_ids)))
    (root / "rest.json").write_text(json.dumps(_subset(coco, {i["id"] for i in images} - sample_ids)))
    return root


@pytest.fixture(scope="module")
def calibrated(world):
    config = CalibrateConfig(
        detections=str(world / "pl"), gold=str(world / "sample.json"), out=str(world / "policy.json"),
        target_precision=0.8, margin=0.1, plot=str(world / "pr.png"),
    )
    return run_calibrate(config)


def test_names_category_and_sample_size():
    assert names_category("two blue rings", "ring") and names_category("a Hot Dog.", "hot dog")
    assert names_category("the boxes", "box") and not names_category("a dogma", "dog")
    assert positives_needed(0.8, 0.05) == 246 and positives_needed(0.8, 0.1) == 62
    assert positives_needed(0.999, 0.05) == 3000  # an error-free sample must still bound 0.1% errors


def test_policy_file_reaches_the_target_and_reproduces_apply_policy(world, calibrated):
    calibration = calibrated["calibration"]
    policy = load_policy_file(str(world / "policy.json"))
    assert policy.name == "calibrated" and policy.min_score == calibrated["policy"]["min_score"]
    assert calibration["precision"] >= 0.8
    low, high = calibration["precision_interval"]
    assert low <= calibration["precision"] <= high and high - low < 0.2
    assert calibration["sample"]["images"] == 40 and calibration["sample"]["kept_boxes"] >= 62
    # Phrase-aware matching also needs the right phrase: never above class-agnostic.
    assert calibration["by_match"]["phrase"]["precision"] <= calibration["by_match"]["agnostic"]["precision"]
    # The one-pass curve equals `score_boxes` of what `filter` keeps, at any threshold.
    curve = next(c for c in calibration["curves"] if c["nms"] == "all:0.5")
    _assert_curve_is_the_filters(world, curve, FilterPolicy(nms_iou=0.5, nms_scope="all"), (0.3, 0.55))
    assert (world / "pr.png").read_bytes()[:4] == b"\x89PNG"


def _assert_curve_is_the_filters(world: Path, curve: dict, policy: FilterPolicy, thresholds) -> None:
    """The curve's class-agnostic precision and recall at `thresholds` are `score_boxes` of the
    sample images' boxes that `filter_row` keeps with `policy` at that min_score."""
    from pipeline.io.labels_io import read_detections

    gold = load_gold(world / "sample.json")
    rows = [row for shard in sorted((world / "pl" / "detections").glob("*.parquet")) for row in read_detections(str(shard))[0]]
    by_key = {row.key: row for row in rows}
    for threshold in thresholds:
        check = replace(policy, min_score=threshold)
        predictions = []
        for info in gold.dataset["images"]:
            for box in filter_row(by_key[Path(info["file_name"]).stem], check) or []:
                predictions.append({"image_id": info["id"], "category_id": 1, "bbox": xyxy_to_coco(box.bbox), "score": box.score})
        result = score_boxes(gold, predictions, class_agnostic=True)
        at = curve["min_score"].index(threshold)
        assert curve["agnostic_precision"][at] == pytest.approx(result.precision50, abs=1e-4)
        assert curve["agnostic_recall"][at] == pytest.approx(result.recall50, abs=1e-4)


def test_assign_caption_is_rated_as_the_filter_applies_it(world, tmp_path):
    # With caption assignment the objects above a threshold decide which phrase each takes, so
    # no one pass gives the curve: each threshold is filtered again, exactly as `filter` will.
    out = tmp_path / "policy.json"
    result = CliRunner().invoke(
        app, ["calibrate", str(world / "pl"), "--gold", str(world / "sample.json"), "--out", str(out), "--margin", "0.1",
              "--assign", "caption"],
    )
    assert result.exit_code == 0, result.output
    assert "assign caption" in result.stdout
    policy = load_policy_file(str(out))
    assert policy.assign == "caption" and policy.min_score > 0
    calibration = json.loads(out.read_text())["calibration"]
    assert calibration["precision"] >= 0.8
    curve = next(c for c in calibration["curves"] if c["nms"] == "all:0.5")
    caption = FilterPolicy(nms_iou=0.5, nms_scope="all", assign="caption")
    _assert_curve_is_the_filters(world, curve, caption, (0.25, policy.min_score, 0.61))
    # ... and the one-pass shortcut would not have given it.
    sample, _ = load_sample(CalibrateConfig(detections=str(world / "pl"), gold=str(world / "sample.json"), out=str(out)))
    one_pass = scope_counts(
        [match_image(image, replace(caption, min_score=-1.0), iou=0.5) for image in sample], scope="box", phrase=False,
        thresholds=THRESHOLDS,
    )
    assert not np.allclose(one_pass.recall(), curve["agnostic_recall"], atol=1e-4)


def test_filter_with_the_policy_lands_in_the_interval_on_the_rest(world, calibrated):
    out = world / "filtered"
    result = CliRunner().invoke(
        app, ["filter", str(world / "shards"), "--detections", str(world / "pl"), "--policy", str(world / "policy.json"),
              "--out", str(out), "--workers", "1"],
    )
    assert result.exit_code == 0, result.output
    rest = load_gold(world / "rest.json")
    achieved = score_boxes(rest, pseudo_predictions(rest, [str(out / "pseudo")]), class_agnostic=True)
    low, high = calibrated["calibration"]["precision_interval"]
    print(f"calibrated precision {calibrated['calibration']['precision']:.3f} [{low:.3f}, {high:.3f}] on the sample; "
          f"{achieved.precision50:.3f} achieved on the other {achieved.num_images} images")
    assert low <= achieved.precision50 <= high
    stats = json.loads((out / "_stats.json").read_text())
    assert stats["settings"]["filter"]["name"] == "calibrated"


def _error_lines(result) -> list[str]:
    assert result.exit_code == 2, result.output
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_refusals_are_one_line_with_exit_2(world, shared_data, tmp_path):
    coco = json.loads((shared_data / COCO).read_text())
    base = ["calibrate", str(world / "pl"), "--out", str(tmp_path / "p.json")]
    runner = CliRunner()
    (lines,) = _error_lines(runner.invoke(app, [*base, "--gold", str(world / "sample.json"), "--margin", "0.02"]))
    assert "too small" in lines and "needs 1537 positives" in lines and "sample.json" in lines
    renamed = {**coco, "images": [{**i, "id": i["id"] + 10**7, "file_name": f"x{i['id']}.jpg"} for i in coco["images"]],
               "annotations": [{**a, "image_id": a["image_id"] + 10**7} for a in coco["annotations"]]}
    (tmp_path / "other.json").write_text(json.dumps(renamed))
    (lines,) = _error_lines(runner.invoke(app, [*base, "--gold", str(tmp_path / "other.json")]))
    assert "none of its 80 images" in lines and "other.json" in lines
    extra = {**coco, "images": coco["images"] + [{**coco["images"][0], "id": 1, "file_name": "unknown.jpg"}]}
    (tmp_path / "extra.json").write_text(json.dumps(extra))
    (lines,) = _error_lines(runner.invoke(app, [*base, "--gold", str(tmp_path / "extra.json")]))
    assert "1 of 81 gold images have no detections" in lines and "image ids 1" in lines
    stray = {**coco, "annotations": coco["annotations"] + [{**coco["annotations"][0], "id": 10**9, "image_id": 7}]}
    (tmp_path / "stray.json").write_text(json.dumps(stray))
    (lines,) = _error_lines(runner.invoke(app, [*base, "--gold", str(tmp_path / "stray.json")]))
    assert "annotations name 1 image ids that are not in its 'images' (e.g. 7)" in lines
    (lines,) = _error_lines(runner.invoke(app, [*base, "--gold", str(world / "sample.json"), "--target-precision", "0.999"]))
    assert "needs 3000 positives" in lines
    (lines,) = _error_lines(runner.invoke(app, [*base, "--gold", str(world / "sample.json"), "--target-recall", "0.95"]))
    assert "no policy reaches recall 0.95" in lines
    (lines,) = _error_lines(runner.invoke(app, [*base, "--gold", str(tmp_path / "missing.json")]))
    assert "missing.json" in lines
    (tmp_path / "bad" / "detections").mkdir(parents=True)
    (tmp_path / "bad" / "detections" / "00000.parquet").write_bytes(b"not parquet")
    bad = runner.invoke(app, ["calibrate", str(tmp_path / "bad"), "--gold", str(world / "sample.json"), "--out", str(tmp_path / "p.json")])
    (lines,) = _error_lines(bad)
    assert "00000.parquet: not a readable detections file" in lines
    (tmp_path / "bad_policy.json").write_text(json.dumps({"policy": {"min_score": 0.5, "colour": "red"}}))
    filtered = runner.invoke(app, ["filter", str(world / "shards"), "--detections", str(world / "pl"), "--policy",
                                   str(tmp_path / "bad_policy.json"), "--out", str(tmp_path / "f")])
    (lines,) = _error_lines(filtered)
    assert "bad_policy.json" in lines and "colour" in lines


def test_demo_calibration_on_a_random_part_and_the_rest(world, shared_data):
    # The demo's section end to end on real boxes: half of the images drawn as the checked
    # sample, the calibrated policy filtered over all shards, rated on the other half.
    from pipeline.demo.calibration import DemoCalibration, calibrate_on_part

    coco = json.loads((shared_data / COCO).read_text())
    (world / "all.json").write_text(json.dumps(coco))
    out = world / "demo_calibration"
    result = calibrate_on_part(
        shards=str(world / "shards"), detections=str(world / "pl"), web_gold=world / "all.json", out=out, filtered={}, seed=3,
        settings=DemoCalibration(fraction=0.5, target_precision=0.8, margin=0.1),
    )
    sample, rest = (json.loads((out / f"{name}.json").read_text()) for name in ("sample", "rest"))
    sample_ids, rest_ids = {i["id"] for i in sample["images"]}, {i["id"] for i in rest["images"]}
    assert len(sample_ids) == 40 and sample_ids.isdisjoint(rest_ids) and sample_ids | rest_ids == {i["id"] for i in coco["images"]}
    assert sample_ids != {i["id"] for i in sorted(coco["images"], key=lambda i: i["id"])[0::2]}  # drawn, not every other one
    assert "refused" not in result and result["sample"]["images"] == 40 and result["sample"]["precision"] >= 0.8
    achieved = score_boxes(load_gold(out / "rest.json"), pseudo_predictions(load_gold(out / "rest.json"), [str(out / "filtered" / "pseudo")]),
                           class_agnostic=True)
    assert result["calibrated_on_rest"]["precision50"] == round(achieved.precision50, 4)
    assert result["calibrated_on_rest"]["gold_images"] == 40
    low, high = result["sample"]["precision_interval"]
    assert result["inside_interval"] == (low <= achieved.precision50 <= high)
    print(f"demo calibration: {result['sample']['precision']:.3f} [{low:.3f}, {high:.3f}] on the sample, "
          f"{achieved.precision50:.3f} on the rest")
