"""GLIP training losses against values computed by hand on tiny inputs (SPEC section 6)."""

from __future__ import annotations

import math

import pytest
import torch

from model.network.box_coder import BoxCoder
from model.training.loss import GLIPLoss, total_loss
from model.training.loss_terms import atss_assign, centerness_targets, giou_loss, legacy_box_iou, token_sigmoid_focal_loss

LN2 = math.log(2.0)


def _value(tensor: torch.Tensor) -> float:
    return float(tensor.detach())

# Two "levels" of hand-placed anchors ("+1" convention: [0, 0, 9, 9] is 10 x 10 pixels).
# GT [0, 0, 9, 9] has IoU 1 with A0, 50/150 with A1, 40/160 with A3, 0 with A2; 100/400 with B0.
LEVEL0 = torch.tensor(
    [[0.0, 0.0, 9.0, 9.0], [5.0, 0.0, 14.0, 9.0], [20.0, 20.0, 29.0, 29.0], [0.0, 6.0, 9.0, 15.0]]
)
LEVEL1 = torch.tensor([[-5.0, -5.0, 14.0, 14.0], [30.0, 30.0, 49.0, 49.0]])
GT = torch.tensor([[0.0, 0.0, 9.0, 9.0]])


def test_legacy_iou_uses_plus_one_areas():
    iou = legacy_box_iou(LEVEL0, GT)[:, 0]
    assert iou.tolist() == pytest.approx([1.0, 50 / 150, 0.0, 40 / 160])
    assert legacy_box_iou(LEVEL1, GT)[:, 0].tolist() == pytest.approx([100 / 400, 0.0])


def test_atss_threshold_is_mean_plus_std_of_nearest_candidates():
    # topk=2 per level: level 0 picks A0 (distance 0) and A1 (5; A3 is 6 away), level 1 both.
    # Candidate IoUs {1, 1/3, 1/4, 0}: mean 19/48, unbiased std sqrt(0.546875 / 3) = 0.42696,
    # threshold 0.8228 -> only A0 is positive.
    assigned = atss_assign([LEVEL0, LEVEL1], GT, topk=2)
    assert assigned.tolist() == [0, -1, -1, -1, -1, -1]
    # With topk=1 the candidates are A0 and B0: IoUs {1, 1/4}, threshold 0.625 + 0.53033.
    # No candidate reaches 1.155, so nothing is positive: the threshold is not capped.
    assert atss_assign([LEVEL0, LEVEL1], GT, topk=1).tolist() == [-1] * 6


def test_atss_requires_anchor_centre_inside_gt():
    # A GT to the right of A0 whose left edge passes through A0's centre (4.5): l = 0 -> not inside.
    gt = torch.tensor([[4.5, 0.0, 13.5, 9.0]])
    anchors = [torch.tensor([[0.0, 0.0, 9.0, 9.0], [100.0, 100.0, 109.0, 109.0]]), torch.tensor([[200.0, 0.0, 209.0, 9.0]])]
    # Candidates (topk 2 + 1): IoUs A0 = 5.5*10/(100+100-55) = 0.3793, others 0; threshold
    # mean 0.1264 + std 0.2190 = 0.3454 < IoU(A0), but A0's centre is on the GT's edge.
    assert atss_assign(anchors, gt, topk=2).tolist() == [-1, -1, -1]
    shifted = torch.tensor([[4.4, 0.0, 13.4, 9.0]])  # centre 0.1 px inside now (> 0.01)
    assert atss_assign(anchors, shifted, topk=2).tolist() == [0, -1, -1]


def test_atss_anchor_claimed_by_two_gts_takes_highest_iou():
    anchors = [torch.tensor([[0.0, 0.0, 9.0, 9.0], [100.0, 0.0, 109.0, 9.0], [200.0, 0.0, 209.0, 9.0]])]
    # Both GTs have A0 as their only positive candidate; GT1 overlaps it more (IoU 1 vs 0.5625).
    gts = torch.tensor([[0.0, 0.0, 9.0, 14.0], [0.0, 0.0, 9.0, 9.0]])
    assert legacy_box_iou(anchors[0][:1], gts)[0].tolist() == pytest.approx([100 / 150, 1.0])
    assert atss_assign(anchors, gts, topk=3).tolist() == [1, -1, -1]


