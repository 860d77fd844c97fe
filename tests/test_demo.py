"""`pipeline demo --size small`: the whole loop runs and its report holds real, consistent
figures (recomputed here from the run's own files with pycocotools)."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.train_config import setting


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    out = folder / "run"
    cwd = os.getcwd()
    os.chdir(folder)  # a relative --out, as the README's command gives (Ray workers run elsewhere)
    try:
        result = CliRunner().invoke(app, ["demo", "--size", "small", "--out", "run", "--seed", "0"])
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    assert "teacher AP" in result.output and "student AP" in result.output
    # The demo's last line gives both gaps (Ray's worker logs may still interleave after it).
    [last] = [line for line in result.output.splitlines() if line.startswith("demo: student - control")]
    assert "student - teacher" in last
    return out


def test_report_numbers_are_sane_and_reproducible(demo):
    from model.predict import GLIPPredictor
    from pipeline.evaluate import evaluate_model, load_gold, pseudo_predictions, score_boxes
    from pipeline.demo import SCHEDULES

    report = json.loads((demo / "report.json").read_text())
    test = json.loads((demo / "world/test/instances.json").read_text())
    assert set(report["models"]) == {"teacher", "student", "control"}
    for metrics in report["models"].values():
        assert metrics["num_images"] == len(test["images"]) and metrics["num_gold"] == len(test["annotations"])
        assert all(metrics[k] == -1.0 or 0.0 <= metrics[k] <= 1.0 for k in ("AP", "AP50", "AP75", "APs", "APm", "APl"))
    # The student's AP is what pycocotools gives for its checkpoint on the test split.
    schedule = SCHEDULES["small"]
    predictor = GLIPPredictor.from_checkpoint(
        report["training"]["student"]["checkpoint"], min_size=schedule.test_min_size, max_size=schedule.max_size
    )
    again = evaluate_model(predictor, demo / "world/test/instances.json", demo / "world/test/images", batch_size=4)
    student = report["models"]["student"]
    assert again.ap["AP"] == pytest.approx(student["AP"], abs=1e-9)
    # Base and tail AP are the means of the per-kind APs pycocotools gives.
    from pipeline.world import BASE_KINDS, TAIL_KINDS

    assert student["AP_base"] == pytest.approx(again.group_ap(BASE_KINDS)) and student["AP_tail"] == pytest.approx(again.group_ap(TAIL_KINDS))
    per_kind = [v for v in again.category_ap.values() if v >= 0]
    assert again.ap["AP"] == pytest.approx(sum(per_kind) / len(per_kind), abs=1e-9)
    models = report["models"]
    assert report["gaps"]["student_minus_teacher"] == pytest.approx(round(100 * (models["student"]["AP"] - models["teacher"]["AP"]), 2))
    assert report["gaps"]["student_minus_control"] == pytest.approx(round(100 * (models["student"]["AP"] - models["control"]["AP"]), 2))
    # The control got the student's augmentation and steps, and no pseudo source.
    student_config = json.loads((demo / "student/train_config.json").read_text())
    control_config = json.loads((demo / "control/train_config.json").read_text())
    assert {s["kind"] for s in control_config["data"]["sources"]} == {"coco", "grounding"}
    same = ("steps", "model.init", "seed", "data.augment.crop_probability", "data.augment.cutout_probability",
            "data.augment.scale_jitter", "data.augment.min_sizes", "optimizer.lr")
    assert all(setting(student_config, k) == setting(control_config, k) for k in same)
    # Pseudo-label quality per preset, against the web split's hidden gold.
    web_gold = load_gold(demo / "world/web/web_gold.json")
    for name, entry in report["pseudo_labels"].items():
        quality = score_boxes(web_gold, pseudo_predictions(web_gold, [str(demo / "filtered" / name / "pseudo")]), class_agnostic=True)
        assert entry["precision50"] == round(quality.precision50, 4) and entry["recall50"] == round(quality.recall50, 4)
        assert 0 <= entry["images"] <= len(web_gold.getImgIds())
        curve = report["pseudo_label_curves"][name]
        assert [p["boxes"] for p in curve] == sorted((p["boxes"] for p in curve), reverse=True)  # higher threshold, fewer boxes
    assert report["throughput"]["pseudo_label_images_per_s"] > 0 and report["throughput"]["parse_captions_per_s"] > 0


def test_report_html_and_gallery(demo):
    page = (demo / "report.html").read_text()
    report = json.loads((demo / "report.json").read_text())
    assert f"{report['gaps']['student_minus_control']:+.1f} AP" in page and f"{report['gaps']['student_minus_teacher']:+.1f} AP" in page
    assert page.count("data:image/png;base64,") == 2  # the AP bar chart and the precision-recall plot
    assert all(name in page for name in ("teacher", "student", "control", "glip", "grit", "owlst"))
    assert (demo / "gallery" / "index.html").exists()
    assert len(list((demo / "gallery").glob("*.png"))) == min(8, report["pseudo_labels"]["glip"]["images"])
    # The student trained on gold + pseudo when the preset kept any, on gold alone (and says so) otherwise.
    assert report["student_pseudo_images"] == report["pseudo_labels"]["glip"]["images"]
    sources = json.loads((demo / "student/train_config.json").read_text())["data"]["sources"]
    assert any(source["kind"] == "pseudo" for source in sources) == (report["student_pseudo_images"] > 0)
    assert ("kept no pseudo-label" in page) == (report["student_pseudo_images"] == 0)
