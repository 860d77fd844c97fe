"""GLIP's training losses: ATSS assignment, token focal loss, GIoU, centerness (SPEC section 6).

Reproduces `ATSSLossComputation` of the official `modeling/rpn/loss.py` for the settings every
GLIP config uses (dot-product token loss on, one anchor per location, TOPK 9):

* ATSS assignment per image: the 9 anchors per level whose centres are nearest a GT's centre
  are candidates; the IoU threshold is mean + std (unbiased) of the candidates' IoUs ("+1"
  areas, `boxlist_iou`); positives are candidates at or above it whose centre lies inside the
  GT (min(l, t, r, b) > 0.01); an anchor claimed by several GTs takes the highest-IoU one.
* `loss_dot_product_token`: binary sigmoid focal loss (alpha 0.25, gamma 2) on the
  dot-product logits of every anchor and every non-padded token. A positive anchor's target
  row is the binarised positive-map row of its GT; a negative anchor's row is zero except the
  "no object" slot 255 (official quirk: it only matters when the prompt fills all 256
  tokens, otherwise the text mask removes it). Summed, divided by max(positives averaged
  over workers, 1).
* `loss_reg`: GIoU loss between the boxes decoded from the predicted and the target deltas
  (legacy "+1" decode), weighted by the centerness targets, divided by their sum averaged over
  workers, times REG_LOSS_WEIGHT 2.0.
* `loss_centerness`: BCE-with-logits (sum) against sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b)),
  divided by the same positive count.

Self-training extensions (off unless a target carries them; gold targets never do): a target
may give `weights` [G], one per box, and `background_weight`, a float. An anchor assigned to a
box of weight w contributes w times its token focal loss (Soft Teacher's score-weighted
classification: a pseudo box of score 0.3 counts 0.3 of a gold box); an anchor assigned to a box
of weight 0 is ignored, neither positive nor negative, in every loss (Unbiased Teacher's
"ignore" band for low-score teacher boxes); an unassigned anchor of that image contributes
`background_weight` times its negative focal loss. Positives are counted as before (a weighted
positive counts once, so weights scale its share, not the normaliser), ignored anchors not at all.

The 80-class `cls_logits` focal loss of the official code is multiplied by 0 there and is
left out here. Everything is computed in float32 (the official `custom_fwd(cast_inputs=
float32)`), so bf16 autocast outside does not change the loss arithmetic.

The terms themselves (assignment, focal loss, GIoU, centerness targets) are in `model.training.loss_terms`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from model.network.box_coder import BoxCoder
from model.training.loss_terms import atss_assign, centerness_targets, giou_loss, token_sigmoid_focal_loss


def _average_over_workers(value: float, device: torch.device) -> float:
    """Sum over the distributed workers divided by their count (official `reduce_sum` / world)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        total = torch.tensor([value], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(total)
        return float(total.item()) / torch.distributed.get_world_size()
    return float(value)


@dataclass(frozen=True)
class AssignedTargets:
    """ATSS targets of a batch, flattened image-major over all anchors (B * A rows).

    assigned: [B*A] int64 GT index within its image, -1 for negatives and for ignored anchors;
    boxes: [B*A, 4] xyxy GT matched to each anchor (zeros for negatives); token_targets:
    [B, A, L] float 0/1; anchor_weights: [B, A] weight of each anchor's classification terms
    (None when no target carries weights: every anchor counts 1).
    """

    assigned: Tensor
    boxes: Tensor
    token_targets: Tensor
    anchor_weights: Tensor | None = None


class GLIPLoss:
    """The official VLDyHead training losses for a batch.

    Call with the head's outputs and per-image targets; returns a dict with keys
    `loss_reg` (already x reg_loss_weight), `loss_centerness`, `loss_dot_product_token`
    (already x token_loss_weight) and `num_positives` (a detached count for logging).
    Their sum (without `num_positives`) is the official total loss.
    """

    def __init__(
        self,
        *,
        topk: int = 9,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        reg_loss_weight: float = 2.0,
        token_loss_weight: float = 1.0,
        no_object_slot: int | None = 255,
        box_coder: BoxCoder | None = None,
    ) -> None:
        self.topk = topk
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.reg_loss_weight = reg_loss_weight
        self.token_loss_weight = token_loss_weight
        self.no_object_slot = no_object_slot
        self.box_coder = box_coder or BoxCoder()

    def assign(
        self, anchors: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]], num_tokens: int
    ) -> AssignedTargets:
        """ATSS targets for every image (see `AssignedTargets`).

        targets: per image dict(boxes [G, 4] xyxy in the padded-input frame, positive_map
        [G, L'] with L' >= the tokens that carry a span; any nonzero entry is positive), and
        optionally `weights` [G] and `background_weight` (see the module doc).
        """
        device = anchors[0].device
        num_anchors = sum(level.shape[0] for level in anchors)
        assigned_all, boxes_all, tokens_all, weights_all = [], [], [], []
        weighted = any("weights" in t or "background_weight" in t for t in targets)
        for index, target in enumerate(targets):
            gt_boxes = target["boxes"].to(device=device, dtype=torch.float32).reshape(-1, 4)
            positive_map = target["positive_map"].to(device)
            if positive_map.shape[0] != gt_boxes.shape[0]:
                raise ValueError(
                    f"image {index}: {gt_boxes.shape[0]} boxes but {positive_map.shape[0]} positive-map rows"
                )
            token_rows = _fit_width((positive_map > 0).to(torch.float32), num_tokens)  # [G, L]
            assigned = atss_assign(anchors, gt_boxes, topk=self.topk)  # [A]
            if weighted:
                anchor_weights, assigned = _anchor_weights(target, assigned, gt_boxes.shape[0], device)
                weights_all.append(anchor_weights)
            positive = assigned >= 0
            tokens = torch.zeros((num_anchors, num_tokens), dtype=torch.float32, device=device)
            if self.no_object_slot is not None and self.no_object_slot < num_tokens:
                tokens[~positive, self.no_object_slot] = 1.0
            boxes = torch.zeros((num_anchors, 4), dtype=torch.float32, device=device)
            if bool(positive.any()):
                tokens[positive] = token_rows[assigned[positive]]
                boxes[positive] = gt_boxes[assigned[positive]]
            assigned_all.append(assigned)
            boxes_all.append(boxes)
            tokens_all.append(tokens)
        return AssignedTargets(
            assigned=torch.cat(assigned_all),
            boxes=torch.cat(boxes_all),
            token_targets=torch.stack(tokens_all),
            anchor_weights=torch.stack(weights_all) if weighted else None,
        )

    def __call__(
        self,
        *,
        box_regression: Sequence[Tensor],
        centerness: Sequence[Tensor],
        dot_product_logits: Sequence[Tensor],
        anchors: Sequence[Tensor],
        targets: Sequence[Mapping[str, Tensor]],
        text_mask: Tensor,
    ) -> dict[str, Tensor]:
        """Losses of a batch.

        box_regression: per level [B, 4, H, W]; centerness: per level [B, 1, H, W];
        dot_product_logits: per level [B, H*W, L]; anchors: per level [H*W, 4] xyxy (shared by
        the batch); targets: per image dict(boxes [G, 4], positive_map [G, >=L]);
        text_mask: [B, L] attention mask of the prompt tokens.
        """
        batch = box_regression[0].shape[0]
        if len(targets) != batch:
            raise ValueError(f"GLIPLoss: {len(targets)} targets for a batch of {batch}")
        logits = torch.cat([level.float() for level in dot_product_logits], dim=1)  # [B, A, L]
        num_tokens = logits.shape[2]
        if text_mask.shape != (batch, num_tokens):
            raise ValueError(f"GLIPLoss: text_mask {tuple(text_mask.shape)} vs logits {tuple(logits.shape)}")
        regression = torch.cat(
            [level.float().permute(0, 2, 3, 1).reshape(batch, -1, 4) for level in box_regression], dim=1
        ).reshape(-1, 4)  # [B*A, 4]
        centerness_logits = torch.cat(
            [level.float().permute(0, 2, 3, 1).reshape(batch, -1) for level in centerness], dim=1
        ).reshape(-1)  # [B*A]
        flat_anchors = torch.cat(list(anchors), dim=0).float().repeat(batch, 1)  # [B*A, 4]

        assigned = self.assign(anchors, targets, num_tokens)
        positive = torch.nonzero(assigned.assigned >= 0).squeeze(1)
        device = logits.device
        num_pos_avg = max(_average_over_workers(positive.numel(), device), 1.0)

        token_loss = (
            token_sigmoid_focal_loss(
                logits, assigned.token_targets.to(device), text_mask.to(device),
                alpha=self.focal_alpha, gamma=self.focal_gamma, anchor_weights=assigned.anchor_weights,
            )
            / num_pos_avg
        )

        reg_loss, centerness_loss = self._box_losses(
            regression, centerness_logits, flat_anchors, assigned.boxes, positive, num_pos_avg=num_pos_avg, device=device
        )
        return {
            "loss_reg": reg_loss * self.reg_loss_weight,
            "loss_centerness": centerness_loss,
            "loss_dot_product_token": token_loss * self.token_loss_weight,
            "num_positives": torch.tensor(float(positive.numel())),
        }

    def _box_losses(
        self, regression: Tensor, centerness_logits: Tensor, flat_anchors: Tensor, boxes: Tensor, positive: Tensor, *,
        num_pos_avg: float, device: torch.device,
    ) -> tuple[Tensor, Tensor]:
        """(GIoU loss weighted by the centerness targets, centerness BCE) of the `positive` [P]
        anchors: regression [B*A, 4] deltas, centerness_logits [B*A], flat_anchors and assigned
        boxes [B*A, 4] xyxy."""
        pred = regression[positive]
        pred_centerness = centerness_logits[positive]
        if positive.numel() > 0:
            pos_anchors = flat_anchors[positive]
            target_deltas = self.box_coder.encode(boxes[positive], pos_anchors)
            # Official: centerness from the GT decoded back from its deltas (a round trip).
            ctr_targets = centerness_targets(self.box_coder.decode(target_deltas, pos_anchors), pos_anchors)
            ctr_sum_avg = _average_over_workers(float(ctr_targets.sum()), device)
            reg_loss = (
                giou_loss(pred, target_deltas, pos_anchors, box_coder=self.box_coder, weight=ctr_targets)
                / ctr_sum_avg
            )
            centerness_loss = (
                F.binary_cross_entropy_with_logits(pred_centerness, ctr_targets, reduction="sum") / num_pos_avg
            )
        else:
            # Keep the collective in step with workers that do have positives, and the graph
            # connected (zero gradients) as the official code does.
            _average_over_workers(0.0, device)
            reg_loss = pred.sum()
            centerness_loss = pred_centerness.sum()
        return reg_loss, centerness_loss


