"""`pipeline demo --size small --rounds 2`, killed in round 2 and resumed: the whole loop runs,
resumes where it stopped, and its report holds real, consistent figures (recomputed here from
the run's own files with pycocotools)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.train.config import setting


ROUND_2_STUDENT = "round 2: train student"


def _killed_mid_round_2(folder) -> None:
    """`pipeline demo --size small --rounds 2` in its own process group, SIGKILLed a few seconds
    into round 2's student training (the demo's Ray dies with it)."""
    log_path = folder / "killed.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "demo", "--size", "small", "--rounds", "2", "--out", "run", "--seed", "0"],
            cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])},
        )
        try:
            deadline = time.monotonic() + 1200
            while ROUND_2_STUDENT not in log_path.read_text():
                assert process.poll() is None, f"the demo ended before round 2's student: {log_path.read_text()[-3000:]}"
                assert time.monotonic() < deadline
                time.sleep(0.5)
            time.sleep(5)
        finally:
            os.killpg(process.pid, signal.SIGKILL)  # the group this test started, and only it
            process.wait()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A two-round demo killed in round 2, then resumed (`--resume`) to the end."""
    folder = tmp_path_factory.mktemp("demo")
    out = folder / "run"
    _killed_mid_round_2(folder)
    assert not (out / "report.json").exists()
    state = json.loads((out / "demo_state.json").read_text())
    assert "round 2: pseudo-label" in state["stages"] and not any(s.startswith(ROUND_2_STUDENT) for s in state["stages"])
    round_1_student = (out / "student" / "student.pth").stat().st_mtime_ns
    cwd = os.getcwd()
    os.chdir(folder)  # a relative --out, as the README's command gives (Ray workers run elsewhere)
    try:
        result = CliRunner().invoke(app, ["demo", "--size", "small", "--out", "run", "--seed", "0", "--rounds", "2", "--resume"])
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    (folder / "resumed.log").write_text(result.output)
    assert "teacher AP" in result.output and "student AP" in result.output and "demo: round 2:" in result.output
    # The demo's last line gives both gaps.
    [last] = [line for line in result.output.splitlines() if line.startswith("demo: student - control")]
    assert "student - teacher" in last
    assert (out / "student" / "student.pth").stat().st_mtime_ns == round_1_student  # round 1 was not trained again
    return out


# Ray's own lines: its loggers' format, the C++ core worker's, and forwarded worker output.
RAY_LINE = re.compile(r"\t(DEBUG|INFO|WARNING) \S+:\d+ -- |\] \w+\.cc:\d+: |\((TrainController|RayTrainWorker|raylet|MapWorker|PlacementGroupCleaner)[ )]")


def test_the_terminal_shows_our_lines_and_ray_s_go_to_the_log_file(demo):
    # The killed run's terminal (a process of its own: stdout and stderr, round 1 and the
    # start of round 2), and the resumed run's (in this process).
    killed = (demo.parent / "killed.log").read_text().splitlines()
    resumed = (demo.parent / "resumed.log").read_text().splitlines()
    log = (demo / "demo.log").read_text()
    assert killed[0].startswith(f"demo: Ray's own log lines go to {demo.resolve() / 'demo.log'}")
    assert [line for line in killed + resumed if RAY_LINE.search(line)] == []
    assert "Starting execution of Dataset" in log and "core_worker.cc" in log  # Ray's Python and native lines
    assert "Started training worker group" in log  # the Train controller's, appended when the resumed run's Ray stopped
    stages = [line for line in killed if line.startswith("demo [")]
    assert [line.split("]")[0] for line in stages] == [f"demo [{k}/17" for k in range(1, len(stages) + 1)] and len(stages) >= 12
    # Every training's progress lines, each once: the teacher's, round 1's student's and control's.
    training = [line for line in killed + resumed if line.startswith("train-student: step")]
    assert len(training) == len(set(training))
    assert sum(line.startswith("train-student: step 4/4 ") for line in killed) >= 3
    assert all(" samples/s ETA " in line for line in training)
    assert sum(line.startswith("train-student: step 4/4 ") for line in resumed) >= 1  # round 2's control (and student)


