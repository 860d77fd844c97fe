"""DyHead with plain 3x3 convs (`HeadConfig.deformable=False`, the `tiny-cpu` variant).

A modulated deformable conv with zero offsets and masks of 1 is a plain conv, so the plain
model must reproduce the deformable one when the deformable model's offset convs are set that
way and both share every other weight; and a checkpoint of the plain model round-trips.
"""

from __future__ import annotations

import torch

from model.weights.checkpoint import load_glip, save_glip
from model.config import get_config
from model.network.glip import GLIP


def _inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, 128, 160, generator=generator)
    input_ids = torch.tensor([[101, 2307, 1012, 3340, 1012, 102], [101, 4418, 1012, 102, 0, 0]])
    attention_mask = (input_ids != 0).long()
    return images, input_ids, attention_mask


def test_plain_dyhead_equals_deformable_with_zero_offsets_and_unit_masks():
    torch.manual_seed(0)
    deformable = GLIP(get_config("tiny")).eval()
    plain = GLIP(get_config("tiny-cpu")).eval()
    state = deformable.state_dict()
    offset_keys = sorted(k for k in state if ".offset." in k)
    assert offset_keys and all("dyhead_tower" in k for k in offset_keys)
    assert set(plain.state_dict()) == set(state) - set(offset_keys)
    plain.load_state_dict({k: v for k, v in state.items() if k not in offset_keys})
    with torch.no_grad():
        for key in offset_keys:
            parameter = dict(deformable.named_parameters())[key]
            parameter.zero_()
            if key.endswith("bias"):
                parameter[18:] = 40.0  # sigmoid(40) == 1.0 in float32: masks of exactly 1
        expected = deformable(*_inputs())
        actual = plain(*_inputs())
    for name in ("box_regression", "centerness", "dot_product_logits"):
        for level, (a, b) in enumerate(zip(getattr(actual, name), getattr(expected, name))):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"{name} level {level}")


def test_plain_dyhead_checkpoint_round_trips(tmp_path):
    torch.manual_seed(1)
    model = GLIP(get_config("tiny-cpu")).eval()
    path = tmp_path / "plain.pth"
    save_glip(model, path)
    loaded, _ = load_glip(path)
    assert loaded.config.head.deformable is False
    with torch.no_grad():
        a, b = model(*_inputs(1)), loaded(*_inputs(1))
    torch.testing.assert_close(a.dot_product_logits[0], b.dot_product_logits[0], rtol=0, atol=0)