def test_atss_without_boxes_is_all_negative():
    assert atss_assign([LEVEL0, LEVEL1], torch.zeros((0, 4)), topk=9).tolist() == [-1] * 6


def test_centerness_targets():
    anchors = torch.tensor([[0.0, 0.0, 9.0, 9.0], [0.0, 0.0, 9.0, 9.0]])
    gts = torch.tensor([[0.0, 0.0, 9.0, 9.0], [0.0, 0.0, 19.0, 9.0]])
    # Centre (4.5, 4.5): l = r, t = b -> 1; second GT: l 4.5, r 14.5, t = b -> sqrt(4.5 / 14.5).
    assert centerness_targets(gts, anchors).tolist() == pytest.approx([1.0, math.sqrt(4.5 / 14.5)])


def test_token_focal_loss_counts_only_real_tokens():
    logits = torch.zeros((1, 2, 3))
    targets = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
    # p = 0.5: a positive costs alpha * 0.5^2 * ln2 = 0.0625 ln2, a negative 0.75 * 0.25 * ln2.
    full = token_sigmoid_focal_loss(logits, targets, None)
    assert float(full) == pytest.approx((2 * 0.0625 + 4 * 0.1875) * LN2)
    # Token 2 is padding: the positive of anchor 1 there is not counted.
    masked = token_sigmoid_focal_loss(logits, targets, torch.tensor([[1, 1, 0]]))
    assert float(masked) == pytest.approx((0.0625 + 3 * 0.1875) * LN2)
    # A confident correct prediction costs almost nothing, a confident wrong one a lot.
    sure = torch.tensor([[[8.0, -8.0, -8.0], [-8.0, -8.0, 8.0]]])
    assert float(token_sigmoid_focal_loss(sure, targets, None)) < 1e-6
    assert float(token_sigmoid_focal_loss(-sure, targets, None)) > 10


def test_giou_loss_disjoint_and_identical_boxes():
    coder = BoxCoder()
    anchors = torch.tensor([[0.0, 0.0, 9.0, 9.0]])
    target = coder.encode(torch.tensor([[20.0, 0.0, 29.0, 9.0]]), anchors)
    # Prediction = the anchor [0,0,9,9]: areas 81 (no "+1"), no overlap, enclosing 29*9 = 261,
    # union 162 -> GIoU = -(261-162)/261, loss 1 + 99/261.
    loss = giou_loss(torch.zeros((1, 4)), target, anchors, box_coder=coder)
    assert float(loss) == pytest.approx(1 + 99 / 261, rel=1e-5)
    assert float(giou_loss(target, target, anchors, box_coder=coder)) == pytest.approx(0.0, abs=1e-5)
    # Weighted sum; an all-zero weight falls back to the plain sum (official behaviour).
    weighted = giou_loss(torch.zeros((1, 4)), target, anchors, box_coder=coder, weight=torch.tensor([0.5]))
    assert float(weighted) == pytest.approx(0.5 * (1 + 99 / 261), rel=1e-5)
    unweighted = giou_loss(torch.zeros((1, 4)), target, anchors, box_coder=coder, weight=torch.zeros(1))
    assert float(unweighted) == pytest.approx(1 + 99 / 261, rel=1e-5)


def _head_outputs(batch: int, tokens: int, *, shift_first_anchor: float = 0.0):
    """Zero head outputs for the hand-placed anchors: level 0 is a 1x4 map, level 1 a 1x2 map."""
    box_regression = [torch.zeros((batch, 4, 1, 4), requires_grad=True), torch.zeros((batch, 4, 1, 2), requires_grad=True)]
    if shift_first_anchor:
        with torch.no_grad():
            box_regression[0][0, 0, 0, 0] = shift_first_anchor
    centerness = [torch.zeros((batch, 1, 1, 4), requires_grad=True), torch.zeros((batch, 1, 1, 2), requires_grad=True)]
    logits = [torch.zeros((batch, 4, tokens), requires_grad=True), torch.zeros((batch, 2, tokens), requires_grad=True)]
    return box_regression, centerness, logits


