"""The ImageNet MobileNetV2 body (`tiny-mnv2`): strict loading of torchvision's file from the
registry package, the BGR input convention, and checkpoints that round-trip."""

from __future__ import annotations

import pytest
import torch
from torchvision.models import mobilenet_v2

from model.weights.checkpoint import load_glip, save_glip
from model.config import get_config
from model.network.glip import GLIP
from model.network.mobilenet import MobileNetV2Body, find_imagenet_weights, load_imagenet_weights
from model.inputs.preprocess import PIXEL_MEAN, PIXEL_STD


def test_imagenet_weights_load_strictly_and_see_rgb_input():
    body = MobileNetV2Body()
    path = load_imagenet_weights(body)
    assert path == find_imagenet_weights()
    reference = mobilenet_v2(weights=None).eval()
    reference.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    # GLIP's input: BGR x255 normalised with ImageNet's mean/std in BGR order.
    rgb = torch.rand(1, 3, 96, 128)
    bgr = (rgb.flip(1) * 255 - torch.tensor(PIXEL_MEAN)[:, None, None]) / torch.tensor(PIXEL_STD)[:, None, None]
    torchvision_input = (rgb - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    c3, c4, c5 = body.eval()(bgr)
    assert [tuple(c.shape[1:]) for c in (c3, c4, c5)] == [(32, 12, 16), (96, 6, 8), (320, 3, 4)]
    with torch.no_grad():
        expected = reference.features[:18](torchvision_input)
    assert torch.allclose(c5, expected, atol=1e-4)


def test_a_wrong_weights_file_is_refused(tmp_path):
    fake = tmp_path / "mobilenet_v2-b0353104.pth"
    torch.save({"features.0.0.weight": torch.zeros(1)}, fake)
    with pytest.raises(ValueError, match="is not torchvision's MobileNetV2 ImageNet file"):
        load_imagenet_weights(MobileNetV2Body(), fake)


@pytest.mark.parametrize("variant", ["tiny-mnv2", "tiny-mnv2-a"])
def test_tiny_mnv2_checkpoint_round_trips(tmp_path, variant):
    """Both MobileNetV2 variants save and load back to the same tensors and configuration; the
    demo's `tiny-mnv2-a` has GLIP-T(A)'s head (no fusion layers)."""
    model = GLIP(get_config(variant))
    load_imagenet_weights(model.backbone.body)
    save_glip(model, tmp_path / "m.pth", provenance={"test": True})
    loaded, info = load_glip(tmp_path / "m.pth")
    assert info.variant == variant and loaded.config.backbone == "mobilenet_v2"
    state, again = model.state_dict(), loaded.state_dict()
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)
    has_fusion = any(".b_attn." in key for key in state)
    assert has_fusion == (variant == "tiny-mnv2") and loaded.config.head.early_fuse == has_fusion
