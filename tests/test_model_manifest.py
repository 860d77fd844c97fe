"""Our GLIP modules have exactly the official state-dict layout (keys, shapes, param/buffer)."""

from __future__ import annotations

import json

import pytest
import torch

from model.config import get_config
from model.network.glip import GLIP


@pytest.mark.parametrize(
    ("variant", "manifest"),
    [("glip-t-a", "t_a"), ("glip-t", "t_b"), ("glip-t", "t_c"), ("glip-l", "l")],
)
def test_state_dict_equals_official_manifest(reference_dir, variant, manifest):
    official = json.loads((reference_dir / f"manifest_glip_{manifest}.json").read_text())
    with torch.device("meta"):  # GLIP-L's 430M parameters cost nothing on the meta device
        model = GLIP(get_config(variant))
    ours = model.state_dict()
    expected = official["keys"]
    assert sorted(set(expected) - set(ours)) == []  # missing
    assert sorted(set(ours) - set(expected)) == []  # unexpected
    for key, entry in expected.items():
        assert list(ours[key].shape) == entry["shape"], key
    parameters = {name for name, _ in model.named_parameters()}
    for key, entry in expected.items():
        assert (key in parameters) == (entry["kind"] == "param"), key
    assert sum(p.numel() for p in model.parameters()) == official["num_params"]


def test_tiny_config_builds_small_and_gives_the_official_output_shapes():
    """The tiny variant: 28.7M parameters (the MiniLM-shaped 384-wide BERT, a small Swin, a
    64-channel head), and a forward with the shapes of `GLIPOutputs`' contract."""
    model = GLIP(get_config("tiny")).eval()
    assert sum(p.numel() for p in model.parameters()) == 28_745_087
    input_ids = torch.randint(1000, 2000, (2, 7))
    with torch.no_grad():
        out = model(torch.zeros(2, 3, 128, 160), input_ids, torch.ones_like(input_ids))
    levels = [(16, 20), (8, 10), (4, 5), (2, 3), (1, 2)]  # P3..P7 of 128x160: strides 8..128, ceil
    assert [tuple(t.shape) for t in out.features] == [(2, 64, h, w) for h, w in levels]
    assert [tuple(t.shape) for t in out.box_regression] == [(2, 4, h, w) for h, w in levels]
    assert [tuple(t.shape) for t in out.centerness] == [(2, 1, h, w) for h, w in levels]
    assert [tuple(t.shape) for t in out.dot_product_logits] == [(2, h * w, 7) for h, w in levels]
    assert [tuple(t.shape) for t in out.anchors] == [(h * w, 4) for h, w in levels]
    assert tuple(out.lang["hidden"].shape) == (2, 7, 384)  # all-MiniLM-L6-v2 width
