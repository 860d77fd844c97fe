"""FPN on Swin stages 3-5 with P6/P7 from P5 (SPEC 1.2; `modeling/backbone/fpn.py`).

Naming follows the official module: `fpn_inner2` consumes stage 3 (stride 8), so
`fpn_inner{2,3,4}` / `fpn_layer{2,3,4}` make P3, P4, P5. Stage 2 (stride 4) is not used.
In training the official FPN applies DropBlock to each merged map of the top-down path (lateral
+ upsampled coarser map) right before its output conv, i.e. before P4's and P3's, never
before P5's (no merge there) nor P6/P7; the unmasked merged map feeds the next finer level.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DropBlock(nn.Module):
    """DropBlock (Ghiasi et al., 2018) with the semantics of the official `DropBlock2D`
    (`maskrcnn_benchmark/layers/dropblock.py`); identity in eval mode or with `prob` 0.

    One spatial mask per image, shared by every channel. Block centres are drawn at every
    position with probability prob / size^2 (no correction for the map size, borders
    included, so blocks at the edge are clipped), each drops the size x size square around it,
    and the kept activations are scaled by (mask elements / kept elements) over the whole batch.
    torchvision's `DropBlock2d` differs in all three (a mask per channel, centres only where a
    whole block fits with a size-corrected rate), which changes how much is dropped: not used.
    """

    def __init__(self, *, prob: float, size: int) -> None:
        super().__init__()
        if not 0.0 <= prob < 1.0 or size < 1:
            raise ValueError(f"DropBlock needs 0 <= prob < 1 and size >= 1, got prob {prob}, size {size}")
        self.prob = prob
        self.size = size

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, C, H, W] -> same shape."""
        if not self.training or self.prob == 0.0:
            return x
        gamma = self.prob / self.size**2
        centres = (torch.rand((x.shape[0], 1, *x.shape[2:]), device=x.device) < gamma).float()  # [B, 1, H, W]
        dropped = F.max_pool2d(centres, kernel_size=self.size, stride=1, padding=self.size // 2)
        if self.size % 2 == 0:  # an even window overhangs by one on the far side
            dropped = dropped[..., :-1, :-1]
        keep = 1.0 - dropped
        # The official scale divides by the kept count with no guard (NaN when all is dropped).
        scale = keep.numel() / keep.sum().clamp(min=1.0)
        return x * (keep * scale).to(x.dtype)


def _kaiming_conv(in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    # conv_with_kaiming_uniform(use_gn=False, use_relu=False): kaiming_uniform a=1, zero bias.
    conv = nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2)
    nn.init.kaiming_uniform_(conv.weight, a=1)
    nn.init.zeros_(conv.bias)
    return conv


class LastLevelP6P7(nn.Module):
    """P6 = conv3x3 s2 (P5); P7 = conv3x3 s2 (ReLU(P6)) (in == out channels, so from P5)."""

    def __init__(self, *, channels: int) -> None:
        super().__init__()
        self.p6 = nn.Conv2d(channels, channels, 3, 2, 1)
        self.p7 = nn.Conv2d(channels, channels, 3, 2, 1)
        for conv in (self.p6, self.p7):
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)

    def forward(self, p5: Tensor) -> list[Tensor]:
        p6 = self.p6(p5)
        return [p6, self.p7(F.relu(p6))]


class FPN(nn.Module):
    """forward([C2, C3, C4, C5]) -> [P3, P4, P5, P6, P7], each [B, channels, H_l, W_l]."""

    def __init__(
        self, *, in_channels: Sequence[int], channels: int = 256, drop_block_prob: float = 0.0, drop_block_size: int = 3
    ) -> None:
        super().__init__()
        # in_channels = (C3, C4, C5) channel counts; official index 2..4.
        self.level_names = []
        for index, width in enumerate(in_channels, start=2):
            self.add_module(f"fpn_inner{index}", _kaiming_conv(width, channels, 1))
            self.add_module(f"fpn_layer{index}", _kaiming_conv(channels, channels, 3))
            self.level_names.append(index)
        self.top_blocks = LastLevelP6P7(channels=channels)
        self.drop_block = DropBlock(prob=drop_block_prob, size=drop_block_size)

    def forward(self, stages: Sequence[Tensor]) -> list[Tensor]:
        features = stages[-len(self.level_names) :]  # drop stage 2
        last = self.level_names[-1]
        inner = getattr(self, f"fpn_inner{last}")(features[-1])
        results = [getattr(self, f"fpn_layer{last}")(inner)]
        for index, feature in zip(reversed(self.level_names[:-1]), reversed(features[:-1])):
            lateral = getattr(self, f"fpn_inner{index}")(feature)
            # Nearest upsampling to the lateral's exact size (odd sizes stay aligned).
            inner = lateral + F.interpolate(inner, size=lateral.shape[-2:], mode="nearest")
            results.insert(0, getattr(self, f"fpn_layer{index}")(self.drop_block(inner)))
        return results + self.top_blocks(results[-1])
