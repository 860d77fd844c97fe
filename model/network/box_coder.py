"""GLIP's ATSS box coder: anchor-relative deltas with the legacy "+1" pixel convention.

Matches `BoxCoder` of the official `modeling/rpn/vldyhead.py` (SPEC 1.6): widths are
`x2 - x1 + 1`, centres are `(x1 + x2) / 2`, deltas are scaled by weights (10, 10, 5, 5), and a
decoded box of width w' spans `[cx - (w' - 1) / 2, cx + (w' - 1) / 2]`. Log-size deltas are
clipped at log(1000 / 16) before `exp`, as in Detectron, so no box explodes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Legacy Detectron convention: a box [x1, x2] of integer pixel indices covers x2 - x1 + 1 pixels.
_TO_REMOVE = 1.0


class BoxCoder:
    """Encodes xyxy boxes as (dx, dy, dw, dh) against anchors and decodes them back.

    All boxes are [N, 4] xyxy absolute pixels; deltas are [N, 4] (dx, dy, dw, dh).
    """

    def __init__(
        self,
        *,
        weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
        bbox_xform_clip: float = math.log(1000.0 / 16),
    ) -> None:
        if len(weights) != 4:
            raise ValueError(f"BoxCoder: weights must have 4 entries, got {weights!r}")
        self.weights = tuple(float(w) for w in weights)
        self.bbox_xform_clip = float(bbox_xform_clip)

    def encode(self, gt_boxes: Tensor, anchors: Tensor) -> Tensor:
        """Regression targets [N, 4] that turn `anchors` [N, 4] into `gt_boxes` [N, 4]."""
        _check_boxes("gt_boxes", gt_boxes)
        _check_boxes("anchors", anchors)
        wx, wy, ww, wh = self.weights
        ex_widths = anchors[:, 2] - anchors[:, 0] + _TO_REMOVE
        ex_heights = anchors[:, 3] - anchors[:, 1] + _TO_REMOVE
        ex_ctr_x = (anchors[:, 2] + anchors[:, 0]) / 2
        ex_ctr_y = (anchors[:, 3] + anchors[:, 1]) / 2

        gt_widths = gt_boxes[:, 2] - gt_boxes[:, 0] + _TO_REMOVE
        gt_heights = gt_boxes[:, 3] - gt_boxes[:, 1] + _TO_REMOVE
        gt_ctr_x = (gt_boxes[:, 2] + gt_boxes[:, 0]) / 2
        gt_ctr_y = (gt_boxes[:, 3] + gt_boxes[:, 1]) / 2

        dx = wx * (gt_ctr_x - ex_ctr_x) / ex_widths
        dy = wy * (gt_ctr_y - ex_ctr_y) / ex_heights
        dw = ww * torch.log(gt_widths / ex_widths)
        dh = wh * torch.log(gt_heights / ex_heights)
        return torch.stack((dx, dy, dw, dh), dim=1)  # [N, 4]

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """Boxes [N, 4] xyxy from `deltas` [N, 4] applied to `anchors` [N, 4] (deltas' dtype)."""
        _check_boxes("deltas", deltas)
        _check_boxes("anchors", anchors)
        anchors = anchors.to(deltas.dtype)
        wx, wy, ww, wh = self.weights
        widths = anchors[:, 2] - anchors[:, 0] + _TO_REMOVE
        heights = anchors[:, 3] - anchors[:, 1] + _TO_REMOVE
        ctr_x = (anchors[:, 2] + anchors[:, 0]) / 2
        ctr_y = (anchors[:, 3] + anchors[:, 1]) / 2

        dx = deltas[:, 0] / wx
        dy = deltas[:, 1] / wy
        dw = torch.clamp(deltas[:, 2] / ww, max=self.bbox_xform_clip)
        dh = torch.clamp(deltas[:, 3] / wh, max=self.bbox_xform_clip)

        pred_ctr_x = dx * widths + ctr_x
        pred_ctr_y = dy * heights + ctr_y
        pred_w = torch.exp(dw) * widths
        pred_h = torch.exp(dh) * heights
        # Same operation order as the official decode, so results are bit-identical.
        return torch.stack(
            (
                pred_ctr_x - 0.5 * (pred_w - 1),
                pred_ctr_y - 0.5 * (pred_h - 1),
                pred_ctr_x + 0.5 * (pred_w - 1),
                pred_ctr_y + 0.5 * (pred_h - 1),
            ),
            dim=1,
        )  # [N, 4]


def _check_boxes(name: str, boxes: Tensor) -> None:
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"BoxCoder: {name} must be [N, 4], got {tuple(boxes.shape)}")
