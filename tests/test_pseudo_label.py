"""`pipeline pseudo-label` and `pipeline filter` on real COCO images with their human captions,
real spaCy phrases, a real (tiny, random-weight) teacher and real Ray runs."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from model.weights.checkpoint import file_sha256
from pipeline.cli import app
from pipeline.io.labels_io import iter_pseudo_samples, read_detections
from pipeline.stages.filtering import filter_row, get_preset
from tests.pseudo_fixtures import coco_samples, odd_images, tiny_teacher, write_shard

REPO = Path(__file__).resolve().parents[1]
ODD_OK = {"cmyk", "gray", "gray16", "alpha", "palette", "exif_rotated"}
ODD_BAD = {"truncated": "truncated", "not_an_image": "not_an_image", "tiny": "too_small", "bomb": "too_large"}


@pytest.fixture(scope="module")
def ray_local():
    from pipeline.cluster import init_ray, shutdown_ray

    started = init_ray(None, num_cpus=2)
    yield
    shutdown_ray(started)  # not a bare ray.shutdown(): this restores RAY_TMPDIR and removes the temp root


@pytest.fixture(scope="module")
def world(tmp_path_factory, shared_data):
    """Three shards: two of COCO images, one of COCO images plus every odd/broken image kind."""
    root = tmp_path_factory.mktemp("pseudo")
    shards = root / "shards"
    shards.mkdir()
    coco = coco_samples(shared_data, 12)
    write_shard(shards / "00000.tar", [(k, "jpg", d, c) for k, d, c in coco[:4]])
    write_shard(shards / "00001.tar", [(k, "jpg", d, c) for k, d, c in coco[4:8]])
    odd = [(f"odd_{name}", ext, data, coco[8][2]) for name, (ext, data) in odd_images(coco[8][1]).items()]
    no_phrase = ("odd_no_phrase", "jpg", coco[9][1], "   ")
    no_image = ("odd_no_image", "", b"", coco[10][2])
    samples = [(k, "jpg", d, c) for k, d, c in coco[8:10]] + odd + [no_phrase]
    write_shard(shards / "00002.tar", samples)
    with tarfile.open(shards / "00002.tar", "a") as tar:  # a sample with a caption but no image
        data = no_image[3].encode()
        info = tarfile.TarInfo("odd_no_image.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    teacher = tiny_teacher(root / "teacher.pth")
    return {"root": root, "shards": shards, "teacher": teacher, "coco": coco}


@pytest.fixture(scope="module")
def phrases(world, ray_local):
    from nlp.phrases import ExtractorSettings
    from pipeline.stages.parse_captions import ParseCaptionsConfig, run_parse_captions

    out = world["root"] / "phrases"
    run_parse_captions(ParseCaptionsConfig(inputs=(str(world["shards"]),), out=str(out), settings=ExtractorSettings(), workers=1))
    return out


def _pseudo_label(world, phrases, out: Path, *extra: str):
    args = [
        "pseudo-label", str(world["shards"]), "--phrases", str(phrases), "--teacher", str(world["teacher"]),
        "--out", str(out), "--min-size", "128", "--max-size", "192", "--batch-size", "3", "--workers", "1",
        "--preset", "owlst", *extra,
    ]
    return CliRunner().invoke(app, args)


@pytest.fixture(scope="module")
def labelled(world, phrases, ray_local):
    out = world["root"] / "labelled"
    result = _pseudo_label(world, phrases, out)
    assert result.exit_code == 0, result.output
    return out


def _source_samples(shards: Path) -> dict[str, dict[str, bytes]]:
    from pipeline.io.shards import iter_webdataset_samples

    found = {}
    for shard in sorted(shards.glob("*.tar")):
        for sample in iter_webdataset_samples(str(shard)):
            found[str(sample["__key__"])] = sample
    return found


def test_every_key_accounted_for_and_odd_images_handled(world, labelled):
    stats = json.loads((labelled / "_stats.json").read_text())
    source = _source_samples(world["shards"])
    assert stats["samples"] == len(source) == 4 + 4 + 2 + 10 + 2
    skipped = {reason: entry["count"] for reason, entry in stats["skipped"].items()}
    assert stats["written"] + sum(skipped.values()) == stats["samples"]
    assert stats["shards"] == {**stats["shards"], "total": 3, "written": 3, "failed": 0}

    rows = {}
    for shard in ("00000", "00001", "00002"):
        shard_rows, metadata = read_detections(str(labelled / "detections" / f"{shard}.parquet"))
        assert json.loads(metadata["teacher"])["sha256"] == file_sha256(world["teacher"])
        rows.update({row.key: row for row in shard_rows})
    assert set(rows) == set(source)  # one detections row per input sample
    for name, reason in ODD_BAD.items():
        assert rows[f"odd_{name}"].error.startswith(reason), (name, rows[f"odd_{name}"].error)
        assert f"odd_{name}" in stats["skipped"][reason]["examples"]
    assert rows["odd_no_phrase"].error.startswith("caption_error") or rows["odd_no_phrase"].error.startswith("no_phrases")
    assert rows["odd_no_image"].error.startswith("no_image")
    for name in ODD_OK:
        row = rows[f"odd_{name}"]
        assert row.error is None and row.width > 0 and row.height > 0, name
    # EXIF orientation 6: the 160x120 pixels are shown (and labelled) as 120x160.
    assert (rows["odd_exif_rotated"].width, rows["odd_exif_rotated"].height) == (120, 160)


def test_pseudo_samples_keep_source_bytes_and_schema(world, labelled):
    source = _source_samples(world["shards"])
    sha = file_sha256(world["teacher"])
    policy = get_preset("owlst")
    seen = 0
    max_x = 0.0
    for shard in ("00000", "00001", "00002"):
        rows = {row.key: row for row in read_detections(str(labelled / "detections" / f"{shard}.parquet"))[0]}
        for key, ext, image, sample in iter_pseudo_samples(str(labelled / "pseudo" / f"{shard}.tar")):
            seen += 1
            assert image == source[key][ext]  # bytes unchanged
            assert set(sample) == {"key", "width", "height", "grounding", "teacher", "filter"}
            assert sample["key"] == key and sample["teacher"]["sha256"] == sha
            assert sample["teacher"]["variant"] == "tiny" and sample["filter"]["name"] == "owlst"
            decoded = Image.open(io.BytesIO(image))
            width, height = sample["width"], sample["height"]
            assert {width, height} == set(decoded.size)
            caption = sample["grounding"]["caption"]
            expected = filter_row(rows[key], policy)
            assert len(sample["grounding"]["regions"]) == len(expected) > 0
            for region in sample["grounding"]["regions"]:
                (start, end), = region["tokens_positive"]
                assert caption[start:end] == region["phrase"]
                x0, y0, x1, y1 = region["bbox"]
                assert 0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height
                assert region["score"] > policy.min_score
                max_x = max(max_x, x1)
    assert seen > 0
    # Images were resized to a 128-192 px short side; boxes came back in original pixels.
    assert max_x > 200


def test_filter_reproduces_pseudo_label_and_applies_other_presets(world, labelled, ray_local):
    same = world["root"] / "refiltered"
    result = CliRunner().invoke(
        app, ["filter", str(world["shards"]), "--detections", str(labelled), "--out", str(same), "--preset", "owlst"]
    )
    assert result.exit_code == 0, result.output
    for shard in ("00000", "00001", "00002"):
        assert (same / "pseudo" / f"{shard}.tar").read_bytes() == (labelled / "pseudo" / f"{shard}.tar").read_bytes()

    strict = world["root"] / "strict"
    result = CliRunner().invoke(
        app,
        ["filter", str(world["shards"]), "--detections", str(labelled), "--out", str(strict), "--preset", "grit",
         "--min-score", "0.4", "--top-k", "1"],
    )
    assert result.exit_code == 0, result.output
    policy = get_preset("grit").with_overrides(min_score=0.4, top_k_per_phrase=1)
    for shard in ("00000", "00001", "00002"):
        rows = read_detections(str(labelled / "detections" / f"{shard}.parquet"))[0]
        expected = {row.key: filter_row(row, policy) for row in rows}
        got = {key: sample for key, _, _, sample in iter_pseudo_samples(str(strict / "pseudo" / f"{shard}.tar"))}
        assert set(got) == {key for key, kept in expected.items() if kept}
        for key, sample in got.items():
            phrases = [r["phrase"] for r in sample["grounding"]["regions"]]
            assert len(phrases) == len(set(phrases)) == len(expected[key])  # top-1 per phrase


def test_rerun_skips_done_shards_and_errors_are_clear(world, phrases, labelled, tmp_path, ray_local):
    before = {p.name: p.stat().st_mtime_ns for p in (labelled / "pseudo").iterdir()}
    result = _pseudo_label(world, phrases, labelled)
    assert result.exit_code == 0, result.output
    assert {p.name: p.stat().st_mtime_ns for p in (labelled / "pseudo").iterdir()} == before
    stats = json.loads((labelled / "_stats.json").read_text())
    assert stats["shards"]["already_done"] == 3 and stats["samples"] == 22

    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    result = CliRunner().invoke(
        app, ["pseudo-label", str(world["shards"]), "--phrases", str(phrases), "--teacher", str(bad), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code != 0 and "bad.pth" in result.output
    result = CliRunner().invoke(
        app, ["pseudo-label", str(world["shards"]), "--phrases", str(tmp_path / "none"), "--teacher",
              str(world["teacher"]), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and "--phrases" in result.output
    # A phrases folder of other shards (here: the image shards' own folder) is refused before
    # Ray or the teacher, in one line naming a shard it lacks.
    started = time.monotonic()
    result = CliRunner().invoke(
        app, ["pseudo-label", str(world["shards"]), "--phrases", str(world["shards"]), "--teacher",
              str(world["teacher"]), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and time.monotonic() - started < 30, result.output
    assert [line for line in result.output.splitlines() if line.strip()] == [
        f"error: --phrases {world['shards']}: holds no parse-captions output of these shards (no 00000.parquet for "
        f"{world['shards'] / '00000.tar'}); give the --out of parse-captions run on the same input shards"
    ]


def test_killed_run_resumes_to_the_uninterrupted_output(world, phrases, labelled, tmp_path):
    """The driver is killed (SIGKILL to its process group) once the first shard is done; a
    re-run finishes the rest and every file equals the uninterrupted run's."""
    out = tmp_path / "killed"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    command = [
        sys.executable, "-m", "pipeline", "pseudo-label", str(world["shards"]), "--phrases", str(phrases),
        "--teacher", str(world["teacher"]), "--out", str(out), "--min-size", "128", "--max-size", "192",
        "--batch-size", "3", "--workers", "1", "--preset", "owlst",
    ]
    process = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None and not list(out.glob("pseudo/*.tar")):
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    finished = sorted(p.name for p in (out / "pseudo").glob("*.tar"))
    assert finished and len(finished) < 3, finished  # killed part-way
    assert not (out / "_stats.json").exists()
    # Only complete shards are visible under final names; partial writes are temporaries.
    for name in finished:
        with tarfile.open(out / "pseudo" / name) as tar:
            tar.getmembers()

    result = CliRunner().invoke(
        app,
        ["pseudo-label", str(world["shards"]), "--phrases", str(phrases), "--teacher", str(world["teacher"]),
         "--out", str(out), "--min-size", "128", "--max-size", "192", "--batch-size", "3", "--workers", "1",
         "--preset", "owlst"],
    )
    assert result.exit_code == 0, result.output
    for folder in ("pseudo", "detections"):
        names = sorted(p.name for p in (labelled / folder).iterdir())
        assert sorted(p.name for p in (out / folder).iterdir()) == names
    for shard in ("00000", "00001", "00002"):
        assert (out / "pseudo" / f"{shard}.tar").read_bytes() == (labelled / "pseudo" / f"{shard}.tar").read_bytes()
        got = read_detections(str(out / "detections" / f"{shard}.parquet"))[0]
        want = read_detections(str(labelled / "detections" / f"{shard}.parquet"))[0]
        assert got == want


