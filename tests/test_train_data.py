"""Student training data: sources, mixing, augmentation with box/text consistency, resume."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.training.augment import augment, flip_boxes, swap_left_right
from model.inputs.text import load_tokenizer
from model.training.train_targets import (
    GroundingExample,
    TrainingSample,
    append_negative_phrases,
    capped_positive_map,
    collate,
    detection_caption,
    xywh_to_xyxy,
)
from pipeline.io.shards import iter_webdataset_samples
from pipeline.train.data.loader import TrainLoader
from pipeline.train.data.mixing import MixedSampleStream
from pipeline.train.data.pseudo_stream import PseudoShardStream, list_pseudo_shards
from pipeline.train.data.sources import CocoDetectionSource, GroundingJsonSource, OdvgSource
from pipeline.train.data.specs import AugmentSettings, PseudoWeighting, SourceSpec, TrainDataError
from tests.pseudo_fixtures import write_pseudo_shards

COCO = "coco_mini/annotations/instances_train2017_subset.json"
IMAGES = "coco_mini/train2017"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def coco(shared_data: Path) -> dict:
    return json.loads((shared_data / COCO).read_text())


def _count(tokenizer):
    return lambda text: len(tokenizer.tokenize(text))


# -- caption flip -------------------------------------------------------------------------


def test_swap_left_right_keeps_spans_on_their_phrases():
    caption = "the man on the left holds a leftover bat. Right hand up, LEFT foot"
    phrases = ["the man on the left", "a leftover bat", "Right hand", "LEFT foot"]
    spans = [[(caption.index(p), caption.index(p) + len(p))] for p in phrases]
    new_caption, new_spans = swap_left_right(caption, spans)
    assert new_caption == "the man on the right holds a leftover bat. Left hand up, RIGHT foot"
    assert [new_caption[s:e] for ((s, e),) in new_spans] == [
        "the man on the right", "a leftover bat", "Left hand", "RIGHT foot",
    ]
    # A span boundary inside a swapped word snaps to the new word's boundary.
    _, inner = swap_left_right("left", [[(1, 3)]])
    assert inner == [[(0, 5)]]
    assert swap_left_right("no sides here", [[(0, 2)]]) == ("no sides here", [[(0, 2)]])


def test_flip_boxes_legacy_convention():
    boxes = torch.tensor([[0.0, 5.0, 9.0, 20.0]])
    # x' = W - x - 1: a 10-pixel box at the left edge of a 100-pixel image ends at the right edge.
    assert flip_boxes(boxes, 100).tolist() == [[90.0, 5.0, 99.0, 20.0]]
    assert flip_boxes(flip_boxes(boxes, 100), 100).tolist() == boxes.tolist()


def test_augment_moves_boxes_with_pixels_and_caption_with_flip():
    # A white box on the left third of a black image; the caption says "left".
    image = Image.new("RGB", (300, 200))
    image.paste((255, 255, 255), (20, 50, 80, 150))
    caption = "a white square on the left"
    example = GroundingExample(image=image, caption=caption, boxes=torch.tensor([[20.0, 50.0, 79.0, 149.0]]), spans=[[(0, 26)]])
    flipped = augment(example, np.random.default_rng(0), min_sizes=(100,), max_size=1000, flip_probability=1.0)
    assert tuple(flipped.image.shape) == (3, 100, 150)  # short side 100, long 150
    assert flipped.caption == "a white square on the right"
    assert flipped.caption[slice(*flipped.spans[0][0])] == "a white square on the right"
    x0, y0, x1, y1 = flipped.boxes[0].tolist()
    # Scaled by 0.5 then flipped in a 150-wide frame: [150 - 39.5 - 1, 25, 150 - 10 - 1, 74.5].
    assert (x0, y0, x1, y1) == pytest.approx((109.5, 25.0, 139.0, 74.5))
    # The bright pixels are where the box says (BGR-normalised: white is the maximum value).
    bright = flipped.image[0] > flipped.image[0].mean()
    ys, xs = torch.nonzero(bright, as_tuple=True)
    assert xs.min() >= x0 - 1 and xs.max() <= x1 + 1 and ys.min() >= y0 - 1 and ys.max() <= y1 + 1
    kept = augment(example, np.random.default_rng(0), min_sizes=(100,), max_size=1000, flip_probability=0.0)
    assert kept.caption == caption and kept.boxes[0].tolist() == pytest.approx([10.0, 25.0, 39.5, 74.5])


def test_augment_clips_and_drops_boxes_outside_the_image():
    example = GroundingExample(
        image=Image.new("RGB", (100, 100)),
        caption="a b",
        boxes=torch.tensor([[-10.0, 10.0, 50.0, 200.0], [120.0, 0.0, 130.0, 10.0]]),
        spans=[[(0, 1)], [(2, 3)]],
    )
    out = augment(example, np.random.default_rng(1), min_sizes=(100,), max_size=100, flip_probability=0.0)
    assert out.boxes.tolist() == [[0.0, 10.0, 50.0, 99.0]] and out.spans == [[(0, 1)]]


def _coco_example(shared_data: Path, coco: dict, index: int = 0) -> GroundingExample:
    """A real COCO image with its boxes, each grounded to its class name in one caption."""
    info = sorted(coco["images"], key=lambda i: i["id"])[index]
    anns = [a for a in coco["annotations"] if a["image_id"] == info["id"]][:6]
    names = {c["id"]: c["name"] for c in coco["categories"]}
    caption, spans = "", []
    for ann in anns:
        caption += ", " if caption else ""
        spans.append([(len(caption), len(caption) + len(names[ann["category_id"]]))])
        caption += names[ann["category_id"]]
    boxes = xywh_to_xyxy(torch.tensor([a["bbox"] for a in anns], dtype=torch.float32))
    image = Image.open(shared_data / IMAGES / info["file_name"]).convert("RGB")
    return GroundingExample(image=image, caption=caption, boxes=boxes, spans=spans, key=str(info["id"]),
                            weights=torch.linspace(0.3, 0.9, len(anns)), background_weight=0.5)


def test_strong_augment_keeps_every_box_whole_and_every_span_on_its_phrase(shared_data, coco):
    example = _coco_example(shared_data, coco)
    sizes = (example.boxes[:, 2:] - example.boxes[:, :2]).clone()
    phrases = [example.caption[s:e] for ((s, e),) in example.spans]
    cropped_any = False
    for seed in range(12):
        out = augment(example, np.random.default_rng(seed), min_sizes=(200,), max_size=400, flip_probability=0.0,
                      crop_probability=1.0, cutout_probability=1.0, scale_jitter=0.25)
        # Every box survives the crop, whole (the same size after undoing the resize), inside the image.
        _, height, width = out.image.shape
        assert out.boxes.shape == example.boxes.shape and out.weights.tolist() == example.weights.tolist()
        # (a box on the edge may pass size - 1 by under a pixel: BoxList.resize scales the "+1" extent)
        assert bool((out.boxes[:, :2] >= 0).all()) and bool((out.boxes[:, 2] <= width).all())
        assert bool((out.boxes[:, 3] <= height).all())
        scale = (out.boxes[:, 2:] - out.boxes[:, :2]) / sizes
        assert scale.std(0).max() < 1e-3  # one scale per axis: no box was clipped
        cropped_any |= abs(float(scale[0, 0]) * example.image.width - width) > 2
        # The caption and spans are unchanged: each span still reads its phrase.
        assert out.caption == example.caption and [out.caption[s:e] for ((s, e),) in out.spans] == phrases
        # Cutout zeroed at most half of any box.
        for x0, y0, x1, y1 in out.boxes.round().int().tolist():
            region = out.image[:, y0 : y1 + 1, x0 : x1 + 1]
            assert float((region == 0).all(0).float().mean()) <= 0.5 + 0.05
        assert float((out.image == 0).all(0).float().mean()) > 0  # some patch was cut out
    assert cropped_any


def test_augment_without_strong_options_draws_as_the_weak_transform(shared_data, coco):
    example = _coco_example(shared_data, coco, 1)
    weak = augment(example, np.random.default_rng(3), min_sizes=(160, 200), max_size=400)
    same = augment(example, np.random.default_rng(3), min_sizes=(160, 200), max_size=400,
                   crop_probability=0.0, cutout_probability=0.0, scale_jitter=0.0)
    assert torch.equal(weak.image, same.image) and torch.equal(weak.boxes, same.boxes) and weak.caption == same.caption


def test_box_weights_follow_their_boxes_into_the_batch(tokenizer):
    example = GroundingExample(
        image=Image.new("RGB", (100, 100)), caption="a cat. a dog. a bird",
        boxes=torch.tensor([[10.0, 10.0, 50.0, 50.0], [120.0, 0.0, 130.0, 10.0], [0.0, 0.0, 20.0, 20.0]]),
        spans=[[(0, 5)], [(7, 12)], [(14, 20)]], weights=torch.tensor([0.3, 0.6, 0.0]), background_weight=0.25,
    )
    sample = augment(example, np.random.default_rng(0), min_sizes=(100,), max_size=100, flip_probability=0.0)
    assert sample.weights.tolist() == pytest.approx([0.3, 0.0])  # the box outside the image left with its weight
    [target] = collate([sample], tokenizer).targets
    assert target["weights"].tolist() == pytest.approx([0.3, 0.0]) and target["background_weight"] == 0.25
    [gold] = collate([TrainingSample(image=sample.image, caption="a cat", boxes=sample.boxes[:1], spans=[[(0, 5)]])], tokenizer).targets
    assert "weights" not in gold and "background_weight" not in gold


# -- prompts ------------------------------------------------------------------------------


def test_detection_caption_puts_every_positive_and_some_negatives(tokenizer, coco):
    vocabulary = [c["name"] for c in coco["categories"]]
    counts = []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        names = ["dog", "person", "dog"]
        caption, spans, keep = detection_caption(names, vocabulary, rng, count_tokens=_count(tokenizer))
        assert keep == [True, True, True]
        assert [caption[s:e] for ((s, e),) in spans] == names
        classes = caption.split(". ")
        assert len(classes) == len(set(classes))  # each class once, negatives exclude positives
        assert {"dog", "person"} <= set(classes)
        counts.append(len(classes) - 2)
        assert len(tokenizer(caption)["input_ids"]) <= 256
    # Half of the time all 78 other classes, otherwise a random number of them.
    assert max(counts) == 78 and min(counts) < 78


def test_detection_caption_respects_token_budget_with_a_large_vocabulary(tokenizer):
    vocabulary = [f"object kind number {i}" for i in range(400)]
    rng = np.random.default_rng(3)
    caption, spans, keep = detection_caption([vocabulary[5]], vocabulary, rng, count_tokens=_count(tokenizer), max_negatives=400)
    assert keep == [True] and caption[slice(*spans[0][0])] == vocabulary[5]
    assert len(tokenizer(caption)["input_ids"]) <= 256


def test_append_negative_phrases_stays_within_budget(tokenizer):
    caption = "a dog on a couch"
    many = [f"a red kite number {i}" for i in range(200)]
    out = append_negative_phrases(caption, many, count_tokens=_count(tokenizer))
    assert out.startswith(caption + ". a red kite number 0. ")
    assert len(tokenizer(out)["input_ids"]) <= 256
    assert append_negative_phrases(caption, [], count_tokens=_count(tokenizer)) == caption


def test_spans_past_the_token_limit_are_dropped(tokenizer):
    caption = "a cat. " + "word " * 300 + "a dog"
    spans = [[(0, 5)], [(len(caption) - 5, len(caption))]]
    positive_map = capped_positive_map(tokenizer, caption, spans, max_query_len=256)
    assert positive_map[0, 1:3].tolist() == [1.0, 1.0] and positive_map[1].sum() == 0
    sample = TrainingSample(image=torch.zeros((3, 64, 64)), caption=caption, boxes=torch.tensor([[1.0, 1, 9, 9], [2.0, 2, 8, 8]]), spans=spans)
    batch = collate([sample], tokenizer)
    assert batch.dropped_boxes == 1
    assert batch.targets[0]["boxes"].tolist() == [[1.0, 1.0, 9.0, 9.0]]
    assert batch.input_ids.shape == (1, 256) and batch.targets[0]["positive_map"].shape == (1, 256)


def test_collate_pads_images_and_prompts(tokenizer):
    samples = [
        TrainingSample(image=torch.ones((3, 40, 70)), caption="a cat", boxes=torch.tensor([[0.0, 0, 9, 9]]), spans=[[(2, 5)]]),
        TrainingSample(image=torch.ones((3, 64, 33)), caption="two dogs on grass", boxes=torch.zeros((0, 4)), spans=[]),
    ]
    batch = collate(samples, tokenizer)
    assert batch.images.shape == (2, 3, 64, 96) and batch.image_sizes == [(40, 70), (64, 33)]
    assert batch.input_ids.shape == (2, 6) and batch.attention_mask[0].tolist() == [1, 1, 1, 1, 0, 0]
    assert batch.targets[0]["positive_map"].tolist() == [[0.0, 0.0, 1.0, 0.0, 0.0, 0.0]]  # "cat" is token 2
    assert batch.targets[1]["boxes"].shape == (0, 4) and batch.targets[1]["positive_map"].shape == (0, 6)


# -- sources ------------------------------------------------------------------------------


def test_coco_source_reads_real_annotations(shared_data, coco):
    source = CocoDetectionSource(annotations=str(shared_data / COCO), images=str(shared_data / IMAGES))
    with_boxes = {a["image_id"] for a in coco["annotations"] if not a["iscrowd"]}
    assert len(source) == len(with_boxes)
    record = next(r for r in source.records if r.key == "249346")
    assert record.box_names == ["bear"] and len(record.vocabulary) == 80
    x, y, w, h = next(a["bbox"] for a in coco["annotations"] if a["image_id"] == 249346)
    assert record.boxes[0].tolist() == pytest.approx([x, y, x + w - 1, y + h - 1])
    assert Path(record.image).is_file()


def test_coco_source_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": []}')
    with pytest.raises(TrainDataError, match="bad.json: not a COCO detection file"):
        CocoDetectionSource(annotations=str(bad), images=str(tmp_path))
    with pytest.raises(TrainDataError, match="missing.json: file not found"):
        CocoDetectionSource(annotations=str(tmp_path / "missing.json"), images=str(tmp_path))


def _grounding_files(tmp_path: Path, coco: dict, image_ids: list[int]):
    """GoldG JSON and ODVG JSONL built from real COCO boxes, captions naming the classes."""
    names = {c["id"]: c["name"] for c in coco["categories"]}
    images = {i["id"]: i for i in coco["images"]}
    gold = {"images": [], "annotations": []}
    odvg_lines = []
    for image_id in image_ids:
        anns = [a for a in coco["annotations"] if a["image_id"] == image_id]
        caption = " and ".join(f"a {names[a['category_id']]} on the left" for a in anns)
        starts = [caption.index(f"a {names[a['category_id']]}") for a in anns]
        gold["images"].append({**images[image_id], "caption": caption})
        regions = []
        for ann, start in zip(anns, starts):
            span = [[start, start + 2 + len(names[ann["category_id"]])]]
            gold["annotations"].append({"id": ann["id"], "image_id": image_id, "bbox": ann["bbox"], "tokens_positive": span, "category_id": 1})
            x, y, w, h = ann["bbox"]
            regions.append({"bbox": [x, y, x + w, y + h], "phrase": caption[span[0][0] : span[0][1]], "tokens_positive": span})
        odvg_lines.append(json.dumps({"filename": images[image_id]["file_name"], "width": images[image_id]["width"], "height": images[image_id]["height"], "grounding": {"caption": caption, "regions": regions}}))
    gold_path = tmp_path / "goldg.json"
    gold_path.write_text(json.dumps(gold))
    odvg_path = tmp_path / "odvg.jsonl"
    odvg_path.write_text("\n".join(odvg_lines) + "\n")
    return gold_path, odvg_path


def test_grounding_and_odvg_sources(tmp_path, shared_data, coco):
    gold_path, odvg_path = _grounding_files(tmp_path, coco, [84533, 37666])
    gold = GroundingJsonSource(annotations=str(gold_path), images=str(shared_data / IMAGES))
    odvg = OdvgSource(annotations=str(odvg_path), images=str(shared_data / IMAGES))
    assert len(gold) == len(odvg) == 2
    for record in (gold.records[0], odvg.records[0]):
        assert [record.caption[s:e] for ((s, e),) in record.spans] == ["a motorcycle", "a person"]
        assert record.phrases() == ["a motorcycle", "a person"]
    # GoldG boxes are xywh (legacy xyxy has -1), ODVG boxes are xyxy as written.
    assert gold.records[0].boxes[0, 2] == pytest.approx(odvg.records[0].boxes[0, 2] - 1)
    detection = tmp_path / "det.jsonl"
    detection.write_text(json.dumps({"filename": "000000000790.jpg", "detection": {"instances": [{"bbox": [1, 2, 30, 40], "label": 3}]}}) + "\n")
    with pytest.raises(TrainDataError, match="det.jsonl: line 1: instance without 'category'"):
        OdvgSource(annotations=str(detection), images=str(shared_data / IMAGES))
    labelled = OdvgSource(annotations=str(detection), images=str(shared_data / IMAGES), label_map={"3": "car", "4": "bus"})
    assert labelled.records[0].box_names == ["car"] and list(labelled.records[0].vocabulary) == ["car", "bus"]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"images": [{"id": 1, "file_name": "x.jpg", "caption": "a cat"}], "annotations": [{"image_id": 1, "bbox": [0, 0, 5, 5], "tokens_positive": [[2, 9]]}]}))
    with pytest.raises(TrainDataError, match=r"broken.json: image 1: span \[2, 9\) is outside the 5-character caption"):
        GroundingJsonSource(annotations=str(broken), images=str(tmp_path))


def test_pseudo_stream_shuffles_across_shards_and_covers_each_epoch(tmp_path, shared_data, coco):
    keys = write_pseudo_shards(tmp_path / "pseudo", shared_data, coco, shards=4, per_shard=5)
    shards = list_pseudo_shards([str(tmp_path / "pseudo")])
    assert len(shards) == 4
    stream = PseudoShardStream(shards=shards, seed=0, open_shards=3)
    first_epoch = [stream.next_record().key for _ in range(20)]
    assert sorted(first_epoch) == sorted(keys)  # every sample once per epoch
    shard_of = [k[:5] for k in first_epoch]
    switches = sum(a != b for a, b in zip(shard_of, shard_of[1:]))
    assert switches >= 8  # interleaved, not shard after shard
    assert first_epoch != sorted(first_epoch)
    second_epoch = [stream.next_record().key for _ in range(20)]
    assert sorted(second_epoch) == sorted(keys) and second_epoch != first_epoch
    record = PseudoShardStream(shards=shards, seed=0).next_record()
    assert record.caption[slice(*record.spans[0][0])].startswith("the ")
    # Two workers split the shards: disjoint samples.
    ranks = [PseudoShardStream(shards=shards, seed=0, rank=r, world_size=2) for r in (0, 1)]
    seen = [{s.next_record().key for _ in range(10)} for s in ranks]
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 20


def test_workers_whose_pseudo_shards_are_empty_widen_their_share(tmp_path, shared_data, coco):
    """A strict filter leaves shards empty: with 4 shards of which only 00000 holds samples,
    every one of 2 (then 3) workers still trains: a worker whose shards are empty takes every
    shard split by position, or every sample when that too gives it none; the share survives
    a resume."""
    write_pseudo_shards(tmp_path / "pseudo", shared_data, coco, shards=4, per_shard=2)
    for shard in range(1, 4):  # keep 00000's two samples only
        with tarfile.open(tmp_path / "pseudo" / f"{shard:05d}.tar", "w"):
            pass
    shards = list_pseudo_shards([str(tmp_path / "pseudo")])
    pair = [PseudoShardStream(shards=shards, seed=0, rank=r, world_size=2) for r in (0, 1)]
    seen = [{stream.next_record().key for _ in range(4)} for stream in pair]
    # Worker 0 keeps its round-robin shards (00000, 00002); worker 1's (00001, 00003) are
    # empty, so it takes every shard split by position: sample 1 of 00000.
    assert seen == [{"000000000", "000000001"}, {"000000001"}]
    assert [stream.count_samples() for stream in pair] == [2, 1]
    third = PseudoShardStream(shards=shards, seed=0, rank=2, world_size=3)  # position 2: nothing
    assert third.count_samples() == 2
    assert {third.next_record().key for _ in range(4)} == {"000000000", "000000001"}
    resumed = PseudoShardStream(shards=shards, seed=0, rank=2, world_size=3)
    resumed.load_state_dict(third.state_dict())
    assert resumed.next_record().key == third.next_record().key
    with tarfile.open(tmp_path / "pseudo" / "00000.tar", "w"):
        pass
    nothing = PseudoShardStream(shards=shards, seed=0, rank=1, world_size=2)
    with pytest.raises(TrainDataError, match="hold no complete sample"):
        nothing.next_record()


def test_truncated_pseudo_shard_is_an_error_naming_the_file_and_the_reason(tmp_path, shared_data, coco):
    """A pseudo tar cut inside its third sample's JSON: the shared reader yields exactly the
    two complete samples before the damage (not the third, whose image alone is whole), then
    raises; training refuses the shard (it never learns from part of one) with one error
    naming the file and what broke, as the stages do."""
    write_pseudo_shards(tmp_path / "p", shared_data, coco, shards=1, per_shard=4)
    path = tmp_path / "p" / "00000.tar"
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    third_json = members[5]  # {key}.jpg, {key}.json per sample
    assert third_json.name == "000000002.json"
    data = path.read_bytes()
    path.write_bytes(data[: third_json.offset_data + third_json.size // 2])

    complete = []
    with pytest.raises(RuntimeError, match="broken or truncated tar"):
        for sample in iter_webdataset_samples(str(path)):
            complete.append(sample["__key__"])
    assert complete == ["000000000", "000000001"]

    stream = PseudoShardStream(shards=[str(path)], seed=0)
    with pytest.raises(TrainDataError) as error:
        stream.next_record()
    assert str(error.value) == (
        f"{path}: broken or truncated tar (ReadError: unexpected end of data): "
        "training reads whole pseudo shards only (write it again with `pipeline filter`, or leave it out)"
    )


def _specs(tmp_path, shared_data, coco):
    write_pseudo_shards(tmp_path / "pseudo", shared_data, coco, shards=3, per_shard=4)
    gold_path, _ = _grounding_files(tmp_path, coco, [84533, 37666, 172123])
    return [
        SourceSpec(kind="pseudo", paths=(str(tmp_path / "pseudo"),), weight=2.0),
        SourceSpec(kind="coco", paths=(str(shared_data / COCO),), images=str(shared_data / IMAGES), weight=1.0),
        SourceSpec(kind="grounding", paths=(str(gold_path),), images=str(shared_data / IMAGES), weight=1.0),
    ]


def test_mixture_ratios_negatives_and_exact_resume(tmp_path, shared_data, coco, tokenizer):
    specs = _specs(tmp_path, shared_data, coco)
    stream = MixedSampleStream(specs=specs, tokenizer=tokenizer, seed=5)
    planned = [stream.next_sample() for _ in range(400)]
    counts = Counter(p.source for p in planned)
    assert counts["pseudo"] / 400 == pytest.approx(0.5, abs=0.07)
    assert counts["coco"] / 400 == pytest.approx(0.25, abs=0.07)
    # Grounding captions got other samples' phrases appended (negatives: no box of their own).
    grounded = [p for p in planned if p.source != "coco"]
    extended = [p for p in grounded if p.caption != p.record.caption]
    assert len(extended) > len(grounded) // 2
    for p in extended:
        assert p.caption.startswith(p.record.caption) and p.spans == p.record.spans
    # COCO samples: spans name the classes of their boxes.
    for p in (p for p in planned if p.source == "coco"):
        assert len(p.spans) == len(p.boxes)
        kept_names = [n for n in p.record.box_names if n in p.caption]
        assert [p.caption[s:e] for ((s, e),) in p.spans] == [n.replace("_", " ") for n in kept_names]

    # Resume: a fresh stream loaded with the state after 150 samples continues identically.
    reference = MixedSampleStream(specs=specs, tokenizer=tokenizer, seed=5)
    for _ in range(150):
        reference.next_sample()
    state = json.loads(json.dumps(reference.state_dict()))  # plain data only
    resumed = MixedSampleStream(specs=specs, tokenizer=tokenizer, seed=5)
    resumed.load_state_dict(state)
    tail = [resumed.next_sample() for _ in range(250)]
    assert [(p.record.key, p.caption, p.augment_seed) for p in tail] == [
        (p.record.key, p.caption, p.augment_seed) for p in planned[150:]
    ]
    # Gold and unweighted pseudo samples carry no loss weights.
    assert all(p.weights is None and p.background_weight is None for p in planned)
    with pytest.raises(TrainDataError, match="cannot resume the data stream"):
        MixedSampleStream(specs=specs[1:], tokenizer=tokenizer, seed=5).load_state_dict(state)


def test_pseudo_weighting_turns_teacher_scores_into_box_weights(tmp_path, shared_data, coco, tokenizer):
    folder = tmp_path / "pseudo"
    write_pseudo_shards(folder, shared_data, coco, shards=1, per_shard=4)  # every region scores 0.9
    spec = SourceSpec(kind="pseudo", paths=(str(folder),))
    scored = MixedSampleStream(specs=[spec], tokenizer=tokenizer, pseudo_weighting=PseudoWeighting(score_weight=True, background_weight=0.5))
    ignored = MixedSampleStream(specs=[spec], tokenizer=tokenizer, pseudo_weighting=PseudoWeighting(ignore_below=0.95))
    for _ in range(4):
        a, b = scored.next_sample(), ignored.next_sample()
        assert a.weights.tolist() == pytest.approx([0.9] * len(a.boxes)) and a.background_weight == 0.5
        assert b.weights.tolist() == [0.0] * len(b.boxes) and b.background_weight == 1.0
    weighting = PseudoWeighting(score_weight=True, ignore_below=0.4)
    assert weighting.box_weights(np.array([0.3, 0.4, 0.8], dtype=np.float32)).tolist() == pytest.approx([0.0, 0.4, 0.8])


def _named_pseudo_shard(folder: Path, shared_data: Path, coco: dict) -> None:
    """One pseudo tar of 3 real COCO images whose captions name their boxes with counts,
    adjectives and plurals; each region has its own teacher score."""
    from bench.sample_shards import add_member

    folder.mkdir(parents=True, exist_ok=True)
    images = sorted(coco["images"], key=lambda i: i["id"])[:3]
    captions = [
        ("two brown dogs beside a small white cat", ["two brown dogs", "two brown dogs", "a small white cat"]),
        ("A red bus with three wooden benches and a stock photo", ["A red bus", "three wooden benches"]),
        ("some glasses on the hammock", ["some glasses", "the hammock"]),
    ]
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for number, (image, (caption, phrases)) in enumerate(zip(images, captions)):
            regions, cursor = [], {}
            for index, phrase in enumerate(phrases):
                start = caption.index(phrase)
                box = [10.0 + 20 * index, 10.0, 60.0 + 20 * index, 70.0]
                regions.append({"bbox": box, "phrase": phrase, "tokens_positive": [[start, start + len(phrase)]],
                                "score": round(0.3 + 0.1 * index + 0.01 * number, 2)})
            sample = {"key": f"k{number}", "width": image["width"], "height": image["height"],
                      "grounding": {"caption": caption, "regions": regions}}
            add_member(tar, f"k{number}.jpg", (shared_data / IMAGES / image["file_name"]).read_bytes())
            add_member(tar, f"k{number}.json", json.dumps(sample).encode())


def test_pseudo_names_prompt_names_each_box_by_its_head_noun(tmp_path, shared_data, coco, tokenizer):
    from nlp.vocabulary import phrase_name

    assert [phrase_name(p) for p in ("two brown dogs", "A small dotted red CROSS", "three crosses", "some berries", "a glass", "42")] == [
        "dog", "cross", "cross", "berry", "glass", ""]
    _named_pseudo_shard(tmp_path / "pseudo", shared_data, coco)
    spec = SourceSpec(kind="pseudo", paths=(str(tmp_path / "pseudo"),))
    weighting = PseudoWeighting(prompt="names", score_weight=True)
    stream = MixedSampleStream(specs=[spec], tokenizer=tokenizer, seed=3, pseudo_weighting=weighting)
    planned = [stream.next_sample() for _ in range(12)]
    seen_negatives = False
    for p in planned:
        regions = {tuple(r["bbox"]): r for r in _regions_of(tmp_path / "pseudo", p.record.key)}
        assert len(p.spans) == len(p.boxes) == len(p.weights)
        for box, spans, weight in zip(p.boxes.tolist(), p.spans, p.weights.tolist()):
            region = regions[tuple(box)]
            [(start, end)] = spans
            # each box keeps its own span (its head noun in the prompt) and its own teacher score
            assert p.caption[start:end] == phrase_name(region["phrase"])
            assert weight == pytest.approx(region["score"])
        names = set(p.caption.split(". "))
        own = {phrase_name(r["phrase"]) for r in regions.values()}
        assert own <= names  # every box's name is in the prompt (a short prompt: none is cut)
        seen_negatives |= bool(names - own)
    assert seen_negatives  # names of other pseudo samples appear as negatives
    # the caption prompt is unchanged by the option's default
    plain = MixedSampleStream(specs=[spec], tokenizer=tokenizer, seed=3).next_sample()
    assert plain.caption.startswith(plain.record.caption)
    # resume: the names pool is part of the state, so a resumed stream continues identically
    reference = MixedSampleStream(specs=[spec], tokenizer=tokenizer, seed=3, pseudo_weighting=weighting)
    for _ in range(5):
        reference.next_sample()
    resumed = MixedSampleStream(specs=[spec], tokenizer=tokenizer, seed=3, pseudo_weighting=weighting)
    resumed.load_state_dict(json.loads(json.dumps(reference.state_dict())))
    assert [resumed.next_sample().caption for _ in range(7)] == [p.caption for p in planned[5:]]
    with pytest.raises(ValueError, match="--pseudo-prompt 'tags'"):
        PseudoWeighting(prompt="tags")


def test_pseudo_boxes_of_names_the_gold_teaches_take_the_known_weight(tmp_path, shared_data, coco, tokenizer):
    """coco_mini's gold names dogs, cats, benches, wine glasses...: a pseudo "two brown dogs" box
    is known (weight 0: ignored), a "the hammock" box is not (in both prompt forms)."""
    _named_pseudo_shard(tmp_path / "pseudo", shared_data, coco)
    gold = SourceSpec(kind="coco", paths=(str(shared_data / COCO),), images=str(shared_data / IMAGES))
    pseudo = SourceSpec(kind="pseudo", paths=(str(tmp_path / "pseudo"),), weight=50.0)
    from nlp.vocabulary import phrase_name

    gold_names = {phrase_name(c["name"]) for c in coco["categories"]}  # "wine glass" -> "glass"
    assert {"dog", "cat", "bench", "glass"} <= gold_names and "hammock" not in gold_names
    seen = set()
    for prompt in ("names", "caption"):
        stream = MixedSampleStream(specs=[gold, pseudo], tokenizer=tokenizer, seed=1,
                                   pseudo_weighting=PseudoWeighting(prompt=prompt, known_weight=0.0))
        assert stream.gold_names == frozenset(gold_names)
        checked = 0
        for _ in range(30):
            p = stream.next_sample()
            if p.source != "pseudo":
                continue
            regions = {tuple(r["bbox"]): r for r in _regions_of(tmp_path / "pseudo", p.record.key)}
            for box, weight in zip(p.boxes.tolist(), p.weights.tolist()):
                name = phrase_name(regions[tuple(box)]["phrase"])
                assert weight == (0.0 if name in gold_names else 1.0), (name, weight)
                seen.add((name, weight))
                checked += 1
        assert checked > 10
    assert ("hammock", 1.0) in seen and ("dog", 0.0) in seen
    # off by default: no gold vocabulary is read and pseudo samples carry no weights
    plain = MixedSampleStream(specs=[gold, pseudo], tokenizer=tokenizer, seed=1, pseudo_weighting=PseudoWeighting(prompt="names"))
    assert plain.gold_names == frozenset() and all(plain.next_sample().weights is None for _ in range(10))
    with pytest.raises(ValueError, match="--pseudo-known-weight"):
        PseudoWeighting(known_weight=1.5)


def _regions_of(folder: Path, key: str) -> list[dict]:
    with tarfile.open(folder / "00000.tar") as tar:
        return json.load(tar.extractfile(f"{key}.json"))["grounding"]["regions"]


def test_paired_batches_keep_the_gold_only_stream_and_add_pseudo_samples(tmp_path, shared_data, coco, tokenizer):
    """`--pseudo-per-step`: each step is the gold batch a gold-only run (the control) draws, the
    same samples, prompts and augmentation seeds, plus pseudo samples from a stream of their own;
    the pair resumes exactly and is refused without gold or without pseudo sources."""
    from pipeline.train.config import DataConfig
    from pipeline.train.data.mixing import PairedSampleStream, make_stream
    from pipeline.train.loop import source_samples

    gold_path, _ = _grounding_files(tmp_path, coco, [84533, 37666, 159269])
    _named_pseudo_shard(tmp_path / "pseudo", shared_data, coco)
    gold = [SourceSpec(kind="coco", paths=(str(shared_data / COCO),), images=str(shared_data / IMAGES)),
            SourceSpec(kind="grounding", paths=(str(gold_path),), images=str(shared_data / IMAGES))]
    pseudo = SourceSpec(kind="pseudo", paths=(str(tmp_path / "pseudo"),), weight=5.0)
    weighting = PseudoWeighting(prompt="names", known_weight=0.0, background_weight=0.0)
    options = dict(tokenizer=tokenizer, seed=4, pseudo_weighting=weighting)
    paired = make_stream(specs=[*gold, pseudo], pseudo_per_step=2, **options)
    control = make_stream(specs=gold, pseudo_per_step=0, **options)
    assert isinstance(paired, PairedSampleStream) and isinstance(control, MixedSampleStream)

    def signature(p):
        return (p.record.key, p.caption, p.spans, p.boxes.tolist(), p.augment_seed, None if p.weights is None else p.weights.tolist())

    batches = [paired.plan_batch(3) for _ in range(6)]
    for batch in batches:
        assert [p.source for p in batch[3:]] == ["pseudo", "pseudo"]
        assert all(p.source != "pseudo" and p.weights is None for p in batch[:3])
        # the gold part is, sample for sample, what the control plans at the same step
        assert [signature(p) for p in batch[:3]] == [signature(p) for p in control.plan_batch(3)]
    drawn = Counter(p.source for batch in batches for p in batch)
    assert drawn["pseudo"] == 12 and drawn["coco"] + drawn["grounding"] == 18
    assert len({p.record.key for b in batches for p in b[:3]}) > 3  # both gold sources, several images
    # the pseudo stream keeps its weighting: coco's "dog" is a known name (weight 0), "hammock" is not
    weights = {(p.caption[s:e], w) for b in batches for p in b[3:] for [(s, e)], w in zip(p.spans, p.weights.tolist())}
    assert ("hammock", 1.0) in weights and ("dog", 0.0) in weights
    assert all(p.background_weight == 0.0 for b in batches for p in b[3:])
    # the pseudo stream draws apart from the gold one: its augmentation seeds are not the gold's
    assert not {p.augment_seed for b in batches for p in b[3:]} & {p.augment_seed for b in batches for p in b[:3]}

    # the worker's state (as a checkpoint stores it) resumes exactly, and counts by kind
    state = json.loads(json.dumps(paired.state_dict()))
    config = DataConfig(sources=(*gold, pseudo), pseudo_per_step=2)
    assert source_samples(type("C", (), {"data": config})(), state) == {f"samples_{k}": v for k, v in drawn.items()}
    resumed = make_stream(specs=[*gold, pseudo], pseudo_per_step=2, **options)
    resumed.load_state_dict(state)
    assert [signature(p) for p in resumed.plan_batch(3)] == [signature(p) for p in paired.plan_batch(3)]
    with pytest.raises(TrainDataError, match="drew 2 paired pseudo samples per step, this run 1"):
        make_stream(specs=[*gold, pseudo], pseudo_per_step=1, **options).load_state_dict(state)

    for specs in (gold, [pseudo]):
        with pytest.raises(TrainDataError, match="--pseudo-per-step adds pseudo samples"):
            make_stream(specs=specs, pseudo_per_step=2, **options)
        with pytest.raises(ValueError, match="--pseudo-per-step adds pseudo samples"):
            DataConfig(sources=tuple(specs), pseudo_per_step=2)
    with pytest.raises(ValueError, match="--pseudo-per-step must be >= 0"):
        DataConfig(sources=(*gold, pseudo), pseudo_per_step=-1)


def test_workers_split_indexable_sources(shared_data, tokenizer):
    spec = [SourceSpec(kind="coco", paths=(str(shared_data / COCO),), images=str(shared_data / IMAGES))]
    streams = [MixedSampleStream(specs=spec, tokenizer=tokenizer, seed=1, rank=r, world_size=2) for r in (0, 1)]
    size = len(streams[0].sources[0])
    seen = [[s.next_sample().record.key for _ in range(size // 2)] for s in streams]
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == 2 * (size // 2)


def test_loader_batches_and_skips_broken_images(tmp_path, shared_data, coco, tokenizer):
    gold_path, _ = _grounding_files(tmp_path, coco, [84533, 37666])
    data = json.loads(gold_path.read_text())
    data["images"].append({**data["images"][0], "id": 1, "file_name": "broken.jpg"})
    (tmp_path / "images").mkdir()
    for image in data["images"][:2]:
        (tmp_path / "images" / image["file_name"]).write_bytes((shared_data / IMAGES / image["file_name"]).read_bytes())
    (tmp_path / "images" / "broken.jpg").write_bytes(b"not a jpeg")
    gold_path.write_text(json.dumps(data))
    spec = [SourceSpec(kind="grounding", paths=(str(gold_path),), images=str(tmp_path / "images"))]
    stream = MixedSampleStream(specs=spec, tokenizer=tokenizer, seed=0)
    loader = TrainLoader(stream=stream, batch_size=3, settings=AugmentSettings(min_sizes=(128, 160), max_size=256))
    batches = []
    for loaded in loader:
        batches.append(loaded)
        if len(batches) == 4:
            break
    skipped = {k: v for b in batches for k, v in b.skipped.items()}
    assert set(skipped) == {"1"} and "cannot be decoded" in skipped["1"]
    for loaded in batches:
        batch = loaded.batch
        assert batch.images.shape[2] % 32 == 0 and max(batch.images.shape[2:]) <= 256
        for target, (h, w) in zip(batch.targets, batch.image_sizes):
            boxes = target["boxes"]
            assert boxes.shape[0] == target["positive_map"].shape[0] >= 1
            assert (boxes[:, 2] <= w - 1).all() and (boxes[:, 3] <= h - 1).all()
    # Loader state = stream position after each batch.
    assert [b.state["position"] for b in batches] == [3, 6, 9, 12]


def test_xywh_to_xyxy_matches_boxlist_convert():
    assert xywh_to_xyxy(torch.tensor([[10.0, 20.0, 5.0, 1.0]])).tolist() == [[10.0, 20.0, 14.0, 20.0]]
