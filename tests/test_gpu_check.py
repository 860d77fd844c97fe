"""`bench/gpu_check.sh --smoke`: the GPU check's every step, run on the CPU with the tiny variant."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from model.inference.predict import Detections

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.gpu_check import matched_fraction, phrase_spans  # noqa: E402


def test_smoke_mode_prints_every_row_of_the_table(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "RAY_AUTH_MODE": "disabled"}
    result = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--smoke", "--json", str(tmp_path / "rows.json")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    by_setting = {(row["check"], row["setting"]): row for row in rows}
    settings = [setting for check, setting in by_setting if check == "forward img/s"]
    assert settings == ["pad-256 b1 fp32 (official)", "dynamic b1 fp32", "dynamic b2 fp32", "dynamic b1 bf16", "dynamic b2 bf16"]
    assert by_setting[("forward img/s", "pad-256 b1 fp32 (official)")]["ratio"] == "1.00x"
    assert float(by_setting[("forward img/s", "dynamic b2 fp32")]["value"]) > 0
    # The CPU smoke compares the fp32 model with itself: every detection matches.
    assert by_setting[("parity matched", "cpu fp32 vs cpu fp32")]["value"].startswith("1.000 of ")
    bare = float(by_setting[("pseudo-label img/s", "bare predict loop b4 fp32")]["value"])
    stage = by_setting[("pseudo-label img/s", "stage, 1 actor (steady)")]
    assert bare > 0 and float(stage["value"]) > 0 and stage["ratio"].endswith("of bare")
    assert float(by_setting[("train-student samples/s", "1 step b2 grad-ckpt fp32 short 160")]["value"]) > 0
    table = result.stdout[result.stdout.index("gpu_check --smoke on CPU"):]
    assert len(table.strip().splitlines()) == 2 + 1 + len(rows)  # title, header, rule, one line per row


def test_matched_fraction_needs_phrase_box_and_score():
    boxes = torch.tensor([[0.0, 0.0, 100.0, 100.0], [50.0, 50.0, 150.0, 120.0]])
    reference = Detections(boxes, torch.tensor([0.9, 0.5]), torch.tensor([0, 1]))
    assert matched_fraction(reference, reference) == 1.0
    moved = Detections(boxes + torch.tensor([30.0, 0.0, 30.0, 0.0]), torch.tensor([0.9, 0.5]), torch.tensor([0, 1]))
    assert matched_fraction(reference, moved) == 0.0
    other_phrase = Detections(boxes, torch.tensor([0.9, 0.5]), torch.tensor([1, 0]))
    assert matched_fraction(reference, other_phrase) == 0.0
    lower_score = Detections(boxes, torch.tensor([0.9, 0.4]), torch.tensor([0, 1]))
    assert matched_fraction(reference, lower_score) == 0.5


def test_phrase_spans_index_the_prompt():
    caption = "person. a red umbrella. traffic light."
    assert [caption[a:b] for a, b in phrase_spans(caption)] == ["person", "a red umbrella", "traffic light"]
