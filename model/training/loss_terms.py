"""The terms `loss.GLIPLoss` is built from: ATSS assignment, token focal loss, GIoU, centerness.

Each reproduces its part of the official `modeling/rpn/loss.py` (the rules are spelled out in
the `model.training.loss` docstring); batching, the positive count averaged over workers and the
self-training weights belong to `GLIPLoss`.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from model.network.box_coder import BoxCoder

# The official code marks "not assigned" with -INF in its IoU table.
_INF = 1e8


def legacy_box_iou(boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
    """IoU [N, M] of xyxy boxes with "+1" widths and heights (maskrcnn_benchmark `boxlist_iou`)."""
    area_a = (boxes_a[:, 2] - boxes_a[:, 0] + 1) * (boxes_a[:, 3] - boxes_a[:, 1] + 1)  # [N]
    area_b = (boxes_b[:, 2] - boxes_b[:, 0] + 1) * (boxes_b[:, 3] - boxes_b[:, 1] + 1)  # [M]
    top_left = torch.maximum(boxes_a[:, None, :2], boxes_b[None, :, :2])  # [N, M, 2]
    bottom_right = torch.minimum(boxes_a[:, None, 2:], boxes_b[None, :, 2:])  # [N, M, 2]
    size = (bottom_right - top_left + 1).clamp(min=0)
    inter = size[..., 0] * size[..., 1]  # [N, M]
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def atss_assign(anchors_per_level: Sequence[Tensor], gt_boxes: Tensor, *, topk: int = 9) -> Tensor:
    """Index of the GT each anchor is assigned to, -1 for negatives.

    anchors_per_level: per level [A_l, 4] xyxy anchors (padded-input pixels), in the order the
    head's outputs are flattened (P3..P7, row-major). gt_boxes: [G, 4] xyxy in the same frame.
    Returns [sum A_l] int64.
    """
    anchors = torch.cat(list(anchors_per_level), dim=0).float()  # [A, 4]
    num_anchors = anchors.shape[0]
    num_gt = gt_boxes.shape[0]
    assigned = torch.full((num_anchors,), -1, dtype=torch.int64, device=anchors.device)
    if num_gt == 0:
        return assigned
    gt_boxes = gt_boxes.float().to(anchors.device)
    ious = legacy_box_iou(anchors, gt_boxes)  # [A, G]

    gt_centres = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2.0  # [G, 2]
    anchor_centres = (anchors[:, :2] + anchors[:, 2:]) / 2.0  # [A, 2]
    distances = (anchor_centres[:, None, :] - gt_centres[None, :, :]).pow(2).sum(-1).sqrt()  # [A, G]

    candidates = []
    start = 0
    for level_anchors in anchors_per_level:
        end = start + level_anchors.shape[0]
        k = min(topk, end - start)
        _, nearest = distances[start:end].topk(k, dim=0, largest=False)  # [k, G]
        candidates.append(nearest + start)
        start = end
    candidate_idxs = torch.cat(candidates, dim=0)  # [K, G]

    gt_index = torch.arange(num_gt, device=anchors.device)
    candidate_ious = ious[candidate_idxs, gt_index[None, :]]  # [K, G]
    threshold = candidate_ious.mean(0) + candidate_ious.std(0)  # [G], unbiased std as official
    is_pos = candidate_ious >= threshold[None, :]

    # The anchor centre must lie inside the GT (strictly, by more than 0.01 px).
    centre_x = anchor_centres[candidate_idxs, 0]  # [K, G]
    centre_y = anchor_centres[candidate_idxs, 1]
    inside = torch.stack(
        (
            centre_x - gt_boxes[None, :, 0],
            centre_y - gt_boxes[None, :, 1],
            gt_boxes[None, :, 2] - centre_x,
            gt_boxes[None, :, 3] - centre_y,
        ),
        dim=0,
    ).amin(dim=0) > 0.01
    is_pos = is_pos & inside

    # An anchor that is a positive candidate of several GTs keeps the highest IoU (first on ties).
    claimed = torch.full_like(ious, -_INF)  # [A, G]
    pos_anchor = candidate_idxs[is_pos]
    pos_gt = gt_index[None, :].expand_as(candidate_idxs)[is_pos]
    claimed[pos_anchor, pos_gt] = ious[pos_anchor, pos_gt]
    best_iou, best_gt = claimed.max(dim=1)  # [A]
    return torch.where(best_iou > -_INF, best_gt, assigned)


def centerness_targets(gt_boxes: Tensor, anchors: Tensor) -> Tensor:
    """FCOS centerness [P] of each anchor centre w.r.t. its GT box: both [P, 4] xyxy."""
    centre_x = (anchors[:, 2] + anchors[:, 0]) / 2
    centre_y = (anchors[:, 3] + anchors[:, 1]) / 2
    left = centre_x - gt_boxes[:, 0]
    top = centre_y - gt_boxes[:, 1]
    right = gt_boxes[:, 2] - centre_x
    bottom = gt_boxes[:, 3] - centre_y
    horizontal = torch.minimum(left, right) / torch.maximum(left, right)
    vertical = torch.minimum(top, bottom) / torch.maximum(top, bottom)
    return torch.sqrt(horizontal * vertical)


def token_sigmoid_focal_loss(
    logits: Tensor,
    targets: Tensor,
    text_mask: Tensor | None = None,
    *,
    alpha: float = 0.25,
    gamma: float = 2.0,
    anchor_weights: Tensor | None = None,
) -> Tensor:
    """Summed binary focal loss over (anchor, token) pairs of non-padded tokens.

    logits, targets: [B, A, L] (targets 0/1); text_mask: [B, L] (nonzero = real token) or None;
    anchor_weights: [B, A] multiplier of each anchor's terms, or None (all 1).
    Official `token_sigmoid_binary_focal_loss` followed by `.sum()`.
    """
    if logits.shape != targets.shape:
        raise ValueError(f"token focal loss: logits {tuple(logits.shape)} vs targets {tuple(targets.shape)}")
    targets = targets.to(logits.dtype)
    weights = None if anchor_weights is None else anchor_weights.to(logits.dtype)[:, :, None].expand_as(logits)
    if text_mask is not None:
        keep = (text_mask > 0)[:, None, :].expand_as(logits)  # [B, A, L]
        logits = logits[keep]
        targets = targets[keep]
        weights = None if weights is None else weights[keep]
    prob = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    if weights is not None:
        loss = loss * weights
    return loss.sum()


def giou_loss(
    pred_deltas: Tensor,
    target_deltas: Tensor,
    anchors: Tensor,
    *,
    box_coder: BoxCoder,
    weight: Tensor | None = None,
) -> Tensor:
    """Summed (optionally weighted) 1 - GIoU of the boxes the deltas decode to.

    pred_deltas, target_deltas, anchors: [P, 4]; weight: [P] or None. As the official
    `GIoULoss`: predicted x2/y2 are raised to at least x1/y1, areas have no "+1", 1e-7 guards
    the union and the enclosing area, and an all-zero weight falls back to the unweighted sum.
    """
    pred = box_coder.decode(pred_deltas, anchors)
    gt = box_coder.decode(target_deltas, anchors)
    px1, py1 = pred[:, 0], pred[:, 1]
    px2 = torch.maximum(px1, pred[:, 2])
    py2 = torch.maximum(py1, pred[:, 3])
    pred_area = (px2 - px1) * (py2 - py1)
    gx1, gy1, gx2, gy2 = gt.unbind(dim=1)
    gt_area = (gx2 - gx1) * (gy2 - gy1)

    ix1, iy1 = torch.maximum(px1, gx1), torch.maximum(py1, gy1)
    ix2, iy2 = torch.minimum(px2, gx2), torch.minimum(py2, gy2)
    overlaps = (ix2 > ix1) & (iy2 > iy1)
    inter = torch.where(overlaps, (ix2 - ix1) * (iy2 - iy1), torch.zeros_like(ix1))

    enclosing = (torch.maximum(px2, gx2) - torch.minimum(px1, gx1)) * (
        torch.maximum(py2, gy2) - torch.minimum(py1, gy1)
    ) + 1e-7
    union = pred_area + gt_area - inter + 1e-7
    giou = inter / union - (enclosing - union) / enclosing
    losses = 1 - giou
    if weight is not None and float(weight.sum()) > 0:
        return (losses * weight).sum()
    return losses.sum()
