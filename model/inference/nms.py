"""Multi-label NMS as the official GLIP post-processing runs it (`boxlist_ml_nms`).

The official code has two branches, and they give different results:

* `ml_nms_legacy` ("gpu"): the `_C.ml_nms` CUDA kernel (maskrcnn_benchmark
  `csrc/cuda/ml_nms.cu`) that every GPU run uses. Boxes are visited by descending score; IoU
  uses the "+1" pixel convention; a box is suppressed by a kept box of the same label when
  IoU > the threshold; kept indices come back sorted ascending (original order).
* `ml_nms_official_cpu` ("cpu"): the Python branch taken for CPU tensors, reproduced with its
  indexing bug (see there).
* `ml_nms_per_label` ("per_label"): what that CPU branch means to do: `torchvision.ops.nms`
  (IoU without "+1") per label, concatenated label by label.

All take boxes [N, 4] xyxy, scores [N], labels [N] (int) and return indices [K] int64.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import nms as torchvision_nms

_ROW_BLOCK = 256


def legacy_pairwise_iou(boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
    """IoU [A, B] of xyxy boxes with "+1" widths, in the float order of ml_nms.cu's devIoU."""
    left = torch.maximum(boxes_a[:, None, 0], boxes_b[None, :, 0])
    right = torch.minimum(boxes_a[:, None, 2], boxes_b[None, :, 2])
    top = torch.maximum(boxes_a[:, None, 1], boxes_b[None, :, 1])
    bottom = torch.minimum(boxes_a[:, None, 3], boxes_b[None, :, 3])
    width = (right - left + 1).clamp(min=0)
    height = (bottom - top + 1).clamp(min=0)
    inter = width * height  # [A, B]
    area_a = (boxes_a[:, 2] - boxes_a[:, 0] + 1) * (boxes_a[:, 3] - boxes_a[:, 1] + 1)
    area_b = (boxes_b[:, 2] - boxes_b[:, 0] + 1) * (boxes_b[:, 3] - boxes_b[:, 1] + 1)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def greedy_keep(suppresses: Tensor) -> Tensor:
    """Greedy NMS decision from a suppression relation, without a Python loop per box.

    suppresses: [N, N] bool in visiting order, `suppresses[i, j]` True when box i would remove a
    later box j (only i < j entries are read). Returns keep [N] bool with the sequential-greedy
    meaning: j is kept iff no kept i < j suppresses it. Resolved by rounds: a box is removed once
    a kept box suppresses it and kept once all its would-be suppressors are removed; each round
    settles at least the first undecided box, and typically a handful of rounds settle all.
    """
    n = suppresses.shape[0]
    suppresses = torch.triu(suppresses, diagonal=1)
    kept = torch.zeros(n, dtype=torch.bool, device=suppresses.device)
    removed = torch.zeros_like(kept)
    undecided = torch.ones_like(kept)
    while bool(undecided.any()):
        by_kept = suppresses[kept].any(dim=0)
        open_suppressor = suppresses[~removed].any(dim=0)  # some suppressor not yet removed
        newly_removed = undecided & by_kept
        newly_kept = undecided & ~open_suppressor
        settled = newly_removed | newly_kept
        if not bool(settled.any()):  # cannot happen for an upper-triangular relation
            raise RuntimeError("greedy_keep: NMS did not settle every box")
        removed |= newly_removed
        kept |= newly_kept
        undecided &= ~settled
    return kept


def ml_nms_legacy(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float) -> Tensor:
    """Kept indices [K] ascending, as `_C.ml_nms` on the GPU (see module docstring)."""
    _check(boxes, scores, labels)
    order = torch.sort(scores, descending=True, stable=True).indices
    kept = [torch.zeros(0, dtype=torch.int64, device=boxes.device)]
    # Boxes of different labels never suppress each other in the kernel, so its single greedy
    # pass over all boxes equals independent greedy passes per label (each in descending score
    # order); per label, the pairwise work is [n_label, n_label] instead of [N, N].
    for label in torch.unique(labels):
        members = order[labels[order] == label]  # this label's boxes, descending score
        member_boxes = boxes[members]
        count = members.shape[0]
        suppresses = torch.zeros((count, count), dtype=torch.bool, device=boxes.device)
        # Only later boxes (columns >= the row) can be suppressed; row blocks keep the float
        # temporaries small enough to stay in cache.
        for start in range(0, count, _ROW_BLOCK):
            rows = member_boxes[start : start + _ROW_BLOCK]
            iou = legacy_pairwise_iou(rows, member_boxes[start:])  # [block, count - start]
            suppresses[start : start + _ROW_BLOCK, start:] = iou > iou_threshold
        kept.append(members[greedy_keep(suppresses)])
    return torch.sort(torch.cat(kept)).values


def ml_nms_per_label(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float) -> Tensor:
    """Kept indices [K] grouped by ascending label, each label's by descending score.

    What the official CPU branch intends: `torchvision.ops.nms` (IoU without "+1") per label.
    """
    _check(boxes, scores, labels)
    kept = [torch.zeros(0, dtype=torch.int64, device=boxes.device)]
    # A loop over distinct labels (not boxes): torchvision's batched_nms would offset the
    # coordinates per label and so change the float values compared.
    for label in torch.unique(labels):
        index = torch.nonzero(labels == label).view(-1)
        kept.append(index[torchvision_nms(boxes[index], scores[index], iou_threshold)])
    return torch.cat(kept)


def ml_nms_official_cpu(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float) -> Tensor:
    """Indices [K] exactly as the official CPU branch of `boxlist_ml_nms` returns them.

    That branch runs `torchvision.ops.nms` per label but appends the kept positions WITHIN the
    label's subset without mapping them back through the subset's indices, so it selects the
    wrong boxes, can repeat one box, and mixes labels. Verified against the reference run's
    `final_cpu_nms_*`. Use it only to reproduce official CPU outputs; `ml_nms_per_label` is the
    corrected behaviour and `ml_nms_legacy` the GPU one.
    """
    _check(boxes, scores, labels)
    kept = [torch.zeros(0, dtype=torch.int64, device=boxes.device)]
    for label in torch.unique(labels):
        index = torch.nonzero(labels == label).view(-1)
        # Positions within `index`, not `index[...]`: the official bug, kept on purpose.
        kept.append(torchvision_nms(boxes[index], scores[index], iou_threshold))
    return torch.cat(kept)


def _check(boxes: Tensor, scores: Tensor, labels: Tensor) -> None:
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"NMS: boxes must be [N, 4], got {tuple(boxes.shape)}")
    if scores.shape != boxes.shape[:1] or labels.shape != boxes.shape[:1]:
        raise ValueError(
            f"NMS: scores {tuple(scores.shape)} and labels {tuple(labels.shape)} must be [N] "
            f"for boxes {tuple(boxes.shape)}"
        )
