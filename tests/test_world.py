"""The demo world: deterministic, boxes tight and inside, spans naming their objects, files the
real readers accept (pycocotools, WebDataset tars, the training sources)."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools.coco import COCO

from pipeline.demo.world import BASE_KINDS, COLOURS, COPY_KINDS, KINDS, SIZES, TAIL_KINDS, write_world
from pipeline.io.shards import iter_webdataset_samples


def _digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


def test_same_seed_same_bytes_other_seed_other_world(tmp_path):
    a, b, c = (write_world(tmp_path / name, "small", seed) for name, seed in (("a", 1), ("b", 1), ("c", 2)))
    assert _digest(a.root) == _digest(b.root) != _digest(c.root)


def test_splits_load_and_boxes_are_tight_and_inside(tmp_path):
    paths = write_world(tmp_path / "w", "small", 0)
    spec = SIZES["small"]
    splits = ((paths.gold_coco, paths.gold_images, spec.gold, BASE_KINDS), (paths.test_coco, paths.test_images, spec.test, KINDS))
    for annotations, folder, count, kinds in splits:
        coco = COCO(str(annotations))
        assert len(coco.getImgIds()) == count and [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(kinds)
        for info in coco.loadImgs(coco.getImgIds()):
            pixels = np.asarray(Image.open(folder / info["file_name"]).convert("RGB")).astype(int)
            assert pixels.shape[:2] == (info["height"], info["width"])
            anns = coco.loadAnns(coco.getAnnIds(imgIds=info["id"]))
            assert anns
            for ann in anns:
                x, y, w, h = ann["bbox"]
                assert 0 <= x and 0 <= y and x + w <= info["width"] and y + h <= info["height"] and w >= 8 and h >= 8
    web_gold = COCO(str(paths.web_gold))
    keys = []
    for shard in sorted(paths.web_shards.glob("*.tar")):
        for sample in iter_webdataset_samples(str(shard)):
            keys.append(sample["__key__"])
            meta = json.loads(sample["json"])
            assert meta["caption"] == sample["txt"].decode() and Image.open(io.BytesIO(sample["jpg"])).size == (meta["width"], meta["height"])
    copies = {c["key"] for c in json.loads(paths.web_test_copies.read_text())["copies"]}
    assert len(copies) == spec.test_copies and copies <= set(keys) and len(keys) == len(set(keys)) == spec.web + spec.test_copies
    originals = [k for k in keys if k not in copies]
    assert len(originals) == spec.web == len(web_gold.getImgIds()) and {int(k) for k in originals} == set(web_gold.getImgIds())


def test_grounding_spans_name_their_objects(tmp_path):
    paths = write_world(tmp_path / "w", "small", 3)
    grounding = json.loads(paths.gold_grounding.read_text())
    captions = {image["id"]: image["caption"] for image in grounding["images"]}
    assert len(set(captions.values())) > len(captions) // 2  # varied templates
    for ann in grounding["annotations"]:
        [(start, end)] = ann["tokens_positive"]
        phrase = captions[ann["image_id"]][start:end]
        assert phrase == ann["phrase"]
        kind = KINDS[ann["category_id"] - 1]
        assert kind in phrase  # "two blue rings" names rings, "a small red star" a star
        assert any(colour in phrase for colour in COLOURS)


def test_gold_is_narrow_and_web_and_test_are_broad(tmp_path):
    # The GLIP setting in miniature: gold boxes and captions only know the base kinds; the
    # web captions and the test split hold every kind, the tail kinds included.
    paths = write_world(tmp_path / "w", "small", 4)
    gold = json.loads(paths.gold_coco.read_text())
    grounding = json.loads(paths.gold_grounding.read_text())
    assert {KINDS[a["category_id"] - 1] for a in gold["annotations"]} <= set(BASE_KINDS)
    assert not any(kind in image["caption"] for image in grounding["images"] for kind in TAIL_KINDS)
    web_gold = json.loads(paths.web_gold.read_text())
    assert {KINDS[a["category_id"] - 1] for a in web_gold["annotations"]} & set(TAIL_KINDS)
    captions = [sample["txt"].decode() for shard in sorted(paths.web_shards.glob("*.tar")) for sample in iter_webdataset_samples(str(shard))]
    assert any(kind in caption for caption in captions for kind in TAIL_KINDS)
    test = json.loads(paths.test_coco.read_text())
    assert [c["name"] for c in test["categories"]] == list(KINDS)
    assert SIZES["default"].web >= 3 * SIZES["default"].gold


def test_web_copies_of_test_images_leave_everything_else_unchanged(tmp_path):
    # The copies come from their own random stream: without them the same seed gives the same
    # gold, test and web images byte for byte.
    with_copies = write_world(tmp_path / "with", "small", 5)
    without = write_world(tmp_path / "without", "small", 5, test_copies=0)
    for split in ("gold", "test"):
        assert _digest(with_copies.root / split) == _digest(without.root / split)
    assert with_copies.web_gold.read_bytes() == without.web_gold.read_bytes()
    listing = json.loads(with_copies.web_test_copies.read_text())["copies"]
    assert json.loads(without.web_test_copies.read_text())["copies"] == []
    assert sorted(c["kind"] for c in listing) == sorted(COPY_KINDS)  # small: one copy of each kind
    copies = {c["key"]: c for c in listing}
    for shard in sorted(with_copies.web_shards.glob("*.tar")):
        plain = {s["__key__"]: s for s in iter_webdataset_samples(str(without.web_shards / shard.name))}
        for sample in iter_webdataset_samples(str(shard)):
            key = sample["__key__"]
            if key not in copies:
                assert {k: sample[k] for k in ("jpg", "txt", "json")} == {k: plain[key][k] for k in ("jpg", "txt", "json")}
                continue
            copy = copies[key]
            assert copy["shard"] == shard.stem
            test = np.asarray(Image.open(with_copies.test_images / copy["test_image"]).convert("RGB")).astype(int)
            web = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB")).astype(int)
            if copy["kind"] == "flip":
                assert np.abs(web[:, ::-1] - test).mean() < 8  # the mirror image, JPEG noise aside
            elif copy["kind"] == "recompress":
                assert web.shape == test.shape and 0 < np.abs(web - test).mean() < 12
            elif copy["kind"] == "crop":
                assert (web.shape[0], web.shape[1]) == (round(0.9 * test.shape[0]), round(0.9 * test.shape[1]))
            else:
                assert web.shape[:2] != test.shape[:2] and abs(web.shape[1] / web.shape[0] - test.shape[1] / test.shape[0]) < 0.05