def test_resumed_rounds_skip_finished_stages_and_chain_teachers(demo):
    report = json.loads((demo / "report.json").read_text())
    finished = json.loads((demo / "demo_state.json").read_text())["stages"]
    # Everything before round 2's student was skipped on resume; the rest ran then.
    assert "round 2: pseudo-label" in report["resumed_stages"] and "train teacher on gold" in report["resumed_stages"]
    assert not any(name.startswith(ROUND_2_STUDENT) for name in report["resumed_stages"])
    assert set(report["resumed_stages"]) < set(finished) == set(report["stage_seconds"]) - {"report"}
    first, second = report["rounds"]
    assert (first["round"], first["folder"], second["round"], second["folder"]) == (1, ".", 2, "round_2")
    # Round 2's teacher is round 1's student: its checkpoint, its test AP, its pseudo-labels.
    assert second["teacher_checkpoint"] == report["training"]["student"]["checkpoint"]
    assert second["models"]["teacher"] == first["models"]["student"]
    import hashlib

    import pyarrow.parquet as pq

    for shard in sorted((demo / "round_2/pseudo_label/detections").glob("*.parquet")):
        teacher = json.loads(pq.read_schema(shard).metadata[b"teacher"])
        assert teacher["sha256"] == hashlib.sha256((demo / "student" / "student.pth").read_bytes()).hexdigest()
        assert pq.read_schema(shard).metadata[b"source_shard"].decode().startswith(str((demo / "web_clean").resolve()))
    student = json.loads((demo / "round_2/student/train_config.json").read_text())
    control = json.loads((demo / "round_2/control/train_config.json").read_text())
    assert Path(student["model"]["init"]).resolve() == Path(control["model"]["init"]).resolve() == (demo / "student" / "student.pth").resolve()
    assert {s["kind"] for s in control["data"]["sources"]} == {"coco", "grounding"}
    assert student["steps"] == control["steps"] and student["seed"] == control["seed"] == 2
    assert student["data"]["augment"] == control["data"]["augment"] and student["optimizer"] == control["optimizer"]
    pseudo = [s for s in student["data"]["sources"] if s["kind"] == "pseudo"]
    assert all(Path(p).resolve().is_relative_to((demo / "round_2/filtered").resolve()) for s in pseudo for p in s["paths"])
    for entry in report["rounds"]:
        assert set(entry["models"]) == {"teacher", "student", "control"}
        assert entry["student_minus_control"] == pytest.approx(
            round(100 * (entry["models"]["student"]["AP"] - entry["models"]["control"]["AP"]), 2))
    page = (demo / "report.html").read_text()
    assert "Rounds: each round" in page and (demo / "round_2/gallery/index.html").exists()


def test_decontamination_and_calibration_sections(demo):
    import pyarrow.parquet as pq

    from pipeline.io.shards import iter_webdataset_members

    report = json.loads((demo / "report.json").read_text())
    clean = report["decontamination"]
    copies = {c["key"]: c for c in json.loads((demo / "world/web/test_copies.json").read_text())["copies"]}
    removed = {m["web_key"] for m in pq.read_table(demo / "web_clean/matches.parquet").to_pylist()}
    kept = {key for shard in sorted((demo / "web_clean").glob("*.tar")) for key, _ in iter_webdataset_members(str(shard)) if key}
    assert clean["injected"] == len(copies) == 4 and clean["found"] == len(removed & set(copies)) - len(clean["removed_as_another_test_image"])
    assert clean["false_matches"] == len(removed - set(copies)) and clean["kept"] == len(kept) == clean["web_samples"] - len(removed)
    assert {m["key"] for m in clean["missed"]} == set(copies) & kept
    # Every later stage read the cleaned shards: no removed sample was parsed or pseudo-labelled.
    parsed = json.loads((demo / "phrases/_stats.json").read_text())
    assert parsed["samples"] == len(kept)
    assert json.loads((demo / "pseudo_label/_stats.json").read_text())["samples"] == len(kept)
    page = (demo / "report.html").read_text()
    assert f"found <b>{clean['found']}</b>" in page and f"<b>{clean['false_matches']}</b> other web images" in page
    # The small world's 4-step teacher gives too few boxes on 3 images: calibrate refuses in one
    # line, and the report says so beside the presets rated on the same held-out images.
    calibration = report["calibration"]
    sample = json.loads((demo / "calibration/sample.json").read_text())
    rest = json.loads((demo / "calibration/rest.json").read_text())
    web_gold = json.loads((demo / "world/web/web_gold.json").read_text())
    assert len(sample["images"]) == round(0.1 * len(web_gold["images"])) and len(sample["images"]) + len(rest["images"]) == len(web_gold["images"])
    assert {i["id"] for i in sample["images"]}.isdisjoint({i["id"] for i in rest["images"]})
    if "refused" in calibration:
        assert "too small" in calibration["refused"] or "no policy reaches" in calibration["refused"]
        assert "Calibration <b>refused</b>" in page
    else:
        assert calibration["inside_interval"] == (
            calibration["sample"]["precision_interval"][0] <= calibration["calibrated_on_rest"]["precision50"] <= calibration["sample"]["precision_interval"][1]
        )
    assert set(calibration["rest"]) == {"glip", "grit", "owlst"}
    assert all(r["gold_images"] == len(rest["images"]) for r in calibration["rest"].values())


