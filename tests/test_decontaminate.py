"""`pipeline decontaminate` on real COCO images: resized, recompressed, 10%-cropped and flipped
copies of 40 evaluation images hidden in web shards among 640 other real images (crops and
rotations of the 40 other coco_mini images) and broken samples; a real Ray run, then a resume."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.io.shards import iter_webdataset_members
from tests.pseudo_fixtures import COCO_IMAGES, add_member, encoded

KINDS = ("resize", "recompress", "crop", "flip")


def _copies(image: Image.Image, rng: random.Random) -> dict[str, bytes]:
    width, height = image.size
    scale = rng.choice([rng.uniform(0.3, 0.7), rng.uniform(1.2, 1.5)])
    crop_w, crop_h = int(width * 0.9), int(height * 0.9)
    x, y = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
    return {
        "resize": encoded(image.resize((int(width * scale), int(height * scale))), "JPEG", quality=90),
        "recompress": encoded(image, "JPEG", quality=rng.choice([15, 25, 35])),
        "crop": encoded(image.crop((x, y, x + crop_w, y + crop_h)), "JPEG", quality=90),
        "flip": encoded(ImageOps.mirror(image), "JPEG", quality=90),
    }


def _others(image: Image.Image) -> list[bytes]:
    """16 distinct real pictures from one image: itself, quadrants, centre, a rotation, thirds."""
    w, h = image.size
    boxes = [(0, 0, w, h), (0, 0, w // 2, h // 2), (w // 2, 0, w, h // 2), (0, h // 2, w // 2, h), (w // 2, h // 2, w, h),
             (w // 4, h // 4, 3 * w // 4, 3 * h // 4)]
    boxes += [(i * w // 3, j * h // 3, (i + 1) * w // 3, (j + 1) * h // 3) for i in range(3) for j in range(3)]
    pictures = [image.crop(box) for box in boxes] + [image.rotate(90, expand=True)]
    return [encoded(picture, "JPEG", quality=90) for picture in pictures]


@pytest.fixture(scope="module")
def world(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("decontaminate")
    files = sorted((shared_data / COCO_IMAGES).glob("*.jpg"))
    evaluation, rest = files[:40], files[40:]
    rng = random.Random(0)
    samples = []
    for path in evaluation:
        for kind, data in _copies(Image.open(path).convert("RGB"), rng).items():
            samples.append((f"copy_{kind}_{path.stem}", data))
    for index, data in enumerate(data for path in rest for data in _others(Image.open(path).convert("RGB"))):
        samples.append((f"other_{index:04d}", data))
    samples += [("broken_truncated", samples[-1][1][:500]), ("broken_html", b"<html>404</html>")]
    rng.shuffle(samples)
    (root / "web").mkdir()
    for shard in range(4):
        with tarfile.open(root / "web" / f"{shard:05d}.tar", "w") as tar:
            for key, data in samples[shard::4]:
                add_member(tar, f"{key}.jpg", data)
                add_member(tar, f"{key}.txt", f"a photo {key}".encode())
            add_member(tar, f"text_only_{shard}.txt", b"a sample with no image")
    with tarfile.open(root / "eval.tar", "w") as tar:  # half the evaluation images as a shard
        for path in evaluation[20:]:
            add_member(tar, f"{path.stem}.jpg", path.read_bytes())
    against = [arg for path in evaluation[:20] for arg in ("--against", str(path))] + ["--against", str(root / "eval.tar")]
    return {"root": root, "against": against, "evaluation": evaluation}


@pytest.fixture(scope="module")
def cleaned(world):
    out = world["root"] / "clean"
    result = CliRunner().invoke(app, ["decontaminate", str(world["root"] / "web"), *world["against"], "--out", str(out), "--workers", "2"])
    assert result.exit_code == 0, result.output
    return out


def _kept_keys(folder: Path) -> set[str]:
    return {key for shard in sorted(folder.glob("*.tar")) for key, _ in iter_webdataset_members(str(shard)) if key}


def test_copies_are_found_and_other_images_kept(world, cleaned):
    source = _kept_keys(world["root"] / "web")
    kept = _kept_keys(cleaned)
    removed = source - kept
    copies = {key for key in source if key.startswith("copy_")}
    others = {key for key in source if key.startswith("other_")}
    recall = len(removed & copies) / len(copies)
    false_rate = len(removed & others) / len(others)
    per_kind = {kind: sum(1 for key in copies - removed if key.startswith(f"copy_{kind}_")) for kind in KINDS}
    print(f"\nrecall of injected copies {recall:.3f} ({len(removed & copies)}/{len(copies)}; missed per kind {per_kind}); "
          f"false matches among others {false_rate:.3%} ({len(removed & others)}/{len(others)}; "
          f"{len(others) * 40:,} other-evaluation pairs)")
    assert recall >= 0.95 and false_rate <= 0.001
    assert {"broken_truncated", "broken_html", "text_only_0"} <= kept  # no decodable image: kept unchecked
    matches = pq.read_table(cleaned / "matches.parquet").to_pylist()
    assert {m["web_key"] for m in matches} == removed and len(matches) == len(removed)
    names = {path.stem: str(path) for path in world["evaluation"][:20]}
    names |= {path.stem: f"{world['root'] / 'eval.tar'}:{path.stem}" for path in world["evaluation"][20:]}
    for match in matches:
        if match["web_key"].startswith("copy_"):
            assert match["eval_image"] == names[match["web_key"].rsplit("_", 1)[1]]
            assert max(match["phash_distance"], match["dhash_distance"]) <= 14
    stats = json.loads((cleaned / "_stats.json").read_text())
    assert stats["skipped"]["near_duplicate"]["count"] == len(removed)
    assert stats["samples"] == len(source) and stats["written"] == len(kept)
    assert stats["hashed"] == len(source) - 6 and stats["unchecked"] == 6
    assert stats["settings"]["eval_images"] == 40 and stats["shards"]["written"] == 4


def test_kept_members_are_copied_unchanged_and_a_resume_redoes_only_the_missing_shard(world, cleaned):
    for shard in sorted((world["root"] / "web").glob("*.tar")):
        source = {m.name: (m, data) for _, members in iter_webdataset_members(str(shard)) for m, data in members}
        output = [(m, data) for _, members in iter_webdataset_members(str(cleaned / shard.name)) for m, data in members]
        assert f"text_only_{int(shard.stem)}.txt" in {m.name for m, _ in output}
        for member, data in output:
            original, original_data = source[member.name]
            assert data == original_data and (member.mtime, member.mode, member.size) == (original.mtime, original.mode, original.size)
    before = (cleaned / "00002.tar").read_bytes()
    (cleaned / "00002.tar").unlink()
    result = CliRunner().invoke(app, ["decontaminate", str(world["root"] / "web"), *world["against"], "--out", str(cleaned), "--workers", "1"])
    assert result.exit_code == 0, result.output
    stats = json.loads((cleaned / "_stats.json").read_text())
    assert stats["shards"]["written"] == 1 and stats["shards"]["already_done"] == 3
    assert (cleaned / "00002.tar").read_bytes() == before
    assert pq.read_table(cleaned / "matches.parquet").num_rows == stats["skipped"]["near_duplicate"]["count"]


def test_bad_evaluation_input_is_one_line_with_exit_2(world, tmp_path):
    runner = CliRunner()
    web = str(world["root"] / "web")
    result = runner.invoke(app, ["decontaminate", web, "--against", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "nowhere" in result.stderr.strip().splitlines()[-1]
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    result = runner.invoke(app, ["decontaminate", web, "--against", str(tmp_path / "broken.jpg"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "broken.jpg" in line and "cannot be used" in line