def test_glip_loss_by_hand_with_an_empty_image_and_a_phrase_without_box():
    # Image 0: one GT on tokens {1}; token 2 is a phrase with no box (all-zero targets);
    # token 3 is padding. Image 1 has no boxes and two real tokens.
    box_regression, centerness, logits = _head_outputs(2, 4, shift_first_anchor=5.0)
    targets = [
        {"boxes": GT, "positive_map": torch.tensor([[0.0, 1.0, 0.0, 0.0]])},
        {"boxes": torch.zeros((0, 4)), "positive_map": torch.zeros((0, 4))},
    ]
    text_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    loss_fn = GLIPLoss(topk=2)
    losses = loss_fn(
        box_regression=box_regression,
        centerness=centerness,
        dot_product_logits=logits,
        anchors=[LEVEL0, LEVEL1],
        targets=targets,
        text_mask=text_mask,
    )
    assert _value(losses["num_positives"]) == 1.0
    # Tokens: image 0 has 6 anchors x 3 real tokens, one positive entry; image 1 has 6 x 2
    # negatives. Divided by max(#positives, 1) = 1.
    assert _value(losses["loss_dot_product_token"]) == pytest.approx((0.0625 + 29 * 0.1875) * LN2, rel=1e-6)
    # A0 predicts dx = 5 -> shifted by 5 px: [5,0,14,9] vs GT [0,0,9,9]: inter 36, union 126,
    # enclosing 126 -> GIoU 2/7; centerness target 1; x REG_LOSS_WEIGHT 2.
    assert _value(losses["loss_reg"]) == pytest.approx(2 * 5 / 7, rel=1e-5)
    # BCE of logit 0 is ln 2 whatever the target.
    assert _value(losses["loss_centerness"]) == pytest.approx(LN2, rel=1e-6)
    total = total_loss(losses)
    assert _value(total) == pytest.approx((0.0625 + 29 * 0.1875) * LN2 + 10 / 7 + LN2, rel=1e-5)
    total.backward()
    # Only the positive anchor's regression gets a gradient.
    grad = box_regression[0].grad
    assert grad[0, :, 0, 0].abs().sum() > 0
    assert grad[0, :, 0, 1:].abs().sum() == 0 and grad[1].abs().sum() == 0


def test_glip_loss_no_object_slot_and_all_empty_batch():
    box_regression, centerness, logits = _head_outputs(1, 4)
    targets = [{"boxes": torch.zeros((0, 4)), "positive_map": torch.zeros((0, 4))}]
    mask = torch.ones((1, 4), dtype=torch.int64)
    # Slot 3 stands for the official "no object" position 255: every negative anchor has target
    # 1 there. 6 anchors x (3 negatives + 1 positive-target entry at p = 0.5).
    with_slot = GLIPLoss(no_object_slot=3)(
        box_regression=box_regression, centerness=centerness, dot_product_logits=logits,
        anchors=[LEVEL0, LEVEL1], targets=targets, text_mask=mask,
    )
    assert _value(with_slot["loss_dot_product_token"]) == pytest.approx(6 * (3 * 0.1875 + 0.0625) * LN2, rel=1e-6)
    # Default slot 255 lies beyond these 4 tokens: all entries are plain negatives.
    default = GLIPLoss()(
        box_regression=box_regression, centerness=centerness, dot_product_logits=logits,
        anchors=[LEVEL0, LEVEL1], targets=targets, text_mask=mask,
    )
    assert _value(default["loss_dot_product_token"]) == pytest.approx(24 * 0.1875 * LN2, rel=1e-6)
    assert _value(default["loss_reg"]) == 0.0 and _value(default["loss_centerness"]) == 0.0
    total_loss(default).backward()
    assert logits[0].grad is not None and box_regression[0].grad.abs().sum() == 0


