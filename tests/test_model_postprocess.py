"""ATSS post-processing fed with the stored raw head tensors of both official reference runs.

The reference runs (official GLIP code, T(C) with deep fusion and T(A) without) stored the head
outputs, the per-level pre-NMS candidates and the final detections of both NMS branches, so the
selector here must reproduce them exactly from the same inputs: the same boxes, labels and order,
and the same scores up to torch's own float32 rounding. The scores are `sqrt(sigmoid(logit) *
sigmoid(centerness))`, and torch's vectorised sigmoid rounds the last bit differently by CPU
instruction set (the reference CPU had AVX-512: `ATEN_CPU_CAPABILITY=avx2` or `default` shifts a few
scores by one unit in the last place, ULP). Box decoding's `exp` does the same: on the machine of
2026-12-07 (an AVX-512 Xeon) a few box coordinates of the unchanged code came out one ULP off
(8 of 5,000 candidates, 1-2 of 400 detections). So scores are compared to within `SCORE_ULPS`
and box coordinates to within `BOX_ATOL` pixels (two float32 ULPs at 1,024 px: a coordinate near
0 comes out of a difference of larger numbers, so its own ULP is no measure); labels, the
candidate sets and the order are exact.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import batched_nms

from model.network.anchors import AnchorGenerator
from model.inference.nms import greedy_keep, legacy_pairwise_iou, ml_nms_legacy, ml_nms_official_cpu, ml_nms_per_label
from model.inference.postprocess import ATSSPostProcessor, aggregate_token_probs, rescale_boxes

RUNS = ("t_c", "t_a")
LEVEL_SIZES = [(60, 80), (30, 40), (15, 20), (8, 10), (4, 5)]
IMAGE_SIZE = (480, 640)
REFERENCE_TOKENS = {1: [1], 2: [3], 3: [5]}  # person. bicycle. car.


def _head(z, pad_tokens_to: int | None = None):
    """Stored head outputs as batched per-level tensors (B = 1)."""
    regression = [torch.from_numpy(z[f"bbox_reg_P{k}"])[None] for k in range(3, 8)]
    centerness = [torch.from_numpy(z[f"centerness_P{k}"])[None, None] for k in range(3, 8)]
    logits = [torch.from_numpy(z[f"dot_logits_P{k}_first16"])[None] for k in range(3, 8)]
    if pad_tokens_to is not None:  # padding positions get very negative logits, as never-marked tokens
        logits = [torch.cat([x, x.new_full((*x.shape[:2], pad_tokens_to - x.shape[2]), -5e4)], dim=2) for x in logits]
    return regression, centerness, logits


@pytest.fixture(scope="module", params=RUNS)
def run(request, reference_dir):
    return np.load(reference_dir / f"glip_{request.param}_reference.npz")


@pytest.fixture(scope="module")
def anchors():
    return AnchorGenerator()(LEVEL_SIZES)


SCORE_ULPS = 2  # float32 units in the last place a score may differ by (the module docstring)
BOX_ATOL = 2.5e-4  # pixels a box coordinate may differ by (the module docstring)


def _rows(boxes, scores, labels) -> np.ndarray:
    """Candidates as (x1, y1, x2, y2, score, label) rows in a canonical order: by box, then label."""
    table = np.concatenate(
        [np.asarray(boxes, np.float32), np.asarray(scores, np.float32)[:, None], np.asarray(labels, np.float32)[:, None]], axis=1
    )
    return table[np.lexsort(table[:, [5, 3, 2, 1, 0]].T)]


def _assert_same_rows(found: np.ndarray, expected: np.ndarray, message: str = "") -> None:
    """The same set of candidates: labels exact, boxes within BOX_ATOL, scores within SCORE_ULPS."""
    assert found.shape == expected.shape, message
    np.testing.assert_array_equal(found[:, 5], expected[:, 5], err_msg=message)
    np.testing.assert_allclose(found[:, :4], expected[:, :4], rtol=0, atol=BOX_ATOL, err_msg=message)
    np.testing.assert_array_max_ulp(found[:, 4], expected[:, 4], maxulp=SCORE_ULPS)


def _assert_same_detections(result: dict, z, prefix: str) -> None:
    """The documented order, labels exact, boxes within BOX_ATOL, scores within SCORE_ULPS."""
    np.testing.assert_allclose(result["boxes"].numpy(), z[f"{prefix}_boxes"], rtol=0, atol=BOX_ATOL)
    np.testing.assert_array_max_ulp(result["scores"].numpy(), z[f"{prefix}_scores"], maxulp=SCORE_ULPS)
    np.testing.assert_array_equal(result["labels"].numpy(), z[f"{prefix}_labels"])


def test_per_level_candidates_equal_reference_sets(run, anchors):
    regression, centerness, logits = _head(run)
    processor = ATSSPostProcessor()
    for level in range(5):
        (found,) = processor.select_level(
            regression[level], centerness[level], logits[level], anchors[level], [IMAGE_SIZE], [REFERENCE_TOKENS]
        )
        assert found["labels"].dtype == torch.int64
        expected = _rows(*(run[f"prenms_level{level}_{key}"] for key in ("boxes", "scores", "labels")))
        _assert_same_rows(_rows(found["boxes"], found["scores"], found["labels"]), expected, f"level {level}")
        assert len(expected) == min(1000, len(expected))  # clamped to pre_nms_top_n


def test_final_detections_gpu_semantics(run, anchors):
    regression, centerness, logits = _head(run)
    processor = ATSSPostProcessor(nms_mode="gpu")
    (result,) = processor(regression, centerness, logits, anchors, [IMAGE_SIZE], [REFERENCE_TOKENS])
    _assert_same_detections(result, run, "final")


def test_final_detections_official_cpu_branch(run, anchors):
    regression, centerness, logits = _head(run)
    processor = ATSSPostProcessor(nms_mode="cpu")
    (result,) = processor(regression, centerness, logits, anchors, [IMAGE_SIZE], [REFERENCE_TOKENS])
    _assert_same_detections(result, run, "final_cpu_nms")


def test_nms_stage_alone_from_stored_candidates(run):
    candidates = {key: torch.from_numpy(run[f"prenms_all_{key}"]) for key in ("boxes", "scores", "labels")}
    _assert_same_detections(ATSSPostProcessor(nms_mode="gpu").select_over_all_levels(candidates), run, "final")
    _assert_same_detections(ATSSPostProcessor(nms_mode="cpu").select_over_all_levels(candidates), run, "final_cpu_nms")


def test_logits_padded_to_256_tokens_give_the_same_result(run, anchors):
    regression, centerness, logits = _head(run, pad_tokens_to=256)
    (result,) = ATSSPostProcessor()(regression, centerness, logits, anchors, [IMAGE_SIZE], [REFERENCE_TOKENS])
    _assert_same_detections(result, run, "final")


def test_batch_of_two_images_with_their_own_sizes_and_maps(reference_dir, anchors):
    runs = [np.load(reference_dir / f"glip_{name}_reference.npz") for name in RUNS]
    heads = [_head(z) for z in runs]
    batched = [[torch.cat([h[part][level] for h in heads]) for level in range(5)] for part in range(3)]
    processor = ATSSPostProcessor()
    results = processor(*batched, anchors, [IMAGE_SIZE, IMAGE_SIZE], [REFERENCE_TOKENS, REFERENCE_TOKENS])
    for result, z in zip(results, runs):
        _assert_same_detections(result, z, "final")
    # The second image as a smaller (un-padded 400x600) image: boxes clip to its own frame.
    small = processor(*batched, anchors, [IMAGE_SIZE, (400, 600)], [REFERENCE_TOKENS, REFERENCE_TOKENS])
    _assert_same_detections(small[0], runs[0], "final")
    assert small[1]["boxes"][:, 2].max() <= 599 and small[1]["boxes"][:, 3].max() <= 399
    assert small[1]["boxes"].min() >= 0


def test_more_than_80_labels(run, anchors):
    regression, centerness, logits = _head(run)
    shifted = {label + 100: tokens for label, tokens in REFERENCE_TOKENS.items()}
    (result,) = ATSSPostProcessor()(regression, centerness, logits, anchors, [IMAGE_SIZE], [shifted], num_classes=200)
    # same candidate order (classes keep their relative order), labels moved by 100
    np.testing.assert_allclose(result["boxes"].numpy(), run["final_boxes"], rtol=0, atol=BOX_ATOL)
    np.testing.assert_array_equal(result["labels"].numpy(), run["final_labels"] + 100)
    with pytest.raises(ValueError, match="raise num_classes"):
        ATSSPostProcessor()(regression, centerness, logits, anchors, [IMAGE_SIZE], [shifted])


def test_labels_without_tokens_never_score(run, anchors):
    regression, centerness, logits = _head(run)
    with_empty = {**REFERENCE_TOKENS, 4: [], 7: []}
    (result,) = ATSSPostProcessor()(regression, centerness, logits, anchors, [IMAGE_SIZE], [with_empty])
    _assert_same_detections(result, run, "final")
    nothing = ATSSPostProcessor()(regression, centerness, logits, anchors, [IMAGE_SIZE], [{1: []}])[0]
    assert nothing["boxes"].shape == (0, 4) and nothing["scores"].shape == (0,) and nothing["labels"].shape == (0,)


def test_mean_aggregation_is_a_mean_of_probabilities():
    probs = torch.tensor([[0.2, 0.4, 0.9, 0.1], [0.6, 0.0, 0.3, 0.5]])
    scores = aggregate_token_probs(probs, {1: [1, 2], 3: [0], 2: [0, 1, 3]}, num_classes=5)
    expected = torch.tensor([[0.65, 0.7 / 3, 0.2, 0.0, 0.0], [0.15, 1.1 / 3, 0.6, 0.0, 0.0]])
    torch.testing.assert_close(scores, expected)
    maxed = aggregate_token_probs(probs, {1: [1, 2]}, num_classes=2, score_agg="MAX")
    torch.testing.assert_close(maxed, torch.tensor([[0.9, 0.0], [0.3, 0.0]]))
    with pytest.raises(ValueError, match="outside the 4 logit columns"):
        aggregate_token_probs(probs, {1: [4]})
    with pytest.raises(ValueError, match="score_agg"):
        ATSSPostProcessor(score_agg="POWER")
    with pytest.raises(ValueError, match="nms_mode"):
        ATSSPostProcessor(nms_mode="fast")


def _sequential_legacy_nms(boxes, scores, labels, threshold):
    """Direct transcription of the kernel's greedy loop, one box at a time."""
    order = torch.sort(scores, descending=True, stable=True).indices.tolist()
    iou = legacy_pairwise_iou(boxes, boxes)
    removed = set()
    kept = []
    for position, i in enumerate(order):
        if i in removed:
            continue
        kept.append(i)
        for j in order[position + 1 :]:
            if labels[i] == labels[j] and iou[i, j] > threshold:
                removed.add(j)
    return sorted(kept)