def test_show_export_and_stats(labelled, tmp_path):
    from pycocotools.coco import COCO

    samples = list(iter_pseudo_samples(str(labelled / "pseudo" / "00000.tar")))
    samples += list(iter_pseudo_samples(str(labelled / "pseudo" / "00001.tar")))
    samples += list(iter_pseudo_samples(str(labelled / "pseudo" / "00002.tar")))
    regions = sum(len(s["grounding"]["regions"]) for _, _, _, s in samples)

    result = CliRunner().invoke(app, ["show", str(labelled), "--out", str(tmp_path / "gallery"), "--n", "3"])
    assert result.exit_code == 0, result.output
    pngs = sorted((tmp_path / "gallery").glob("*.png"))
    assert len(pngs) == 3 and Image.open(pngs[0]).size in {(s["width"], s["height"]) for *_, s in samples}
    page = (tmp_path / "gallery" / "index.html").read_text()
    assert page.count("<figure>") == 3 and samples[0][3]["grounding"]["regions"][0]["phrase"] in page

    result = CliRunner().invoke(app, ["export", str(labelled), "--format", "coco", "--out", str(tmp_path / "coco.json")])
    assert result.exit_code == 0, result.output
    coco = COCO(str(tmp_path / "coco.json"))
    assert len(coco.getImgIds()) == len(samples) and len(coco.getAnnIds()) == regions
    names = {c["name"] for c in coco.loadCats(coco.getCatIds())}
    assert all(" " not in name for name in names)  # one category per phrase head word

    result = CliRunner().invoke(app, ["export", str(labelled), "--format", "odvg", "--out", str(tmp_path / "odvg.jsonl")])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (tmp_path / "odvg.jsonl").read_text().splitlines()]
    assert len(lines) == len(samples) and lines[0]["grounding"] == samples[0][3]["grounding"]

    result = CliRunner().invoke(app, ["stats", str(labelled)])
    assert result.exit_code == 0 and "skipped: too_large" in result.output and "samples_per_s" in result.output


