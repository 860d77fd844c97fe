"""`pipeline eval`: COCO AP scoring, pseudo-label precision/recall, the CLI on a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.evaluation.evaluate import (
    AP_KEYS,
    EvalError,
    load_gold,
    precision_recall_at,
    score_boxes,
    xyxy_to_coco,
)
from tests.test_train_data import write_pseudo_shards

COCO = "coco_mini/annotations/instances_train2017_subset.json"
IMAGES = "coco_mini/train2017"


@pytest.fixture(scope="module")
def gold(shared_data: Path):
    return load_gold(shared_data / COCO)


def _gold_predictions(gold, *, shift: float = 0.0) -> list[dict]:
    """Gold boxes as predictions, through the legacy xyxy round trip the model path uses."""
    predictions = []
    for ann in gold.dataset["annotations"]:
        if ann["iscrowd"]:
            continue
        x, y, w, h = ann["bbox"]
        xyxy = [x + shift, y, x + w - 1 + shift, y + h - 1]
        predictions.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "bbox": xyxy_to_coco(xyxy), "score": 0.9})
    return predictions


def test_xyxy_to_coco_adds_one():
    assert xyxy_to_coco([10.0, 20.0, 14.0, 20.0]) == [10.0, 20.0, 5.0, 1.0]


def test_perfect_predictions_score_one(gold):
    result = score_boxes(gold, _gold_predictions(gold))
    assert set(result.ap) == set(AP_KEYS)
    assert result.ap["AP"] == pytest.approx(1.0) and result.ap["AP50"] == pytest.approx(1.0)
    assert result.precision50 == 1.0 and result.recall50 == 1.0
    assert result.num_gold == sum(1 for a in gold.dataset["annotations"] if not a["iscrowd"])


def test_shifted_and_missing_predictions_score_lower(gold):
    shifted = score_boxes(gold, _gold_predictions(gold, shift=15.0))
    assert 0.0 < shifted.ap["AP"] < 0.9 and shifted.ap["AP50"] > shifted.ap["AP75"]
    # Every other prediction dropped, and as many wrong-class copies added.
    predictions = _gold_predictions(gold)
    kept = predictions[::2]
    wrong = [{**p, "category_id": 1 if p["category_id"] != 1 else 2, "score": 0.5} for p in kept]
    result = score_boxes(gold, kept + wrong)
    assert result.recall50 == pytest.approx(len(kept) / len(predictions))
    assert result.precision50 == pytest.approx(0.5)
    # Class-agnostic: a wrong-class copy may now match a neighbouring gold box it overlaps;
    # matching stays one-to-one (as many matched predictions as matched gold boxes).
    agnostic_p, agnostic_r = precision_recall_at(gold, kept + wrong, class_agnostic=True)
    assert agnostic_p >= 0.5 and agnostic_r >= result.recall50
    assert agnostic_p * 2 * len(kept) == pytest.approx(agnostic_r * result.num_gold)


def test_pseudo_labels_against_gold_via_cli(tmp_path, shared_data, gold):
    coco = json.loads((shared_data / COCO).read_text())
    # Pseudo samples keyed by COCO image id, regions = the gold boxes (first 3 per image).
    write_pseudo_shards(tmp_path / "raw", shared_data, coco, shards=2, per_shard=5)
    images = sorted(coco["images"], key=lambda i: i["id"])
    import io
    import tarfile

    (tmp_path / "pseudo").mkdir()
    for shard in sorted((tmp_path / "raw").glob("*.tar")):
        with tarfile.open(shard) as source, tarfile.open(tmp_path / "pseudo" / shard.name, "w") as target:
            for member in source.getmembers():
                data = source.extractfile(member).read()
                key, ext = member.name.split(".", 1)
                index = int(key[:5]) * 5 + int(key[5:])
                image_id = str(images[index]["id"])
                if ext == "json":
                    sample = json.loads(data)
                    sample["key"] = image_id
                    data = json.dumps(sample).encode()
                info = tarfile.TarInfo(f"{image_id}.{ext}")
                info.size = len(data)
                target.addfile(info, io.BytesIO(data))
    labelled = {int(images[i]["id"]) for i in range(10)}
    expected_gold = sum(1 for a in coco["annotations"] if a["image_id"] in labelled and not a["iscrowd"])
    expected_pred = sum(min(3, sum(1 for a in coco["annotations"] if a["image_id"] == i)) for i in labelled)
    result = CliRunner().invoke(app, ["eval", "--pseudo", str(tmp_path / "pseudo"), "--coco", str(shared_data / COCO), "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)
    assert metrics["num_predictions"] == expected_pred
    # Pseudo boxes are exact gold boxes (xyxy with +1 width is within IoU 0.5 easily): all match,
    # recall counts gold boxes of every gold image (80 images, only 10 labelled).
    assert metrics["precision50"] == 1.0
    assert metrics["recall50"] == pytest.approx(expected_pred / metrics["num_gold"])
    assert expected_pred <= expected_gold


def test_eval_cli_on_a_checkpoint_prints_table_and_json(tmp_path, shared_data, gold):
    from model.weights.checkpoint import save_glip
    from model.config import get_config
    from model.network.glip import GLIP

    torch.manual_seed(0)
    checkpoint = save_glip(GLIP(get_config("tiny")), tmp_path / "random.pth")
    subset = dict(gold.dataset)
    subset["images"] = gold.dataset["images"][:2]
    ids = {i["id"] for i in subset["images"]}
    subset["annotations"] = [a for a in gold.dataset["annotations"] if a["image_id"] in ids]
    (tmp_path / "subset.json").write_text(json.dumps(subset))
    runner = CliRunner()
    args = ["eval", "--model", str(checkpoint), "--coco", str(tmp_path / "subset.json"), "--images", str(shared_data / IMAGES), "--min-size", "128", "--max-size", "224"]
    table = runner.invoke(app, args)
    assert table.exit_code == 0, table.output
    assert "AP50" in table.output and "APl" in table.output and "images 2" in table.output
    as_json = runner.invoke(app, args + ["--json"])
    assert as_json.exit_code == 0, as_json.output
    metrics = json.loads(as_json.output.strip().splitlines()[-1])
    assert set(AP_KEYS) <= set(metrics) and metrics["num_images"] == 2
    missing = runner.invoke(app, ["eval", "--model", str(checkpoint), "--coco", str(tmp_path / "nope.json"), "--images", str(shared_data / IMAGES)])
    assert missing.exit_code == 2 and "nope.json: annotation file not found" in missing.output


def test_load_gold_rejects_non_coco(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"images": []}')
    with pytest.raises(EvalError, match="x.json: not a COCO detection file"):
        load_gold(path)


def test_pseudo_label_names_per_category_against_hidden_gold(tmp_path):
    """Hand-counted: image 1 holds a ring and a square, image 2 a ring but no pseudo sample."""
    import io
    import tarfile

    from pipeline.evaluation.evaluate import load_gold
    from pipeline.evaluation.label_names import names_by_category

    gold = {
        "images": [{"id": 1, "file_name": "000001.jpg", "width": 100, "height": 100},
                   {"id": 2, "file_name": "000002.jpg", "width": 100, "height": 100}],
        "categories": [{"id": 1, "name": "square"}, {"id": 2, "name": "ring"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 2, "bbox": [0, 0, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [50, 50, 30, 30], "area": 900, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 2, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0},
        ],
    }
    (tmp_path / "gold.json").write_text(json.dumps(gold))
    regions = [
        {"bbox": [0, 0, 20, 20], "phrase": "two blue rings", "score": 0.4},  # right: on the ring
        {"bbox": [1, 1, 21, 21], "phrase": "a red square", "score": 0.6},  # wrong: a square name on the ring
        {"bbox": [50, 50, 80, 80], "phrase": "a green thing", "score": 0.5},  # names no category
    ]
    sample = {"key": "000001", "width": 100, "height": 100, "grounding": {"caption": "x", "regions": regions}}
    (tmp_path / "pseudo").mkdir()
    with tarfile.open(tmp_path / "pseudo" / "00000.tar", "w") as tar:
        for name, data in (("000001.jpg", b"jpeg"), ("000001.json", json.dumps(sample).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    names = names_by_category(load_gold(tmp_path / "gold.json"), [str(tmp_path / "pseudo")])
    assert names["ring"] == {"labels": 1, "right": 1, "gold": 2, "named": 1, "precision": 1.0, "recall": 0.5}
    assert names["square"] == {"labels": 1, "right": 0, "gold": 1, "named": 0, "precision": 0.0, "recall": 0.0}