def _random_boxes(count: int, seed: int, num_labels: int = 3):
    generator = torch.Generator().manual_seed(seed)
    xy = torch.rand(count, 2, generator=generator) * 200
    wh = torch.rand(count, 2, generator=generator) * 80 + 1
    scores = torch.rand(count, generator=generator)
    labels = torch.randint(1, num_labels + 1, (count,), generator=generator)
    return torch.cat([xy, xy + wh], dim=1), scores, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_legacy_nms_equals_the_sequential_greedy_loop(seed):
    boxes, scores, labels = _random_boxes(400, seed)
    for threshold in (0.3, 0.6):
        assert ml_nms_legacy(boxes, scores, labels, threshold).tolist() == _sequential_legacy_nms(
            boxes, scores, labels, threshold
        )


def test_legacy_iou_uses_plus_one_widths():
    a = torch.tensor([[0.0, 0.0, 9.0, 9.0]])  # 10 x 10 pixels
    b = torch.tensor([[5.0, 0.0, 14.0, 9.0]])  # overlaps 5 columns
    assert legacy_pairwise_iou(a, b).item() == pytest.approx(50 / 150)
    # touching boxes share a pixel column under "+1"
    c = torch.tensor([[9.0, 0.0, 18.0, 9.0]])
    assert legacy_pairwise_iou(a, c).item() == pytest.approx(10 / 190)


