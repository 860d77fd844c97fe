"""The shard log (`_shards.jsonl`): a resumed run counts earlier shards from it, not from their
outputs; a killed run's parts are folded in; a shard the log lacks is read back from its output;
a shard redone with --overwrite never keeps its old report. Real parse-captions runs on Ray."""

from __future__ import annotations

import io
import json
from pathlib import Path

from pipeline.io import storage
from pipeline.io.shard_log import LOG_FILE, PARTS_FOLDER, ShardLog
from pipeline.io.shard_report import ShardReport, ShardTask
from pipeline.stages.parse_captions import run_parse_captions
from pipeline.stages.stage import block_count, run_shard
from tests.test_parse_captions import (  # noqa: F401  (fixtures are used by name)
    captions,
    config,
    image_bytes,
    ray_cluster,
    shard_folder,
    task_for,
    worker,
)

COUNTED = ("samples", "written", "parsed", "phrases", "unique_captions", "truncated", "skipped", "members_ignored")


def _report(shard_id: str, samples: int) -> ShardReport:
    return ShardReport(shard_id=shard_id, input_uri=f"in/{shard_id}.tar", output_uri=None, samples=samples, written=samples)


def _task(shard_id: str, out: Path) -> ShardTask:
    return ShardTask(shard_id=shard_id, input_uri=f"in/{shard_id}.tar", kind="webdataset", output_uri=str(out / f"{shard_id}.x"))


def test_parts_are_folded_voided_and_merged(tmp_path: Path) -> None:
    log = ShardLog(str(tmp_path), flush_every=2)
    for shard_id, samples in (("a", 1), ("b", 2), ("c", 3)):
        log.record(_report(shard_id, samples))
    log.flush()
    assert len(list((tmp_path / PARTS_FOLDER).iterdir())) == 2  # flushed after 2 reports, then the rest
    (tmp_path / PARTS_FOLDER / storage.temporary_name("x.jsonl")).write_text("half a part")  # a killed writer's

    again = ShardLog.load(str(tmp_path))
    assert again.report(_task("b", tmp_path)).samples == 2
    assert again.report(_task("b", tmp_path)).output_uri == str(tmp_path / "b.x")
    again.void(["b"])  # redone by this run: its old report must not survive a kill
    assert ShardLog.load(str(tmp_path)).report(_task("b", tmp_path)) is None

    latest = ShardLog.load(str(tmp_path))
    latest.merge(["a", "b", "c"])  # "b" has no report, "c" its old one
    lines = (tmp_path / LOG_FILE).read_text().splitlines()
    assert [json.loads(line)["shard_id"] for line in lines[1:]] == ["a", "c"]
    # Held in the driver for the whole run: nothing the task gives back, no empty field.
    assert set(json.loads(lines[2])) == {"shard_id", "samples", "written", "seconds"}, lines[2]
    assert not (tmp_path / PARTS_FOLDER).exists()
    restored = ShardLog.load(str(tmp_path)).report(_task("c", tmp_path))
    assert (restored.samples, restored.input_uri, restored.error, restored.skipped) == (3, "in/c.tar", None, {})


def test_block_count_shares_blocks_only_when_every_worker_keeps_many() -> None:
    assert block_count(10, workers=2, max_shards_per_block=16) == 10
    assert block_count(100, workers=2, max_shards_per_block=16) == 34  # 3 shards a block: still 17 blocks a worker
    assert block_count(1000, workers=2, max_shards_per_block=16) == 63  # 16 shards a block, ~31 blocks a worker
    assert block_count(100_000, workers=2, max_shards_per_block=16) == 6250


def test_resume_reads_the_log_not_the_outputs(shard_folder: Path, tmp_path: Path) -> None:
    """Outputs made by the stage's own worker in this process: with every shard done, a run
    starts no Ray, so this is the resume path alone."""
    out = tmp_path / "out"
    in_process = worker()
    reports = [run_shard(in_process, task_for(path, out)) for path in sorted(shard_folder.iterdir())]
    assert not (out / LOG_FILE).exists()

    # No log (a job written before logs existed, or by a run killed before its part): each
    # shard's own report is read back, and the log is written.
    first = run_parse_captions(config(shard_folder, out), progress_stream=io.StringIO())
    assert first["shards"]["already_done"] == 3 and first["samples"] == sum(r.samples for r in reports)
    assert sorted(p.name for p in out.iterdir()) == ["00000.parquet", "00001.parquet", "00002.parquet", LOG_FILE, "_stats.json"]
    lines = (out / LOG_FILE).read_text().splitlines()
    assert [json.loads(line)["shard_id"] for line in lines[1:]] == ["00000", "00001", "00002"]

    # Outputs the resume would fail to read: their names say "done", their bytes are not Parquet.
    for path in out.glob("*.parquet"):
        path.write_bytes(b"not parquet")
    resumed = run_parse_captions(config(shard_folder, out), progress_stream=io.StringIO())
    assert resumed["shards"]["already_done"] == 3 and resumed["shards"]["failed"] == 0
    for key in COUNTED:
        assert resumed[key] == first[key], key
    assert (out / LOG_FILE).read_text().splitlines() == lines  # nothing changed: not rewritten

    # A deleted output is pending again: the log no longer counts it (Ray would redo it; here
    # its line is gone after a run that voids it).
    log = ShardLog.load(str(out))
    log.void(["00001"])
    log.merge(["00000", "00002"])
    assert [json.loads(line)["shard_id"] for line in (out / LOG_FILE).read_text().splitlines()[1:]] == ["00000", "00002"]


def test_overwrite_replaces_reports_and_a_killed_runs_parts_count(ray_cluster, shard_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = run_parse_captions(config(shard_folder, out), progress_stream=io.StringIO())
    # A killed run: its log part was written, the merged log not yet.
    log = ShardLog.load(str(out))
    part = ShardLog(str(out))
    (out / LOG_FILE).unlink()
    for shard_id, line in log.lines.items():
        part.record(ShardReport(**json.loads(line), input_uri="", output_uri=None))  # a log line names neither
    part.flush()
    assert run_parse_captions(config(shard_folder, out), progress_stream=io.StringIO())["samples"] == first["samples"]
    assert not (out / PARTS_FOLDER).exists() and (out / LOG_FILE).exists()

    # --overwrite with an extractor that keeps other phrases: the log holds the new reports.
    from nlp.phrases import ExtractorSettings

    redo = run_parse_captions(
        config(shard_folder, out, overwrite=True, settings=ExtractorSettings.for_mode("ngrams")), progress_stream=io.StringIO()
    )
    assert redo["phrases"] != first["phrases"]
    again = run_parse_captions(config(shard_folder, out), progress_stream=io.StringIO())
    assert again["shards"]["already_done"] == 3 and again["phrases"] == redo["phrases"]
