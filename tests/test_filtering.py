"""Filter presets and knobs on hand-made detections: the documented results, box by box."""

from __future__ import annotations

import pytest

from pipeline.io.labels_io import Box
from pipeline.stages.filtering import PRESETS, FilterPolicy, apply_policy, get_preset

W, H = 200, 100
DOG_A = Box((10, 10, 60, 60), 0.9, 0)  # phrase 0 "a dog"
DOG_B = Box((12, 12, 62, 62), 0.7, 0)  # overlaps DOG_A (IoU ~0.85), same phrase
BALL = Box((11, 11, 61, 61), 0.8, 1)  # phrase 1 "a ball", on the dog: overlaps across phrases
FAR = Box((150, 20, 190, 90), 0.55, 1)
WEAK = Box((100, 10, 140, 50), 0.2, 0)
TINY = Box((5, 5, 7, 7), 0.95, 1)  # 2 px: below a 5% side
DETECTIONS = [WEAK, DOG_B, FAR, DOG_A, BALL, TINY]


def test_glip_keeps_above_half_without_nms_and_best_box_when_empty():
    assert apply_policy(DETECTIONS, W, H, PRESETS["glip"]) == [TINY, DOG_A, BALL, DOG_B, FAR]
    # Nothing above 0.5: GLIP still keeps the image with its single best box.
    assert apply_policy([WEAK, Box((0, 0, 9, 9), 0.1, 0)], W, H, PRESETS["glip"]) == [WEAK]
    assert apply_policy([], W, H, PRESETS["glip"]) is None


def test_grit_nms_across_phrases_and_drops_empty_images():
    # 0.65 removes FAR and WEAK; NMS 0.5 across phrases keeps the best of DOG_A/BALL/DOG_B.
    assert apply_policy(DETECTIONS, W, H, PRESETS["grit"]) == [TINY, DOG_A]
    assert apply_policy([FAR, WEAK], W, H, PRESETS["grit"]) is None


def test_owlst_keeps_low_boxes_only_when_the_image_has_a_confident_one():
    assert apply_policy(DETECTIONS, W, H, PRESETS["owlst"]) == [TINY, DOG_A, BALL, DOG_B, FAR, WEAK]
    assert apply_policy([WEAK, Box((0, 0, 50, 50), 0.25, 1)], W, H, PRESETS["owlst"]) is None


def test_knobs_nms_per_phrase_top_k_and_box_size():
    per_phrase = FilterPolicy(min_score=0.5, nms_iou=0.5, nms_scope="phrase")
    assert apply_policy(DETECTIONS, W, H, per_phrase) == [TINY, DOG_A, BALL, FAR]  # DOG_B suppressed by DOG_A only
    top1 = FilterPolicy(min_score=0.0, top_k_per_phrase=1)
    assert apply_policy(DETECTIONS, W, H, top1) == [TINY, DOG_A]
    sized = FilterPolicy(min_score=0.0, min_box_frac=0.05, max_box_frac=0.12)
    # TINY is below 5% of a side; the dog/ball boxes (12.5% of the image's 20,000 px^2) and
    # FAR (14%) are above 12%; WEAK (8%) stays.
    assert apply_policy(DETECTIONS, W, H, sized) == [WEAK]
    keep_empty = FilterPolicy(min_score=0.99, drop_empty=False)
    assert apply_policy(DETECTIONS, W, H, keep_empty) == []


def test_presets_and_overrides_are_validated():
    with pytest.raises(ValueError, match="unknown filter preset"):
        get_preset("nope")
    with pytest.raises(ValueError, match="nms_scope"):
        FilterPolicy(nms_scope="image")
    custom = get_preset("grit").with_overrides(min_score=0.3, nms_iou=None)
    assert custom.name == "grit+custom" and custom.min_score == 0.3 and custom.nms_iou == 0.5


def test_caption_assignment_gives_the_left_over_object_to_the_unknown_phrase():
    # "a red square beside a green hexagon": the teacher knows squares, not the word hexagon, so
    # both objects score best on "a red square". Assigned jointly, the hexagon gets the phrase left.
    from pipeline.stages.filtering import FilterPolicy, apply_policy, phrase_count

    square, hexagon = (10.0, 10.0, 50.0, 50.0), (70.0, 10.0, 110.0, 50.0)
    boxes = [Box(square, 0.9, 0), Box(square, 0.3, 1), Box(hexagon, 0.7, 0), Box((71.0, 11.0, 110.0, 50.0), 0.35, 1)]
    phrases = ["a red square", "a green hexagon"]
    plain = apply_policy(boxes, 120, 60, FilterPolicy(min_score=0.5))
    assert [(b.bbox, b.phrase) for b in plain] == [(square, 0), (hexagon, 0)]  # both called a red square
    assigned = apply_policy(boxes, 120, 60, FilterPolicy(min_score=0.5, assign="caption"), phrases=phrases)
    assert [(b.bbox, b.phrase, b.score) for b in assigned] == [(square, 0, 0.9), ((71.0, 11.0, 110.0, 50.0), 1, 0.35)]
    # A count word lets one phrase take several objects.
    assert phrase_count("two blue rings") == 2 and phrase_count("3 dogs") == 3 and phrase_count("a dog") == 1
    both = apply_policy(boxes, 120, 60, FilterPolicy(min_score=0.5, assign="caption"), phrases=["two red squares", "a green hexagon"])
    assert sorted((b.bbox, b.phrase) for b in both) == [(square, 0), (hexagon, 0)]
