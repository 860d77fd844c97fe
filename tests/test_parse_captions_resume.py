"""parse-captions resume: a partial run, a broken shard retried, and a SIGKILLed CLI run.

Each resumed run must give the same outputs as an uninterrupted one (rows, metadata and
per-shard report, timing aside). Shard builders and fixtures come from tests.test_parse_captions.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from nlp.phrases import ExtractorSettings
from pipeline.io import storage
from pipeline.io.phrases_file import read_phrases_file
from pipeline.io.shards import CaptionColumns
from pipeline.stages.parse_captions import CaptionShardWorker, run_parse_captions
from pipeline.stages.stage import run_shard
from tests.test_parse_captions import (  # noqa: F401  (fixtures are used by name)
    captions,
    comparable,
    config,
    image_bytes,
    ray_cluster,
    shard_folder,
    task_for,
    write_tar,
)


def test_resumed_run_equals_an_uninterrupted_one(
    ray_cluster, shard_folder: Path, tmp_path: Path, captions: list[str]
) -> None:
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    first = run_parse_captions(config(shard_folder, whole), progress_stream=io.StringIO())
    # A killed run: one shard finished, one never written, one caught mid-write (a temporary).
    resumed.mkdir()
    shutil.copy(whole / "00001.parquet", resumed / "00001.parquet")
    (resumed / storage.temporary_name("00000.parquet")).write_bytes(b"PAR1 half a file")
    second = run_parse_captions(config(shard_folder, resumed), progress_stream=io.StringIO())
    assert sorted(os.listdir(resumed)) == ["00000.parquet", "00001.parquet", "00002.parquet", "_shards.jsonl", "_stats.json"]
    for shard_id in ("00000", "00001", "00002"):
        assert comparable(resumed / f"{shard_id}.parquet") == comparable(whole / f"{shard_id}.parquet")
    assert second["shards"]["written"] == 2 and second["shards"]["already_done"] == 1
    for key in ("samples", "written", "parsed", "phrases", "unique_captions", "truncated", "skipped"):
        assert second[key] == first[key], key
    # Nothing left to do: a third run writes nothing and starts no worker.
    before = (resumed / "00000.parquet").stat().st_mtime_ns
    third = run_parse_captions(config(shard_folder, resumed), progress_stream=io.StringIO())
    assert third["shards"]["written"] == 0 and third["shards"]["already_done"] == 3
    assert (resumed / "00000.parquet").stat().st_mtime_ns == before
    # --overwrite redoes every shard, with the same result.
    redo = run_parse_captions(config(shard_folder, resumed, overwrite=True), progress_stream=io.StringIO())
    assert redo["shards"]["written"] == 3
    assert comparable(resumed / "00000.parquet") == comparable(whole / "00000.parquet")


def test_a_broken_shard_does_not_stop_the_job_and_is_retried(
    ray_cluster, shard_folder: Path, tmp_path: Path, captions: list[str], image_bytes: bytes
) -> None:
    broken = shard_folder / "00003.tar"
    write_tar(broken, captions[:30], image_bytes, prefix="c")
    whole = broken.read_bytes()
    broken.write_bytes(whole[: len(whole) // 3])
    out = tmp_path / "out"
    stats = run_parse_captions(
        config(shard_folder, out, settings=ExtractorSettings.for_mode("glip")), progress_stream=io.StringIO()
    )
    assert stats["shards"]["written"] == 3 and stats["shards"]["failed"] == 1
    assert "00003.tar" in stats["shards"]["failed_shards"]["00003"]
    assert not (out / "00003.parquet").exists()
    broken.write_bytes(whole)  # the shard is fixed (re-downloaded): a re-run does only that one
    again = run_parse_captions(
        config(shard_folder, out, settings=ExtractorSettings.for_mode("glip")), progress_stream=io.StringIO()
    )
    assert again["shards"] == {"total": 4, "written": 1, "already_done": 3, "failed": 0, "failed_shards": {}}
    assert len(read_phrases_file(str(out / "00003.parquet"))) == 30


def session_members(session: int) -> list[int]:
    """Live (non-zombie) processes of a session: the driver and every Ray process it spawned.

    Ray workers put themselves in their own process groups but stay in the driver's session.
    """
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp session
        if fields[0] != "Z" and int(fields[3]) == session:
            members.append(int(entry))
    return members


def kill_session(session: int) -> None:
    """SIGKILL every process of the session this test started, and wait until they are gone."""
    deadline = time.monotonic() + 30
    while (members := session_members(session)) and time.monotonic() < deadline:
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    assert not session_members(session)


def test_a_killed_cli_run_resumes_to_the_same_outputs(ray_cluster, tmp_path: Path, shared_data: Path) -> None:
    """SIGKILL the whole `pipeline parse-captions` process group once a shard is out, then re-run."""
    shards = tmp_path / "shards"
    shards.mkdir()
    table = pq.read_table(shared_data / "captions" / "web_alt_text_10000.parquet", columns=["TEXT"])
    for index in range(10):
        pq.write_table(table.slice(index * 150, 150), shards / f"w{index:03d}.parquet")
    out = tmp_path / "out"
    command = [str(Path(sys.executable).parent / "pipeline"), "parse-captions", str(shards), "--out", str(out)]
    command += ["--caption-column", "TEXT", "--workers", "2"]
    # Its own session, so the kill reaches the driver and the embedded Ray it started, nothing else.
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not (out.is_dir() and any(out.glob("*.parquet"))):
            assert process.poll() is None, "the run ended before it could be killed"
            time.sleep(0.02)
    finally:
        kill_session(process.pid)
        process.wait()
    finished = sorted(path.name for path in out.glob("*.parquet"))
    assert 1 <= len(finished) < 10 and not (out / "_stats.json").exists()

    stats = run_parse_captions(
        config(shards, out, columns=CaptionColumns(caption="TEXT")), progress_stream=io.StringIO()
    )
    assert stats["shards"]["already_done"] == len(finished) and stats["shards"]["failed"] == 0
    assert not [name for name in os.listdir(out) if storage.is_temporary_name(name)]
    uninterrupted = tmp_path / "uninterrupted"
    in_process = CaptionShardWorker(
        settings=ExtractorSettings(), columns=CaptionColumns(caption="TEXT"), pipeline_name=None, batch_size=256
    )
    for index in range(10):
        name = f"w{index:03d}.parquet"
        run_shard(in_process, task_for(shards / name, uninterrupted))
        assert comparable(out / name) == comparable(uninterrupted / name), name