def test_greedy_keep_handles_chains():
    # 0 suppresses 1, 1 would suppress 2: 1 is removed, so 2 survives; 3 is suppressed by 2
    suppresses = torch.zeros(4, 4, dtype=torch.bool)
    suppresses[0, 1] = suppresses[1, 2] = suppresses[2, 3] = True
    assert greedy_keep(suppresses).tolist() == [True, False, True, False]
    assert greedy_keep(torch.zeros(0, 0, dtype=torch.bool)).tolist() == []


def test_per_label_nms_equals_torchvision_batched_nms_as_sets():
    boxes, scores, labels = _random_boxes(500, 7)
    ours = ml_nms_per_label(boxes, scores, labels, 0.5)
    theirs = batched_nms(boxes, scores, labels, 0.5)
    assert sorted(ours.tolist()) == sorted(theirs.tolist())
    # grouped by ascending label, each group by descending score
    assert labels[ours].tolist() == sorted(labels[ours].tolist())
    # the official CPU branch returns each kept box's position within its label instead (its
    # indexing bug): the same selection, not mapped back to indices of the whole list
    position_in_label = torch.empty_like(labels)
    for label in torch.unique(labels):
        members = torch.nonzero(labels == label).view(-1)
        position_in_label[members] = torch.arange(members.numel())
    assert ml_nms_official_cpu(boxes, scores, labels, 0.5).tolist() == position_in_label[ours].tolist()