def test_glip_loss_rejects_mismatched_targets():
    box_regression, centerness, logits = _head_outputs(1, 4)
    bad = [{"boxes": GT, "positive_map": torch.zeros((2, 4))}]
    with pytest.raises(ValueError, match="1 boxes but 2 positive-map rows"):
        GLIPLoss()(
            box_regression=box_regression, centerness=centerness, dot_product_logits=logits,
            anchors=[LEVEL0, LEVEL1], targets=bad, text_mask=torch.ones((1, 4)),
        )


# -- self-training weights (pseudo boxes) --------------------------------------------------


def _image0_losses(**target_extras):
    """Losses of image 0 above (one GT on token 1, A0 its only positive, 3 real tokens)."""
    box_regression, centerness, logits = _head_outputs(1, 4, shift_first_anchor=5.0)
    target = {"boxes": GT, "positive_map": torch.tensor([[0.0, 1.0, 0.0, 0.0]]), **target_extras}
    losses = GLIPLoss(topk=2)(
        box_regression=box_regression, centerness=centerness, dot_product_logits=logits,
        anchors=[LEVEL0, LEVEL1], targets=[target], text_mask=torch.tensor([[1, 1, 1, 0]]),
    )
    return losses, box_regression


# A0's terms: one positive entry (0.0625 ln 2) and two negatives (0.1875 ln 2 each); the 5
# other anchors: 3 negative entries each.
POSITIVE_ANCHOR = (0.0625 + 2 * 0.1875) * LN2
BACKGROUND = 15 * 0.1875 * LN2


def test_a_pseudo_box_of_score_0_3_counts_0_3_of_a_gold_box():
    gold, _ = _image0_losses()
    assert _value(gold["loss_dot_product_token"]) == pytest.approx(POSITIVE_ANCHOR + BACKGROUND, rel=1e-6)
    pseudo, _ = _image0_losses(weights=torch.tensor([0.3]))
    assert _value(pseudo["loss_dot_product_token"]) == pytest.approx(0.3 * POSITIVE_ANCHOR + BACKGROUND, rel=1e-6)
    # Without background, the weighted box's classification loss is exactly 0.3 of the gold box's.
    alone_gold, _ = _image0_losses(weights=torch.tensor([1.0]), background_weight=0.0)
    alone_pseudo, _ = _image0_losses(weights=torch.tensor([0.3]), background_weight=0.0)
    assert _value(alone_gold["loss_dot_product_token"]) == pytest.approx(POSITIVE_ANCHOR, rel=1e-6)
    assert _value(alone_pseudo["loss_dot_product_token"]) == pytest.approx(0.3 * POSITIVE_ANCHOR, rel=1e-6)
    # Regression and centerness are not weighted, and the positive still counts once.
    assert _value(pseudo["loss_reg"]) == pytest.approx(_value(gold["loss_reg"]), rel=1e-6)
    assert _value(pseudo["num_positives"]) == 1.0


def test_background_weight_scales_the_negatives_of_a_pseudo_image():
    half, _ = _image0_losses(weights=torch.tensor([1.0]), background_weight=0.5)
    assert _value(half["loss_dot_product_token"]) == pytest.approx(POSITIVE_ANCHOR + 0.5 * BACKGROUND, rel=1e-6)


def test_an_ignored_box_makes_its_anchor_neither_positive_nor_negative():
    ignored, box_regression = _image0_losses(weights=torch.tensor([0.0]))
    # A0 contributes nothing: no positive term, no negative term, no regression, no centerness.
    assert _value(ignored["num_positives"]) == 0.0
    assert _value(ignored["loss_dot_product_token"]) == pytest.approx(BACKGROUND, rel=1e-6)
    assert _value(ignored["loss_reg"]) == 0.0 and _value(ignored["loss_centerness"]) == 0.0
    total_loss(ignored).backward()
    assert box_regression[0].grad.abs().sum() == 0
    # Had the box been absent, A0 would have been a negative (3 more negative entries).
    absent_box = BACKGROUND + 3 * 0.1875 * LN2
    assert _value(ignored["loss_dot_product_token"]) < absent_box
