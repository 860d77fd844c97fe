"""GLIPPredictor end to end against the official reference run (image -> detections)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from bench.reference_weights import fill_reference_weights, load_reference
from model.config import get_config
from model.network.glip import GLIP
from model.inference.predict import GLIPPredictor

CAPTION = "person. bicycle. car."
SPANS = [(0, 6), (8, 15), (17, 20)]


@pytest.fixture(scope="module")
def reference_tc(reference_dir):
    npz, _ = load_reference(reference_dir, "t_c")
    model = GLIP(get_config("glip-t")).eval()
    fill_reference_weights(model)
    image = Image.fromarray(np.ascontiguousarray(npz["image_bgr_uint8"][:, :, ::-1]))  # RGB
    return npz, model, image


def _as_set(boxes, scores, labels):
    return sorted(
        (int(l), round(float(s), 4), *[round(float(v), 2) for v in b])
        for b, s, l in zip(boxes, scores, labels)
    )


def _assert_same_detections(det, npz, *, atol_box=1e-2, atol_score=1e-4):
    ref_boxes = torch.from_numpy(npz["final_boxes"]).float()
    ref_scores = torch.from_numpy(npz["final_scores"]).float()
    ref_labels = torch.from_numpy(npz["final_labels"]).long()
    assert len(det) == len(ref_scores)
    # Match each reference detection to one of ours with the same label, box and score.
    used = torch.zeros(len(det), dtype=torch.bool)
    ours_labels = det.phrase_ids + 1  # official labels are entity index + 1
    for box, score, label in zip(ref_boxes, ref_scores, ref_labels):
        close = (
            (ours_labels == label)
            & ((det.boxes - box).abs().max(dim=1).values <= atol_box)
            & ((det.scores - score).abs() <= atol_score)
            & ~used
        )
        assert close.any(), f"reference detection {label.item()} {box.tolist()} {score.item():.4f} not found"
        used[torch.nonzero(close)[0, 0]] = True


@pytest.mark.slow
def test_predictor_reproduces_official_detections(reference_tc):
    npz, model, image = reference_tc
    # The reference fed the 480x640 image without the Resize step: min_size=0 does the same.
    predictor = GLIPPredictor(model, min_size=0, max_size=0, pad_to_max=True)
    det = predictor.predict([image], [CAPTION], [SPANS])[0]
    _assert_same_detections(det, npz)


@pytest.mark.slow
def test_dynamic_text_padding_and_batching_agree(reference_tc):
    """Fast path: prompts padded to the longest in the batch, two images in one batch."""
    npz, model, image = reference_tc
    predictor = GLIPPredictor(model, min_size=0, max_size=0, pad_to_max=False)
    small = image.resize((320, 240))
    det, det_small = predictor.predict([image, small], [CAPTION, "a person on a bicycle"], [SPANS, [(2, 8), (14, 21)]])
    _assert_same_detections(det, npz, atol_box=0.05, atol_score=1e-3)
    assert len(det_small) > 0
    assert float(det_small.boxes[:, 2].max()) <= 320 and float(det_small.boxes[:, 3].max()) <= 240
