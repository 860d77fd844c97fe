"""`pipeline export` writes labels another trainer can load, with the images they name."""

from __future__ import annotations

import json
import os.path as osp
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.io.labels_io import iter_pseudo_samples
from tests.pseudo_fixtures import write_pseudo_shards


@pytest.fixture(scope="module")
def pseudo_dir(shared_data, tmp_path_factory) -> Path:
    coco = json.loads((shared_data / "coco_mini" / "annotations" / "instances_train2017_subset.json").read_text())
    root = tmp_path_factory.mktemp("labelled")
    write_pseudo_shards(root / "pseudo", shared_data, coco, shards=2, per_shard=3)
    return root


def _tar_images(pseudo_dir: Path) -> dict[str, bytes]:
    return {key: data for tar in sorted((pseudo_dir / "pseudo").glob("*.tar")) for key, _, data, _ in iter_pseudo_samples(str(tar))}


def test_odvg_export_loads_the_way_mmdetection_reads_it(pseudo_dir, tmp_path) -> None:
    out = tmp_path / "export" / "labels.jsonl"
    result = CliRunner().invoke(app, ["export", str(pseudo_dir), "--format", "odvg", "--out", str(out)])
    assert result.exit_code == 0, result.output
    tar_images = _tar_images(pseudo_dir)
    # MMDetection's ODVGDataset (VG mode): img_path = join(data_prefix['img'], filename) under
    # data_root, then height, width and grounding {caption, regions: bbox, phrase, tokens_positive}.
    data_root, img_prefix = str(out.parent), ""
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == len(tar_images) == 6
    for data in lines:
        img_path = osp.join(data_root, img_prefix, data["filename"])
        with Image.open(img_path) as image:
            assert image.size == (data["width"], data["height"])
        key = Path(data["filename"]).stem
        assert data["filename"] == f"labels_images/{key}.jpg" and Path(img_path).read_bytes() == tar_images[key]
        caption = data["grounding"]["caption"]
        for region in data["grounding"]["regions"]:
            x1, y1, x2, y2 = region["bbox"]
            assert 0 <= x1 < x2 <= data["width"] and 0 <= y1 < y2 <= data["height"]
            (start, end), = region["tokens_positive"]
            assert caption[start:end] == region["phrase"]


def test_coco_export_loads_with_pycocotools_and_every_image_opens(pseudo_dir, tmp_path) -> None:
    from pycocotools.coco import COCO

    out, images_out = tmp_path / "coco" / "labels.json", tmp_path / "elsewhere" / "imgs"
    result = CliRunner().invoke(app, ["export", str(pseudo_dir), "--format", "coco", "--out", str(out), "--images-out", str(images_out)])
    assert result.exit_code == 0, result.output
    coco = COCO(str(out))
    tar_images = _tar_images(pseudo_dir)
    assert len(coco.getImgIds()) == 6 and coco.getAnnIds()
    for info in coco.loadImgs(coco.getImgIds()):
        path = out.parent / info["file_name"]
        assert path.resolve() == (images_out / f"{info['key']}.jpg").resolve()
        assert path.read_bytes() == tar_images[info["key"]]
        with Image.open(path) as image:
            assert image.size == (info["width"], info["height"])


def test_labels_only(pseudo_dir, tmp_path) -> None:
    out = tmp_path / "labels.jsonl"
    result = CliRunner().invoke(app, ["export", str(pseudo_dir), "--format", "odvg", "--out", str(out), "--no-images"])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "labels_images").exists()
    assert json.loads(out.read_text().splitlines()[0])["filename"].count("/") == 0
