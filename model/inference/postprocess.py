"""GLIP inference post-processing: token logits -> phrase scores -> boxes (SPEC section 5).

Reproduces the official `ATSSPostProcessor` (maskrcnn_benchmark `modeling/rpn/inference.py`)
on its dot-product path, step by step and with the same tensor operations, so that the same
head outputs give the same candidates and detections:

per level (`select_level_candidates`)
  1. phrase probability = MEAN over the phrase's tokens of sigmoid(dot-product logit);
  2. candidates = probability > pre_nms_thresh (threshold BEFORE centerness), their count per
     image clamped to pre_nms_top_n;
  3. score = probability * sigmoid(centerness); top-k of the candidates (`topk(sorted=False)`);
  4. decode against the anchors, report sqrt(score), clip to [0, W-1] x [0, H-1], drop boxes of
     negative "+1" width or height (remove_small_boxes(0));
over all levels (`ATSSPostProcessor.select_over_all_levels`)
  5. concatenate P3..P7, multi-label NMS (`model.inference.nms`, mode "gpu" = the official GPU kernel),
     and if more than detections_per_img remain keep scores >= the kthvalue threshold (ties
     can keep a few more).

Labels are 1-based phrase (entity) indices: label j scores the tokens `label_to_tokens[j]` in
column j-1 of a score tensor `num_classes` wide (80 in the official code, the width of the unused
`cls_logits`; larger here when more phrases are grounded at once).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

from model.network.box_coder import BoxCoder
from model.inference.nms import ml_nms_legacy, ml_nms_official_cpu, ml_nms_per_label

ImageSize = tuple[int, int]  # (height, width) of the un-padded network input
LabelToTokens = Mapping[int, Sequence[int]]

# "gpu": ml_nms.cu semantics (the official GPU result, default); "cpu": the official CPU branch
# bug for bug (parity with CPU runs of the official code only); "per_label": that branch fixed.
NMS_MODES = ("gpu", "cpu", "per_label")
_NMS_FUNCTIONS = {"gpu": ml_nms_legacy, "cpu": ml_nms_official_cpu, "per_label": ml_nms_per_label}
SCORE_AGGREGATIONS = ("MEAN", "MAX")


def aggregate_token_probs(
    token_probs: Tensor,
    label_to_tokens: LabelToTokens,
    *,
    num_classes: int = 80,
    score_agg: str = "MEAN",
) -> Tensor:
    """Phrase scores [HW, num_classes] from token probabilities [HW, L] of one image.

    Column `label - 1` holds the MEAN (or MAX) over `label_to_tokens[label]` of the token
    probabilities (mean of probabilities, not of logits, as `convert_grounding_to_od_logits`).
    Columns without a label are 0. A label with no token is NaN, as the official empty mean, so
    it never passes the candidate threshold.
    """
    if score_agg not in SCORE_AGGREGATIONS:
        raise ValueError(f"score_agg must be one of {SCORE_AGGREGATIONS}, got {score_agg!r}")
    num_tokens = token_probs.shape[-1]
    scores = token_probs.new_zeros((token_probs.shape[0], num_classes))
    by_length: dict[int, tuple[list[int], list[list[int]]]] = {}
    for label, tokens in label_to_tokens.items():
        label = int(label)
        if not 1 <= label <= num_classes:
            raise ValueError(f"label {label} outside 1..num_classes={num_classes}; raise num_classes")
        tokens = [int(t) for t in tokens]
        if any(not 0 <= t < num_tokens for t in tokens):
            raise ValueError(f"label {label}: token indices {tokens} outside the {num_tokens} logit columns")
        columns, indices = by_length.setdefault(len(tokens), ([], []))
        columns.append(label - 1)
        indices.append(tokens)
    # One gather per distinct token count (not per label): [HW, labels, n] reduced over n, the
    # same reduction the official per-label `logits[:, :, tokens].mean(-1)` performs.
    for length, (columns, indices) in by_length.items():
        column_index = torch.tensor(columns, dtype=torch.int64, device=scores.device)
        if length == 0:
            scores[:, column_index] = float("nan")
            continue
        token_index = torch.tensor(indices, dtype=torch.int64, device=scores.device)  # [labels, n]
        gathered = token_probs[:, token_index]  # [HW, labels, n]
        reduced = gathered.mean(-1) if score_agg == "MEAN" else gathered.amax(-1)
        scores[:, column_index] = reduced
    return scores


def flatten_level(box_regression: Tensor, centerness: Tensor) -> tuple[Tensor, Tensor]:
    """[B, 4, H, W] deltas and [B, 1, H, W] logits -> [B, H*W, 4] and [B, H*W] (row-major)."""
    batch = box_regression.shape[0]
    deltas = box_regression.permute(0, 2, 3, 1).reshape(batch, -1, 4)  # [B, HW, 4]
    return deltas, centerness.reshape(batch, -1)  # [B, HW]


def select_level_candidates(
    box_regression: Tensor,
    centerness: Tensor,
    class_scores: Tensor,
    anchors: Tensor,
    image_sizes: Sequence[ImageSize],
    *,
    pre_nms_thresh: float = 0.05,
    pre_nms_top_n: int = 1000,
    box_coder: BoxCoder | None = None,
) -> list[dict[str, Tensor]]:
    """Pre-NMS candidates of one level (`forward_for_single_feature_map`).

    box_regression [B, 4, H, W] deltas; centerness [B, 1, H, W] logits; class_scores
    [B, H*W, C] phrase probabilities (before centerness); anchors [H*W, 4] xyxy;
    image_sizes (h, w) per image. Returns per image dict(boxes [K, 4] xyxy clipped to the
    un-padded input, scores [K] = sqrt(prob * sigmoid(centerness)), labels [K] int64 1-based),
    in `topk(sorted=False)` order.
    """
    box_coder = box_coder or BoxCoder()
    deltas, centerness_logits = flatten_level(box_regression, centerness)
    batch = deltas.shape[0]
    if class_scores.shape[:2] != deltas.shape[:2] or anchors.shape != (deltas.shape[1], 4):
        raise ValueError(
            f"level shapes disagree: regression {tuple(box_regression.shape)}, scores "
            f"{tuple(class_scores.shape)}, anchors {tuple(anchors.shape)}"
        )
    candidates = class_scores > pre_nms_thresh  # [B, HW, C]
    top_n = candidates.reshape(batch, -1).sum(1).clamp(max=pre_nms_top_n)  # [B]
    scores = class_scores * centerness_logits.sigmoid()[:, :, None]  # [B, HW, C]
    results = []
    for b in range(batch):
        # Boolean indexing enumerates candidates anchor-major, class-minor, as the official code;
        # with identical inputs topk then picks the identical set (ties included).
        values, order = scores[b][candidates[b]].topk(int(top_n[b]), sorted=False)
        anchor_class = candidates[b].nonzero()[order]  # [K, 2]
        location = anchor_class[:, 0]
        boxes = box_coder.decode(deltas[b, location].reshape(-1, 4), anchors[location].reshape(-1, 4))
        height, width = image_sizes[b]
        boxes = clip_boxes(boxes, (height, width))
        keep = nonnegative_size(boxes)
        results.append(
            {
                "boxes": boxes[keep],
                "scores": torch.sqrt(values)[keep],
                "labels": (anchor_class[:, 1] + 1)[keep],
            }
        )
    return results


def clip_boxes(boxes: Tensor, image_size: ImageSize) -> Tensor:
    """Clamp xyxy [N, 4] to [0, W-1] x [0, H-1] ("+1" convention: W-1 is the last pixel)."""
    height, width = image_size
    return torch.stack(
        (
            boxes[:, 0].clamp(min=0, max=width - 1),
            boxes[:, 1].clamp(min=0, max=height - 1),
            boxes[:, 2].clamp(min=0, max=width - 1),
            boxes[:, 3].clamp(min=0, max=height - 1),
        ),
        dim=1,
    )


def nonnegative_size(boxes: Tensor, min_size: float = 0.0) -> Tensor:
    """Keep mask [N] of `remove_small_boxes`: "+1" width and height >= min_size (NaN dropped)."""
    widths = boxes[:, 2] - boxes[:, 0] + 1
    heights = boxes[:, 3] - boxes[:, 1] + 1
    return (widths >= min_size) & (heights >= min_size)


def rescale_boxes(boxes: Tensor, from_size: ImageSize, to_size: ImageSize) -> Tensor:
    """Map xyxy boxes [N, 4] from an image of (h, w) `from_size` to one of (h, w) `to_size`.

    Plain ratio scaling (official `BoxList.resize`): x * new_w / old_w, y * new_h / old_h.
    """
    ratio_h = float(to_size[0]) / float(from_size[0])
    ratio_w = float(to_size[1]) / float(from_size[1])
    if ratio_h == ratio_w:
        return boxes * ratio_w
    return torch.stack(
        (boxes[:, 0] * ratio_w, boxes[:, 1] * ratio_h, boxes[:, 2] * ratio_w, boxes[:, 3] * ratio_h),
        dim=1,
    )


class ATSSPostProcessor:
    """Head outputs of a batch -> per-image detections, as the official inference selector."""

    def __init__(
        self,
        *,
        pre_nms_thresh: float = 0.05,
        pre_nms_top_n: int = 1000,
        nms_thresh: float = 0.6,
        detections_per_img: int = 100,
        nms_mode: str = "gpu",
        score_agg: str = "MEAN",
        box_coder: BoxCoder | None = None,
    ) -> None:
        if nms_mode not in NMS_MODES:
            raise ValueError(f"nms_mode must be one of {NMS_MODES}, got {nms_mode!r}")
        if score_agg not in SCORE_AGGREGATIONS:
            raise ValueError(f"score_agg must be one of {SCORE_AGGREGATIONS}, got {score_agg!r}")
        self.pre_nms_thresh = float(pre_nms_thresh)
        self.pre_nms_top_n = int(pre_nms_top_n)
        self.nms_thresh = float(nms_thresh)
        self.detections_per_img = int(detections_per_img)
        self.nms_mode = nms_mode
        self.score_agg = score_agg
        self.box_coder = box_coder or BoxCoder()

    def class_scores(
        self, dot_product_logits: Tensor, label_to_tokens: Sequence[LabelToTokens], num_classes: int = 80
    ) -> Tensor:
        """[B, HW, L] token logits -> [B, HW, num_classes] phrase probabilities."""
        if len(label_to_tokens) != dot_product_logits.shape[0]:
            raise ValueError(
                f"{len(label_to_tokens)} label->token maps for a batch of {dot_product_logits.shape[0]}"
            )
        probs = dot_product_logits.sigmoid()
        return torch.stack(
            [
                aggregate_token_probs(probs[b], mapping, num_classes=num_classes, score_agg=self.score_agg)
                for b, mapping in enumerate(label_to_tokens)
            ]
        )

    def select_level(
        self,
        box_regression: Tensor,
        centerness: Tensor,
        dot_product_logits: Tensor,
        anchors: Tensor,
        image_sizes: Sequence[ImageSize],
        label_to_tokens: Sequence[LabelToTokens],
        num_classes: int = 80,
    ) -> list[dict[str, Tensor]]:
        """Pre-NMS candidates of one level per image (see `select_level_candidates`)."""
        return select_level_candidates(
            box_regression,
            centerness,
            self.class_scores(dot_product_logits, label_to_tokens, num_classes),
            anchors,
            image_sizes,
            pre_nms_thresh=self.pre_nms_thresh,
            pre_nms_top_n=self.pre_nms_top_n,
            box_coder=self.box_coder,
        )

    def nms(self, boxes: Tensor, scores: Tensor, labels: Tensor) -> Tensor:
        """Kept indices of the configured multi-label NMS (see `model.inference.nms`)."""
        if self.nms_thresh <= 0:  # official boxlist_ml_nms returns the input untouched
            return torch.arange(boxes.shape[0], device=boxes.device)
        return _NMS_FUNCTIONS[self.nms_mode](boxes, scores, labels, self.nms_thresh)

    def select_over_all_levels(self, candidates: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """NMS and the per-image cap on one image's candidates (levels already concatenated)."""
        boxes, scores, labels = candidates["boxes"], candidates["scores"], candidates["labels"]
        keep = self.nms(boxes, scores, labels)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        count = scores.shape[0]
        if count > self.detections_per_img > 0:
            # kthvalue threshold, `>=`: equal scores at the cut are all kept, as officially.
            threshold = torch.kthvalue(scores.cpu(), count - self.detections_per_img + 1).values.item()
            cut = torch.nonzero(scores >= threshold).squeeze(1)
            boxes, scores, labels = boxes[cut], scores[cut], labels[cut]
        return {"boxes": boxes, "scores": scores, "labels": labels}

    def __call__(
        self,
        box_regression: Sequence[Tensor],
        centerness: Sequence[Tensor],
        dot_product_logits: Sequence[Tensor],
        anchors: Sequence[Tensor],
        image_sizes: Sequence[ImageSize],
        label_to_tokens: Sequence[LabelToTokens],
        num_classes: int = 80,
    ) -> list[dict[str, Tensor]]:
        """Detections per image.

        Per level (P3..P7): box_regression [B, 4, H, W], centerness [B, 1, H, W],
        dot_product_logits [B, H*W, L], anchors [H*W, 4]. image_sizes: (h, w) per image of the
        un-padded input; label_to_tokens: per image {label: token indices}. Returns per image
        dict(boxes [K, 4] xyxy in the un-padded network-input frame, scores [K], labels [K]
        int64 1-based).
        """
        levels = len(box_regression)
        if not (len(centerness) == len(dot_product_logits) == len(anchors) == levels):
            raise ValueError(
                f"per-level inputs disagree: {levels} regression, {len(centerness)} centerness, "
                f"{len(dot_product_logits)} logits, {len(anchors)} anchor maps"
            )
        batch = box_regression[0].shape[0] if levels else 0
        if len(image_sizes) != batch or len(label_to_tokens) != batch:
            raise ValueError(
                f"batch of {batch} images but {len(image_sizes)} image_sizes and "
                f"{len(label_to_tokens)} label->token maps"
            )
        per_level = [
            self.select_level(reg, ctr, logits, level_anchors, image_sizes, label_to_tokens, num_classes)
            for reg, ctr, logits, level_anchors in zip(box_regression, centerness, dot_product_logits, anchors)
        ]
        results = []
        for b in range(batch):
            merged = {key: torch.cat([level[b][key] for level in per_level]) for key in ("boxes", "scores", "labels")}
            results.append(self.select_over_all_levels(merged))
        return results
