"""`pipeline pack` on real COCO images: stable keys, source bytes unchanged, skips counted,
and shards the stages read."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.io.shards import discover_shards, iter_webdataset_samples, read_caption_records
from pipeline.stages.pack import PackConfig, run_pack
from tests.pseudo_fixtures import COCO_CAPTIONS, COCO_IMAGES, encoded


@pytest.fixture(scope="module")
def image_folder(shared_data, tmp_path_factory) -> Path:
    """6 COCO images (with COCO captions), a truncated JPEG copy and a PNG no caption names."""
    folder = tmp_path_factory.mktemp("own_images") / "photos"
    (folder / "more").mkdir(parents=True)
    sources = sorted((shared_data / COCO_IMAGES).glob("*.jpg"))[:6]
    for index, source in enumerate(sources):
        shutil.copy(source, (folder / "more" if index >= 4 else folder) / source.name)
    truncated = sources[0].read_bytes()
    (folder / f"{int(sources[-1].stem) + 1:012d}.jpg").write_bytes(truncated[: len(truncated) // 3])
    (folder / "zz_no_caption.png").write_bytes(encoded(Image.new("RGB", (64, 48), (200, 10, 10)), "PNG"))
    return folder


def _coco_with_truncated(shared_data: Path, folder: Path, tmp_path: Path) -> str:
    """The COCO captions JSON plus a caption for the truncated copy (so only its bytes are bad)."""
    data = json.loads((shared_data / COCO_CAPTIONS).read_text())
    broken = next(p.name for p in folder.glob("*.jpg") if not any(i["file_name"] == p.name for i in data["images"]))
    data["images"].append({"id": 1, "file_name": broken, "width": 1, "height": 1})
    data["annotations"].append({"id": 1, "image_id": 1, "caption": "a cut off photo"})
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(data))
    return str(path)


def _samples(out: Path) -> dict[str, dict]:
    samples = {}
    for tar in sorted(out.glob("*.tar")):
        for sample in iter_webdataset_samples(str(tar)):
            samples[str(sample["__key__"])] = sample
    return samples


def test_folder_with_coco_captions_stable_keys_source_bytes_and_skips(image_folder, shared_data, tmp_path) -> None:
    captions = _coco_with_truncated(shared_data, image_folder, tmp_path)
    runs = [run_pack(PackConfig(inputs=(str(image_folder),), out=str(tmp_path / name), coco_captions=captions,
                                samples_per_shard=3)) for name in ("a", "b")]
    first, second = _samples(tmp_path / "a"), _samples(tmp_path / "b")
    assert sorted(first) == sorted(second) and len(first) == 6
    for name in ("00000.tar", "00001.tar", "00002.tar"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    stats = runs[0]
    assert stats["samples"] == 8 and stats["written"] == 6
    assert stats["skipped"]["truncated"]["count"] == 1 and stats["skipped"]["missing_caption"]["count"] == 1
    assert stats["skipped"]["missing_caption"]["examples"] == [str(image_folder / "zz_no_caption.png")]
    assert json.loads((tmp_path / "a" / "_stats.json").read_text()) == stats
    coco = json.loads((shared_data / COCO_CAPTIONS).read_text())
    first_caption = {}
    names = {i["id"]: i["file_name"] for i in coco["images"]}
    for ann in sorted(coco["annotations"], key=lambda a: a["id"]):
        first_caption.setdefault(names[ann["image_id"]], ann["caption"].strip())
    for key, sample in first.items():
        meta = json.loads(sample["json"])
        source = Path(meta["source"])
        assert meta["key"] == key and sample["jpg"] == source.read_bytes()  # never re-encoded
        assert sample["txt"].decode() == first_caption[source.name] == meta["caption"]
    # sorted paths: the 4 top-level images, the truncated one (key gap), the PNG, then more/
    # (3 per shard: one digit for the position, as img2dataset does)
    assert sorted(first) == ["000000", "000001", "000002", "000010", "000012", "000020"]


def test_packed_shards_read_by_the_stages_and_webdataset(image_folder, shared_data, tmp_path) -> None:
    out = tmp_path / "shards"
    run_pack(PackConfig(inputs=(str(image_folder),), out=str(out), coco_captions=str(shared_data / COCO_CAPTIONS)))
    shards = discover_shards([str(out)])
    assert [s.shard_id for s in shards] == ["00000"]
    records = read_caption_records(shards[0])  # what parse-captions reads
    assert len(records) == 6 and all(isinstance(r.caption, bytes) and r.caption for r in records)
    decoded = list(webdataset.WebDataset(str(out / "00000.tar"), shardshuffle=False).decode("pil"))
    assert [s["__key__"] for s in decoded] == [r.key for r in records]
    assert all(isinstance(s["jpg"], Image.Image) and s["txt"] for s in decoded)


def test_sidecar_captions_and_empty_caption(image_folder, tmp_path) -> None:
    folder = tmp_path / "sidecar"
    folder.mkdir()
    for index, source in enumerate(sorted(image_folder.glob("0*.jpg"))[:3]):
        shutil.copy(source, folder / source.name)
        (folder / f"{source.stem}.txt").write_text("" if index == 1 else f"  photo number {index}\n")
    stats = run_pack(PackConfig(inputs=(str(folder),), out=str(tmp_path / "out")))
    assert stats["written"] == 2 and stats["skipped"]["empty_caption"]["count"] == 1
    assert [s["txt"] for s in _samples(tmp_path / "out").values()] == [b"photo number 0", b"photo number 2"]


def test_tables_of_bytes_and_of_paths(image_folder, tmp_path) -> None:
    images = sorted(image_folder.glob("0*.jpg"))[:3]
    table = pa.table({"key": ["a1", "a2", "a3"], "TEXT": ["one", "two", None], "jpg": [p.read_bytes() for p in images]})
    pq.write_table(table, tmp_path / "img2dataset.parquet")
    stats = run_pack(PackConfig(inputs=(str(tmp_path / "img2dataset.parquet"),), out=str(tmp_path / "from_bytes")))
    packed = _samples(tmp_path / "from_bytes")
    assert stats["skipped"]["missing_caption"]["examples"] == [f"{tmp_path / 'img2dataset.parquet'}#row 2"]
    assert [json.loads(s["json"])["source_key"] for s in packed.values()] == ["a1", "a2"]
    assert [s["jpg"] for s in packed.values()] == [p.read_bytes() for p in images[:2]]
    # paths relative to the table's folder
    rows = "".join(f"{os.path.relpath(p, tmp_path)},cap {i}\n" for i, p in enumerate(images))
    (tmp_path / "list.csv").write_text("path,caption\n" + rows)
    run_pack(PackConfig(inputs=(str(tmp_path / "list.csv"),), out=str(tmp_path / "from_csv")))
    assert [s["txt"] for s in _samples(tmp_path / "from_csv").values()] == [b"cap 0", b"cap 1", b"cap 2"]


def test_keys_from_names_match_the_files_and_are_checked(image_folder, shared_data, tmp_path) -> None:
    coco = str(shared_data / COCO_CAPTIONS)
    run_pack(PackConfig(inputs=(str(image_folder),), out=str(tmp_path / "named"), coco_captions=coco, keys="name"))
    packed = _samples(tmp_path / "named")
    assert sorted(packed) == sorted(p.stem for p in image_folder.rglob("0*.jpg"))[:4] + sorted(
        p.stem for p in (image_folder / "more").glob("*.jpg"))
    assert all(Path(json.loads(s["json"])["source"]).stem == key for key, s in packed.items())
    twin = tmp_path / "twin"
    (twin / "a").mkdir(parents=True)
    (twin / "b").mkdir()
    for sub in ("a", "b"):
        shutil.copy(next((image_folder / "more").glob("*.jpg")), twin / sub / "same.jpg")
    with pytest.raises(ValueError, match=r"have the same name 'same'; use --keys position"):
        run_pack(PackConfig(inputs=(str(twin),), out=str(tmp_path / "o"), keys="name"))


def test_mistakes_are_one_line(image_folder, shared_data, tmp_path) -> None:
    runner, coco = CliRunner(), str(shared_data / COCO_CAPTIONS)
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["pack", str(empty), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "holds no image files" in result.output
    result = runner.invoke(app, ["pack", str(tmp_path / "list.parquet"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "input not found" in result.output
    command = ["pack", str(image_folder), "--coco-captions", coco, "--out", str(tmp_path / "o")]
    result = runner.invoke(app, command)
    assert result.exit_code == 0 and "8 inputs, 6 samples in 1 shard(s)" in result.output
    result = runner.invoke(app, command)
    assert result.exit_code == 2 and "pass --overwrite" in result.output
    assert runner.invoke(app, [*command, "--overwrite"]).exit_code == 0
    # A folder of images given to a stage says how to make shards of it.
    with pytest.raises(FileNotFoundError, match=r"pipeline pack .* --out SHARDS"):
        discover_shards([str(image_folder)])


def test_a_stage_given_parquet_of_image_bytes_says_to_pack_it(image_folder, tmp_path) -> None:
    from pipeline.stages.pseudo_label import PseudoLabelConfig, run_pseudo_label

    pq.write_table(pa.table({"caption": ["x"], "jpg": [next(image_folder.glob("0*.jpg")).read_bytes()]}), tmp_path / "p.parquet")
    config = PseudoLabelConfig(inputs=(str(tmp_path / "p.parquet"),), phrases=str(tmp_path), teacher="none.pth", out=str(tmp_path / "o"))
    with pytest.raises(FileNotFoundError, match=r"pipeline pack .*p\.parquet --out SHARDS"):
        run_pseudo_label(config)
