"""Our GLIP modules have exactly the official state-dict layout (keys, shapes, param/buffer)."""

from __future__ import annotations

import json

import pytest
import torch

from model.config import get_config
from model.glip import GLIP


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


def test_tiny_config_builds_and_is_small():
    model = GLIP(get_config("tiny"))
    assert sum(p.numel() for p in model.parameters()) < 40e6
    assert model.config.language.hidden_size == 384  # all-MiniLM-L6-v2 shape
