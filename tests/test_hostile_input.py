"""Hostile input, counted and contained: unwritable output folders, evil tar members, unsafe
checkpoints, a thin image whose boxes collapse, and byte-reproducible detections.

Every stage here is the real command (a subprocess or typer's runner) on real COCO images and
a real tiny teacher; nothing is mocked.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from model.inference.predict import Detections
from pipeline.cli import app
from pipeline.io.labels_io import read_detections
from pipeline.io.phrases_file import read_phrases_file
from tests.pseudo_fixtures import add_member, coco_samples, tiny_teacher, write_shard

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": str(REPO)}
STAGE_ARGS = ("--min-size", "800", "--max-size", "1333", "--batch-size", "2", "--workers", "1", "--preset", "owlst")


def _read_only_mount_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    return probe.returncode == 0


def _stage_commands(root: Path, out: Path) -> dict[str, list[str]]:
    """Each writing stage with inputs that exist and an `--out` of `out`. The teacher is a text
    file: had the stage read it before checking `--out`, it would fail on the teacher instead."""
    shards = root / "shards"
    shards.mkdir(exist_ok=True)
    if not (shards / "00000.tar").exists():
        write_shard(shards / "00000.tar", [("k0", "jpg", b"x", "a dog on a mat")])
    teacher = root / "notes.pth"
    teacher.write_text("not a checkpoint")
    (root / "phrases").mkdir(exist_ok=True)
    (root / "detections").mkdir(exist_ok=True)
    return {
        "parse-captions": ["parse-captions", str(shards), "--out", str(out)],
        "pseudo-label": ["pseudo-label", str(shards), "--phrases", str(root / "phrases"), "--teacher", str(teacher), "--out", str(out)],
        "filter": ["filter", str(shards), "--detections", str(root / "detections"), "--out", str(out)],
        "export": ["export", str(root), "--format", "coco", "--out", str(out / "labels.json")],
    }


def _assert_one_line_naming(result: subprocess.CompletedProcess, folder: Path) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(folder) in lines[0] and "cannot be written" in lines[0], lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("stage", ["parse-captions", "pseudo-label", "filter", "export"])
def test_output_under_a_file_is_one_line_and_exit_2(tmp_path, stage):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = blocker / "out"
    command = _stage_commands(tmp_path, out)[stage]
    result = subprocess.run([sys.executable, "-m", "pipeline", *command], cwd=REPO, env=ENV, capture_output=True, text=True)
    _assert_one_line_naming(result, out)


@pytest.mark.skipif(not _read_only_mount_works(), reason="needs `unshare -rm` to mount a read-only tmpfs")
@pytest.mark.parametrize("stage", ["parse-captions", "pseudo-label", "filter", "export"])
def test_output_on_a_read_only_file_system_is_one_line_and_exit_2(tmp_path, stage):
    """A read-only tmpfs mounted in a private mount namespace: `OSError: [Errno 30]` before the fix."""
    mount = tmp_path / "ro"
    mount.mkdir()
    out = mount / "out"
    command = _stage_commands(tmp_path, out)[stage]
    script = 'mount -t tmpfs -o ro tmpfs "$1" && shift && exec "$@"'
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, "sh", str(mount), sys.executable, "-m", "pipeline", *command],
        cwd=REPO, env=ENV, capture_output=True, text=True,
    )
    _assert_one_line_naming(result, out)
    assert "Read-only file system" in result.stderr


def _evil_tar(path: Path, samples: list[tuple[str, bytes, str]]) -> int:
    """A shard of real samples plus every member kind that is no sample part; returns its member count."""
    write_shard(path, [(key, "jpg", data, caption) for key, data, caption in samples])
    with tarfile.open(path, "a") as tar:
        add_member(tar, "../evil_traversal.txt", b"a cat on a sofa")
        add_member(tar, "/evil_absolute.txt", b"a bird in a tree")
        link = tarfile.TarInfo("evil_link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        hard = tarfile.TarInfo("evil_hard.txt")
        hard.type, hard.linkname = tarfile.LNKTYPE, f"{samples[0][0]}.txt"
        tar.addfile(hard)
        folder = tarfile.TarInfo("somedir")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        fifo = tarfile.TarInfo("evil_fifo.txt")
        fifo.type = tarfile.FIFOTYPE
        tar.addfile(fifo)
        add_member(tar, "__meta__.json", b"{}")
        add_member(tar, "README", b"no extension")
    with tarfile.open(path) as tar:
        return len(tar.getmembers())


IGNORED = {"symlink": 1, "hardlink": 1, "directory": 1, "fifo": 1, "metadata": 1, "no_extension": 1}


def _thin_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 4000), (120, 80, 40)).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def evil_world(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("hostile")
    shards = root / "shards"
    shards.mkdir()
    coco = coco_samples(shared_data, 2)
    samples = [(key, data, caption) for key, data, caption in coco] + [("thin", _thin_jpeg(), coco[0][2])]
    members = _evil_tar(shards / "00000.tar", samples)
    result = CliRunner().invoke(app, ["parse-captions", str(shards), "--out", str(root / "phrases"), "--workers", "1"])
    assert result.exit_code == 0, result.output
    return {"root": root, "shards": shards, "members": members, "teacher": tiny_teacher(root / "teacher.pth")}


def test_parse_captions_rejects_traversal_keys_and_counts_every_member(evil_world):
    stats = json.loads((evil_world["root"] / "phrases" / "_stats.json").read_text())
    assert stats["skipped"]["bad_key"] == {"count": 2, "examples": ["../evil_traversal", "/evil_absolute"]}
    assert stats["members_ignored"] == IGNORED
    # 3 samples of 3 parts (jpg, txt, json) and the 2 evil captions: every member is accounted for.
    assert stats["tar_members"] == evil_world["members"] == 3 * 3 + 2 + sum(IGNORED.values())
    rows = {row["key"]: row for row in read_phrases_file(str(evil_world["root"] / "phrases" / "00000.parquet")).to_pylist()}
    assert set(rows) == {"../evil_traversal", "/evil_absolute", *(key for key in rows if not key.startswith(("/", "..")))}
    assert len(rows) == 5
    for key in ("../evil_traversal", "/evil_absolute"):
        assert rows[key]["phrases"] == [] and rows[key]["error"].startswith("bad_key")
    assert "evil_link" not in rows and "evil_fifo" not in rows and "evil_hard" not in rows


def _pseudo_label(world, out: Path) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "pipeline", "pseudo-label", str(world["shards"]), "--phrases", str(world["root"] / "phrases"),
        "--teacher", str(world["teacher"]), "--out", str(out), *STAGE_ARGS,
    ]
    return subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True)


@pytest.fixture(scope="module")
def labelled_twice(evil_world):
    outs = [evil_world["root"] / "run_a", evil_world["root"] / "run_b"]
    for out in outs:
        result = _pseudo_label(evil_world, out)
        assert result.returncode == 0, result.stderr
    return outs


def test_thin_image_boxes_under_one_pixel_are_dropped_and_counted(labelled_twice):
    stats = json.loads((labelled_twice[0] / "_stats.json").read_text())
    assert stats["degenerate_boxes"] > 0
    rows = {row.key: row for row in read_detections(str(labelled_twice[0] / "detections" / "00000.parquet"))[0]}
    assert rows["thin"].error is None and (rows["thin"].width, rows["thin"].height) == (8, 4000)
    for row in rows.values():
        for box in row.boxes or []:
            x0, y0, x1, y1 = box.bbox
            assert x1 - x0 >= 1 and y1 - y0 >= 1, (row.key, box)


def test_pseudo_label_counts_ignored_members_too(labelled_twice, evil_world):
    stats = json.loads((labelled_twice[0] / "_stats.json").read_text())
    assert stats["members_ignored"] == IGNORED and stats["tar_members"] == evil_world["members"]
    assert stats["skipped"]["bad_key"]["count"] == 2


def test_detections_are_byte_reproducible(labelled_twice):
    digests = [hashlib.sha256((out / "detections" / "00000.parquet").read_bytes()).hexdigest() for out in labelled_twice]
    assert digests[0] == digests[1]
    pseudo = [(out / "pseudo" / "00000.tar").read_bytes() for out in labelled_twice]
    assert pseudo[0] == pseudo[1]


class _Evil:
    def __reduce__(self):
        return (print, ("EVIL CODE RAN",))


@pytest.mark.parametrize("kind", ["text", "pickle"])
def test_unsafe_checkpoint_is_one_line_and_never_suggests_weights_only_false(evil_world, tmp_path, kind):
    teacher = tmp_path / f"{kind}.pth"
    if kind == "text":
        teacher.write_text("definitely not a checkpoint\n")
    else:
        torch.save({"model": {"w": torch.zeros(1)}, "hook": _Evil()}, teacher)
    command = [
        sys.executable, "-m", "pipeline", "pseudo-label", str(evil_world["shards"]), "--phrases",
        str(evil_world["root"] / "phrases"), "--teacher", str(teacher), "--out", str(tmp_path / "out"),
    ]
    result = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(teacher) in lines[0] and "not a valid or safe checkpoint" in lines[0], result.stderr
    assert "weights_only" not in result.stderr and "safe_globals" not in result.stderr
    assert "EVIL CODE RAN" not in result.stdout + result.stderr


def test_without_degenerate_keeps_boxes_of_one_pixel_and_counts_the_rest():
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [2.0, 0.0, 2.0, 50.0], [0.0, 3.0, 9.0, 3.5], [1.0, 1.0, 5.0, 9.0]])
    found = Detections(boxes, torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([0, 1, 2, 3]))
    kept = found.without_degenerate(1.0).above(0.65)
    assert kept.phrase_ids.tolist() == [0] and kept.degenerate == 2