def test_report_numbers_are_sane_and_reproducible(demo):
    from model.inference.predict import GLIPPredictor
    from pipeline.demo.arms import SCHEDULES
    from pipeline.evaluation.evaluate import evaluate_model, load_gold, pseudo_predictions, score_boxes

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
    from pipeline.demo.world import BASE_KINDS, TAIL_KINDS

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
    # Paired batches when the student has pseudo-labels (the small world's 4-step teacher keeps
    # none: then the student trains on gold alone, unpaired); never for the control. That the
    # paired gold part is the control's, sample for sample, is tests/test_train_data.py's.
    per_step = SCHEDULES["small"].recipe.pseudo_per_step if report["student_pseudo_images"] else 0
    assert setting(student_config, "data.pseudo_per_step") == per_step
    assert setting(control_config, "data.pseudo_per_step") == 0 and report["student_mix"]["pseudo_per_step"] == per_step
    # Pseudo-label quality per preset, against the web split's hidden gold.
    web_gold = load_gold(demo / "world/web/web_gold.json")
    for name, entry in report["pseudo_labels"].items():
        quality = score_boxes(web_gold, pseudo_predictions(web_gold, [str(demo / "filtered" / name / "pseudo")]), class_agnostic=True)
        assert entry["precision50"] == round(quality.precision50, 4) and entry["recall50"] == round(quality.recall50, 4)
        # a copy of a test image that decontaminate missed is pseudo-labelled too (it has no web gold)
        assert 0 <= entry["images"] <= len(web_gold.getImgIds()) + len(report["decontamination"]["missed"])
        curve = report["pseudo_label_curves"][name]
        assert [p["boxes"] for p in curve] == sorted((p["boxes"] for p in curve), reverse=True)  # higher threshold, fewer boxes
    assert report["throughput"]["pseudo_label_images_per_s"] > 0 and report["throughput"]["parse_captions_per_s"] > 0


def test_report_html_and_gallery(demo):
    page = (demo / "report.html").read_text()
    report = json.loads((demo / "report.json").read_text())
    assert f"{report['gaps']['student_minus_control']:+.1f} AP" in page and f"{report['gaps']['student_minus_teacher']:+.1f} AP" in page
    assert page.count("data:image/png;base64,") == 3  # the AP bar chart, the precision-recall plot, the arms' losses
    assert '<img alt="loss by arm" src="data:image/png;base64,' in page
    assert all(name in page for name in ("teacher", "student", "control", "glip", "grit", "owlst"))
    assert (demo / "gallery" / "index.html").exists()
    assert len(list((demo / "gallery").glob("*.png"))) == min(8, report["pseudo_labels"]["glip"]["images"])
    # The student trained on gold + pseudo when the preset kept any, on gold alone (and says so) otherwise.
    assert report["student_pseudo_images"] == report["pseudo_labels"]["glip"]["images"]
    sources = json.loads((demo / "student/train_config.json").read_text())["data"]["sources"]
    assert any(source["kind"] == "pseudo" for source in sources) == (report["student_pseudo_images"] > 0)
    assert ("kept no pseudo-label" in page) == (report["student_pseudo_images"] == 0)
    assert ("the same ones, plus 2 pseudo-labelled images" in page) == (report["student_pseudo_images"] > 0)


def test_resume_refuses_a_folder_without_a_demo_and_other_settings(tmp_path):
    from pipeline.demo.arms import SCHEDULES
    from pipeline.demo.run import _resume_settings
    from pipeline.demo.state import DemoState

    runner = CliRunner()
    result = runner.invoke(app, ["demo", "--size", "small", "--out", str(tmp_path / "none"), "--resume"])
    assert result.exit_code == 2 and "holds no demo run to resume" in result.stderr.strip().splitlines()[-1]
    out = tmp_path / "run"
    out.mkdir()
    DemoState(out, _resume_settings(size="small", seed=0, preset="glip", control=True, schedule=SCHEDULES["small"]), resume=False)
    result = runner.invoke(app, ["demo", "--size", "small", "--out", str(out), "--seed", "1", "--resume"])
    assert result.exit_code == 2
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "seed differ from the interrupted run's" in line and "demo_state.json" in line
    result = runner.invoke(app, ["demo", "--size", "small", "--out", str(tmp_path / "new"), "--rounds", "0"])
    assert result.exit_code == 2 and "--rounds" in result.stderr
    # bad student options are refused before any stage runs
    result = runner.invoke(app, ["demo", "--size", "small", "--out", str(tmp_path / "bad"), "--pseudo-prompt", "tags"])
    assert result.exit_code == 2 and "--pseudo-prompt 'tags'" in result.stderr and not (tmp_path / "bad").exists()