def test_detections_cap_keeps_ties_at_the_cut():
    processor = ATSSPostProcessor(detections_per_img=3, nms_thresh=0.6)
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20, 0, 30, 10], [40, 0, 50, 10], [60, 0, 70, 10], [80, 0, 90, 10]])
    scores = torch.tensor([0.9, 0.5, 0.7, 0.5, 0.1])
    labels = torch.ones(5, dtype=torch.int64)
    result = processor.select_over_all_levels({"boxes": boxes, "scores": scores, "labels": labels})
    assert result["scores"].tolist() == pytest.approx([0.9, 0.5, 0.7, 0.5])  # 4 > 3 kept: tie at 0.5
    assert torch.equal(result["boxes"], boxes[:4])


def test_rescale_boxes_to_original_pixels():
    boxes = torch.tensor([[10.0, 20.0, 110.0, 220.0]])
    np.testing.assert_allclose(rescale_boxes(boxes, (800, 1066), (480, 640)).numpy(),
                               [[10 * 640 / 1066, 20 * 0.6, 110 * 640 / 1066, 220 * 0.6]], rtol=1e-6)
    np.testing.assert_allclose(rescale_boxes(boxes, (400, 400), (800, 800)).numpy(), boxes.numpy() * 2)


def _one_level(probs: torch.Tensor, centerness_logits: torch.Tensor):
    """A 2x3 level from per-anchor token probabilities [6, L] and centerness logits [6]."""
    logits = torch.logit(probs.double()).float()[None]  # [1, 6, L]
    regression = torch.zeros(1, 4, 2, 3)
    centerness = centerness_logits.reshape(1, 1, 2, 3)
    anchors = AnchorGenerator()([(2, 3)] * 5)[0]
    return regression, centerness, logits, anchors


def test_threshold_is_applied_before_centerness():
    probs = torch.full((6, 3), 0.01)
    probs[4, 0] = 0.08  # above 0.05 alone, 0.04 after centerness 0.5
    regression, centerness, logits, anchors = _one_level(probs, torch.zeros(6))
    label_map = {1: [0], 2: [1, 2]}
    (found,) = ATSSPostProcessor().select_level(regression, centerness, logits, anchors, [(64, 96)], [label_map])
    assert found["labels"].tolist() == [1]
    assert found["scores"].tolist() == pytest.approx([0.2], rel=1e-5)  # sqrt(0.08 * 0.5)
    # zero deltas decode to anchor 4 = (x 1, y 1): [-20, -20, 43, 43], clipped at 0
    np.testing.assert_array_equal(found["boxes"].numpy(), [[0.0, 0.0, 43.0, 43.0]])


def test_candidate_count_is_clamped_to_pre_nms_top_n_by_centerness_weighted_score():
    probs = torch.full((6, 2), 0.5)
    centerness_logits = torch.tensor([0.0, 3.0, -1.0, 2.0, 1.0, -2.0])
    regression, centerness, logits, anchors = _one_level(probs, centerness_logits)
    processor = ATSSPostProcessor(pre_nms_top_n=2)
    (found,) = processor.select_level(regression, centerness, logits, anchors, [(64, 96)], [{1: [0, 1]}])
    expected = torch.sqrt(0.5 * torch.sigmoid(torch.tensor([3.0, 2.0])))
    assert sorted(found["scores"].tolist(), reverse=True) == pytest.approx(expected.tolist(), rel=1e-6)
    # the two chosen anchors are 1 and 3: boxes are the anchors, clipped to the 64x96 input
    clipped = anchors[[1, 3]].clamp(min=0)
    clipped[:, [0, 2]] = clipped[:, [0, 2]].clamp(max=95)
    clipped[:, [1, 3]] = clipped[:, [1, 3]].clamp(max=63)
    _assert_same_rows(_rows(found["boxes"], found["scores"], found["labels"]), _rows(clipped, expected, [1, 1]))
