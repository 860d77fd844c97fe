"""`bench/naming_auc.py`: per-category AUC of a teacher's scores (does it tell its words apart?)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.naming_auc import box_scores, category_auc  # noqa: E402
from bench.sample_shards import tiny_teacher  # noqa: E402


def test_category_auc_hand_computed():
    # boxes: two of category 0, one of category 1; columns: score under category 0 and 1
    scores = np.array([[0.9, 0.2], [0.4, 0.4], [0.4, 0.1]])
    labels = np.array([0, 0, 1])
    auc0, auc1 = category_auc(scores, labels)
    # category 0: own 0.9 and 0.4 against other 0.4 -> (1 + 0.5) / 2
    assert auc0 == pytest.approx(0.75)
    # category 1: own 0.1 against others 0.2 and 0.4 -> 0
    assert auc1 == pytest.approx(0.0)
    # a category without boxes has no AUC
    assert category_auc(scores[:, :1], np.array([1, 1, 1])) == [None]


def test_box_scores_real_teacher_on_world_split(tmp_path):
    from model.inference.predict import GLIPPredictor
    from pipeline.demo.world import KINDS, write_world

    paths = write_world(tmp_path / "world", size="small", seed=0)
    teacher = GLIPPredictor.from_checkpoint(str(tiny_teacher(tmp_path / "t.pth")), min_size=128, max_size=192)
    teacher.postprocessor.detections_per_img = 1000
    scores, labels, names = box_scores(teacher, paths.test_coco, paths.test_images, max_images=4)
    import json

    gold = json.loads(paths.test_coco.read_text())
    first = {i["id"] for i in sorted(gold["images"], key=lambda i: i["id"])[:4]}
    assert scores.shape == (sum(a["image_id"] in first for a in gold["annotations"]), len(KINDS))
    assert names == list(KINDS)
    assert ((scores >= 0) & (scores <= 1)).all() and scores.max() > 0  # the confident tiny teacher finds boxes
    assert all(a is None or 0.0 <= a <= 1.0 for a in category_auc(scores, labels))
