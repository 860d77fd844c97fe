"""ATSS anchors of GLIP's VLDyHead: one square anchor per feature-map location and level.

Matches the official `make_anchor_generator_complex` (maskrcnn_benchmark
`modeling/rpn/anchor_generator.py`) for GLIP's settings: sizes (64, 128, 256, 512, 1024) on
strides (8, 16, 32, 64, 128), aspect ratio 1, one scale per octave. The base ("cell") anchor of
a level is the legacy Detectron one, centred on pixel (s-1)/2 of the first stride cell with the
"+1" width convention, e.g. stride 8, size 64 -> [-28, -28, 35, 35]. The cell anchors are
persistent buffers, so they appear in the official checkpoints as
`rpn.anchor_generator.cell_anchors.{0..4}`; they are constants and always recomputed here.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn


def legacy_cell_anchor(stride: int, size: float) -> Tensor:
    """Detectron `generate_anchors` for aspect ratio 1 and a single scale.

    Returns [1, 4] float32 xyxy: a box of side `size` ("+1" convention: x2 - x1 = size - 1)
    centred on the centre (stride - 1) / 2 of the window (0, 0, stride - 1, stride - 1).
    """
    # The official code works in float64 numpy: ratio enumeration rounds sqrt(stride^2) back
    # to `stride`, then scaling by size / stride gives width `size`; all values are exact
    # multiples of 0.5, so float64 -> float32 loses nothing.
    centre = (stride - 1) / 2.0
    half = (size - 1) / 2.0
    return torch.tensor([[centre - half, centre - half, centre + half, centre + half]], dtype=torch.float32)


class _BufferList(nn.Module):
    """Holds tensors as persistent buffers named "0", "1", ... (state-dict keys `<name>.0`)."""

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        super().__init__()
        for index, tensor in enumerate(tensors):
            self.register_buffer(str(index), tensor)

    def __len__(self) -> int:
        return len(self._buffers)

    def __iter__(self):
        return iter(self._buffers.values())

    def __getitem__(self, index: int) -> Tensor:
        return self._buffers[str(index)]


class AnchorGenerator(nn.Module):
    """Per-level anchor grids in the padded-input pixel frame.

    `forward(feature_sizes)` takes one `(H, W)` per level (P3..P7) and returns per level a
    float32 [H*W, 4] tensor of xyxy anchors, row-major over the map (y outer, x inner), i.e.
    anchor `y * W + x` is the cell anchor shifted by `(x * stride, y * stride)`.
    """

    def __init__(
        self,
        *,
        sizes: Sequence[float] = (64, 128, 256, 512, 1024),
        strides: Sequence[int] = (8, 16, 32, 64, 128),
    ) -> None:
        super().__init__()
        if len(sizes) != len(strides):
            raise ValueError(f"AnchorGenerator: {len(sizes)} sizes for {len(strides)} strides")
        self.sizes = tuple(float(s) for s in sizes)
        self.strides = tuple(int(s) for s in strides)
        self.cell_anchors = _BufferList([legacy_cell_anchor(st, sz) for st, sz in zip(self.strides, self.sizes)])

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    def grid_anchors(self, feature_sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
        """Same as `forward`; named after the official method."""
        if len(feature_sizes) != self.num_levels:
            raise ValueError(
                f"AnchorGenerator: got {len(feature_sizes)} feature maps, expected {self.num_levels} (P3..P7)"
            )
        anchors = []
        for (height, width), stride, cell in zip(feature_sizes, self.strides, self.cell_anchors):
            device = cell.device
            # float32 arange of multiples of the stride, as the official shifts (exact integers).
            shift_x = torch.arange(0, int(width) * stride, step=stride, dtype=torch.float32, device=device)
            shift_y = torch.arange(0, int(height) * stride, step=stride, dtype=torch.float32, device=device)
            grid_y, grid_x = torch.meshgrid(shift_y, shift_x, indexing="ij")  # [H, W] each
            shifts = torch.stack((grid_x, grid_y, grid_x, grid_y), dim=-1).reshape(-1, 1, 4)  # [H*W, 1, 4]
            anchors.append((shifts + cell.to(torch.float32).reshape(1, -1, 4)).reshape(-1, 4))  # [H*W, 4]
        return anchors

    def forward(self, feature_sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
        return self.grid_anchors(feature_sizes)
