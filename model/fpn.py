"""FPN on Swin stages 3-5 with P6/P7 from P5 (SPEC 1.2; `modeling/backbone/fpn.py`).

Naming follows the official module: `fpn_inner2` consumes stage 3 (stride 8), so
`fpn_inner{2,3,4}` / `fpn_layer{2,3,4}` make P3, P4, P5. Stage 2 (stride 4) is not used.
"""

from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


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

    def __init__(self, *, in_channels: Sequence[int], channels: int = 256) -> None:
        super().__init__()
        # in_channels = (C3, C4, C5) channel counts; official index 2..4.
        self.level_names = []
        for index, width in enumerate(in_channels, start=2):
            self.add_module(f"fpn_inner{index}", _kaiming_conv(width, channels, 1))
            self.add_module(f"fpn_layer{index}", _kaiming_conv(channels, channels, 3))
            self.level_names.append(index)
        self.top_blocks = LastLevelP6P7(channels=channels)

    def forward(self, stages: Sequence[Tensor]) -> list[Tensor]:
        features = stages[-len(self.level_names) :]  # drop stage 2
        last = self.level_names[-1]
        inner = getattr(self, f"fpn_inner{last}")(features[-1])
        results = [getattr(self, f"fpn_layer{last}")(inner)]
        for index, feature in zip(reversed(self.level_names[:-1]), reversed(features[:-1])):
            lateral = getattr(self, f"fpn_inner{index}")(feature)
            # Nearest upsampling to the lateral's exact size (odd sizes stay aligned).
            inner = lateral + F.interpolate(inner, size=lateral.shape[-2:], mode="nearest")
            results.insert(0, getattr(self, f"fpn_layer{index}")(inner))
        return results + self.top_blocks(results[-1])