def _anchor_weights(target: Mapping[str, Tensor], assigned: Tensor, num_gt: int, device) -> tuple[Tensor, Tensor]:
    """([A] classification weight per anchor, [A] assignment with ignored anchors set to -1):
    an anchor takes its box's weight, an unassigned one the background weight; weight-0 boxes
    make their anchors ignored (weight 0 and unassigned, so no regression either)."""
    box_weights = target.get("weights")
    box_weights = (
        torch.ones(num_gt, device=device) if box_weights is None else box_weights.to(device=device, dtype=torch.float32)
    )
    if box_weights.shape != (num_gt,):
        raise ValueError(f"target weights {tuple(box_weights.shape)} for {num_gt} boxes")
    background = float(target.get("background_weight", 1.0))
    positive = assigned >= 0
    weights = torch.full(assigned.shape, background, dtype=torch.float32, device=device)
    weights[positive] = box_weights[assigned[positive]]
    ignored = positive & (weights <= 0)
    return weights, torch.where(ignored, torch.full_like(assigned, -1), assigned)


def total_loss(losses: Mapping[str, Tensor]) -> Tensor:
    """Sum of the `loss_*` entries of a `GLIPLoss` result."""
    return sum(value for key, value in losses.items() if key.startswith("loss_"))


def _fit_width(rows: Tensor, width: int) -> Tensor:
    """Cut or zero-pad [G, L'] rows to [G, width]: positions past the logits' width carry no token."""
    if rows.shape[1] >= width:
        return rows[:, :width]
    return F.pad(rows, (0, width - rows.shape[1]))