def test_report_of_a_labelling_run_is_one_self_contained_page(world, phrases, labelled, tmp_path):
    """`pipeline report` on the module's run folder: a section per stage output found (the
    parse-captions and pseudo-label outputs, and the filter outputs of the tests before), each
    with its counts, skip reasons, throughput and label statistics; every image embedded."""
    import base64
    import re
    import shutil

    from pipeline.demo.report import DEMO_GENERATOR
    from pipeline.report.page import document

    page_path = tmp_path / "report.html"
    result = CliRunner().invoke(app, ["report", str(world["root"]), "--out", str(page_path)])
    assert result.exit_code == 0, result.output
    page = page_path.read_text()
    assert "parse-captions: phrases" in page and "pseudo-label: labelled" in page
    for heading in ("Skipped samples", "Throughput (the last run)", "from the finishing times of 3 shards", "Labels in a sample",
                    "Phrases of the kept boxes", "Boxes per phrase frequency band", "Sample images with their kept boxes",
                    "Phrases in a sample", "teacher: teacher.pth (glip, tiny)"):
        assert heading in page, heading
    assert "too_large" in page and "odd_bomb" in page  # a skip reason with its example key
    sources = re.findall(r'src="([^"]*)"', page)
    embedded = [re.fullmatch(r"data:image/(png|jpeg);base64,([A-Za-z0-9+/=]+)", src) for src in sources]
    assert sources and all(embedded), [src[:40] for src in sources]  # nothing outside the page
    kinds = [match.group(1) for match in embedded]
    assert kinds.count("jpeg") >= 3 and kinds.count("png") >= 4  # the image grid; histograms and throughput
    for match in embedded:
        Image.open(io.BytesIO(base64.b64decode(match.group(2)))).verify()

    # Without --out the page goes into RUN_DIR, but never over a page it did not write (the demo's).
    run = tmp_path / "run"
    shutil.copytree(phrases, run)
    (run / "report.html").write_text(document("demo", "the demo's report", generator=DEMO_GENERATOR))
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 2 and "give --out" in result.output
    (run / "report.html").unlink()
    assert CliRunner().invoke(app, ["report", str(run)]).exit_code == 0
    assert CliRunner().invoke(app, ["report", str(run)]).exit_code == 0  # its own page it replaces
    result = CliRunner().invoke(app, ["report", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "error:" in result.output


def test_pseudo_label_with_a_grounding_dino_teacher(world, phrases, hf_teachers, tmp_path, ray_local):
    """The whole stage with `--teacher hf:FOLDER`: every sample accounted for, the teacher's
    identity in every pseudo sample, and `filter` re-applying a preset to its scores."""
    folder = hf_teachers["grounding-dino"]
    out = tmp_path / "gdino"
    result = CliRunner().invoke(app, [
        "pseudo-label", str(world["shards"]), "--phrases", str(phrases), "--teacher", f"hf:{folder}", "--out", str(out),
        "--batch-size", "3", "--workers", "1", "--preset", "owlst",
    ])
    assert result.exit_code == 0, result.output
    stats = json.loads((out / "_stats.json").read_text())
    assert stats["samples"] == 22 and stats["shards"]["written"] == 3
    teacher = stats["versions"]["teacher"]
    assert teacher["kind"] == "grounding-dino" and teacher["checkpoint"] == folder.name
    assert teacher["sha256"] == file_sha256(folder / "model.safetensors")
    source = _source_samples(world["shards"])
    seen = 0
    for shard in ("00000", "00001", "00002"):
        rows = {row.key: row for row in read_detections(str(out / "detections" / f"{shard}.parquet"))[0]}
        for key, ext, image, sample in iter_pseudo_samples(str(out / "pseudo" / f"{shard}.tar")):
            seen += 1
            assert image == source[key][ext] and sample["teacher"] == teacher
            assert len(sample["grounding"]["regions"]) == len(filter_row(rows[key], get_preset("owlst"))) > 0
            for region in sample["grounding"]["regions"]:
                (start, end), = region["tokens_positive"]
                assert sample["grounding"]["caption"][start:end] == region["phrase"]
                x0, y0, x1, y1 = region["bbox"]
                assert 0 <= x0 < x1 <= sample["width"] and 0 <= y0 < y1 <= sample["height"]
    assert seen == stats["written"] > 0
    strict = tmp_path / "gdino-grit"
    result = CliRunner().invoke(app, ["filter", str(world["shards"]), "--detections", str(out), "--out", str(strict), "--preset", "grit"])
    assert result.exit_code == 0, result.output
    kept = [s for shard in ("00000", "00001", "00002") for *_, s in iter_pseudo_samples(str(strict / "pseudo" / f"{shard}.tar"))]
    assert all(s["teacher"] == teacher and all(r["score"] > 0.65 for r in s["grounding"]["regions"]) for s in kept)


def test_epochs_count_a_stage_s_pseudo_samples_from_its_stats_without_reading_the_tars(labelled, monkeypatch):
    """`train-student --epochs` counts a pseudo-label output's samples from its `_stats.json`
    (at 10^4 shards, reading every tar took minutes before the first step); the count is the
    one reading the tars gives. A folder the record does not cover whole is read."""
    from pipeline.train.data import mixing, pseudo_stream
    from pipeline.train.data.specs import SourceSpec

    folder = labelled / "pseudo"
    read = sum(len(pseudo_stream.read_pseudo_shard(str(path))) for path in sorted(folder.glob("*.tar")))
    stats = json.loads((labelled / "_stats.json").read_text())
    spec = SourceSpec(kind="pseudo", paths=(str(folder),))

    def no_reading(path):
        raise AssertionError(f"read {path}")

    with monkeypatch.context() as patch:
        patch.setattr(pseudo_stream, "read_pseudo_shard", no_reading)
        assert mixing.count_samples(spec) == read == stats["written"] > 0
    subset = labelled.parent / "pseudo_subset" / "pseudo"  # two of the three tars, the record copied beside them
    subset.mkdir(parents=True)
    for path in sorted(folder.glob("*.tar"))[:2]:
        (subset / path.name).write_bytes(path.read_bytes())
    (subset.parent / "_stats.json").write_text(json.dumps(stats))
    expected = sum(len(pseudo_stream.read_pseudo_shard(str(path))) for path in sorted(subset.glob("*.tar")))
    assert mixing.counted_by_stage(str(subset)) is None
    assert mixing.count_samples(SourceSpec(kind="pseudo", paths=(str(subset),))) == expected
