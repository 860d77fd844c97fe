"""parse-captions: shard reading, the per-shard worker, planning/resume, Ray runs and the CLI.

Shards are real files built in tmp_path from the real captions of ../shared/data (COCO
captions, CC3M, raw web alt-text) and a real COCO image; spaCy is the real pipeline.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from nlp.cleaning import clean_caption
from nlp.phrases import ExtractorSettings
from pipeline.io import storage
from pipeline.io.phrases_file import PHRASES_SCHEMA, read_phrases_file, read_phrases_metadata
from pipeline.io.shard_report import ShardTask
from pipeline.io.shards import CaptionColumns, ShardReadError, discover_shards, read_caption_records, shard_id_of
from pipeline.stages.parse_captions import CaptionShardWorker, ParseCaptionsConfig, read_done_report, run_parse_captions
from pipeline.stages.stage import plan_shards, run_shard

BAD_CAPTIONS: dict[str, bytes] = {
    "bad_empty": b"",
    "bad_space": b"   \n\t ",
    "bad_latin1": "caf\u00e9 and a croissant".encode("latin-1"),
    "bad_control": b"\x00\x01\x02",
    "bad_entities": b"A dog &amp; a cat on a <b>sofa</b>\x07.",
    "bad_huge": b"a red bus on the street " * 45_000,
}


# --- building real shards ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def captions(shared_data: Path) -> list[str]:
    coco = json.loads((shared_data / "captions" / "coco_captions_val2017.json").read_text())["annotations"]
    with open(shared_data / "captions" / "cc3m_validation.tsv", encoding="utf-8") as handle:
        cc3m = [row[0] for _, row in zip(range(60), csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))]
    web = pq.read_table(shared_data / "captions" / "web_alt_text_10000.parquet").column("TEXT").to_pylist()[:60]
    return [annotation["caption"] for annotation in coco[:60]] + cc3m + web


@pytest.fixture(scope="module")
def image_bytes(shared_data: Path) -> bytes:
    return sorted((shared_data / "coco_mini" / "train2017").glob("*.jpg"))[0].read_bytes()


def add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def write_tar(path: Path, captions: list[str], image: bytes, *, prefix: str, bad: bool = False) -> list[str]:
    """An img2dataset-style shard: {key}.jpg, {key}.txt, {key}.json per sample; returns the keys."""
    keys = []
    with tarfile.open(path, "w") as archive:
        add_member(archive, "__meta__.json", b"{}")  # webdataset skips __*__ members
        for index, caption in enumerate(captions):
            key = f"{prefix}{index:05d}"
            keys.append(key)
            add_member(archive, f"{key}.jpg", image)
            add_member(archive, f"{key}.txt", caption.encode("utf-8"))
            add_member(archive, f"{key}.json", json.dumps({"key": key, "caption": caption}).encode())
        if bad:
            for key, data in BAD_CAPTIONS.items():
                keys.append(key)
                add_member(archive, f"{key}.jpg", image)
                add_member(archive, f"{key}.txt", data)
            keys += ["json_only", "no_caption"]
            add_member(archive, "json_only.json", json.dumps({"caption": "A giraffe next to a tall tree"}).encode())
            add_member(archive, "no_caption.jpg", image)
    return keys


def write_parquet(
    path: Path, captions: list[object], *, key_column: str | None = "key", caption_column: str = "caption"
) -> None:
    columns: dict[str, list[object]] = {caption_column: captions}
    if key_column:
        columns[key_column] = [f"p{index:04d}" for index in range(len(captions))]
    pq.write_table(pa.table(columns), path)


@pytest.fixture()
def shard_folder(tmp_path: Path, captions: list[str], image_bytes: bytes) -> Path:
    """Three shards: two tars (one with every bad-input kind) and one Parquet file."""
    folder = tmp_path / "shards"
    folder.mkdir()
    write_tar(folder / "00000.tar", captions[:70], image_bytes, prefix="a", bad=True)
    write_tar(folder / "00001.tar", captions[70:130] + captions[70:90], image_bytes, prefix="b")  # repeats
    write_parquet(folder / "00002.parquet", list(captions[130:]) + [None])
    return folder


def worker(**overrides: object) -> CaptionShardWorker:
    return CaptionShardWorker(
        settings=ExtractorSettings.for_mode("noun-chunks", **overrides),  # type: ignore[arg-type]
        columns=CaptionColumns(),
        pipeline_name=None,
        batch_size=64,
    )


def task_for(shard_path: Path, out: Path) -> ShardTask:
    (shard,) = discover_shards([str(shard_path)])
    return ShardTask(
        shard_id=shard.shard_id, input_uri=shard.uri, kind=shard.kind, output_uri=str(out / f"{shard.shard_id}.parquet")
    )


def comparable(path: Path) -> tuple[list[dict], dict[str, str], dict]:
    """Rows, metadata and report of an output, without the timing that differs between runs."""
    table = read_phrases_file(str(path))
    metadata = read_phrases_metadata(str(path))
    report = json.loads(metadata.pop("shard_report"))
    report.pop("seconds")
    report.pop("output_uri")  # the runs compared write to different folders
    return table.to_pylist(), metadata, report


# --- reading shards ---------------------------------------------------------------------------


def test_tar_samples_are_grouped_by_key_with_json_fallback(
    tmp_path: Path, captions: list[str], image_bytes: bytes
) -> None:
    keys = write_tar(tmp_path / "00000.tar", captions[:5], image_bytes, prefix="k", bad=True)
    (shard,) = discover_shards([str(tmp_path / "00000.tar")])
    records = read_caption_records(shard)
    assert [record.key for record in records] == keys
    assert records[0].caption == captions[0].encode("utf-8")  # raw bytes: decoding is the cleaner's job
    by_key = {record.key: record.caption for record in records}
    assert by_key["json_only"] == "A giraffe next to a tall tree"
    assert by_key["no_caption"] is None
    assert by_key["bad_latin1"] == BAD_CAPTIONS["bad_latin1"]


def test_broken_tar_is_reported_and_yields_no_output(tmp_path: Path, captions: list[str], image_bytes: bytes) -> None:
    write_tar(tmp_path / "whole.tar", captions[:20], image_bytes, prefix="k")
    data = (tmp_path / "whole.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2 + 100])
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar file at all" * 50)
    out = tmp_path / "out"
    for name in ("cut.tar", "junk.tar"):
        (shard,) = discover_shards([str(tmp_path / name)])
        with pytest.raises(ShardReadError, match=name):
            read_caption_records(shard)
        report = run_shard(worker(), task_for(tmp_path / name, out))
        assert report.error is not None and name in report.error and report.output_uri is None
    assert not out.exists() or not any(out.iterdir())


def test_parquet_columns_keys_and_errors(tmp_path: Path, captions: list[str]) -> None:
    write_parquet(tmp_path / "keyed.parquet", captions[:3])
    write_parquet(tmp_path / "web.parquet", captions[:3], key_column=None, caption_column="TEXT")
    keyed = read_caption_records(discover_shards([str(tmp_path / "keyed.parquet")])[0])
    assert [record.key for record in keyed] == ["p0000", "p0001", "p0002"]
    (web,) = discover_shards([str(tmp_path / "web.parquet")])
    derived = read_caption_records(web, columns=CaptionColumns(caption="TEXT"))
    assert [record.key for record in derived] == ["web_000000000", "web_000000001", "web_000000002"]
    assert derived[1].caption == captions[1]
    with pytest.raises(ShardReadError, match="no caption column 'caption'.*TEXT"):
        read_caption_records(web)
    with pytest.raises(ShardReadError, match="no key column 'id'"):
        read_caption_records(web, columns=CaptionColumns(caption="TEXT", key="id"))
    # A caption column of the wrong type: every row is an error row, the shard still completes.
    pq.write_table(pa.table({"key": ["x", "y"], "caption": [3, 4]}), tmp_path / "ints.parquet")
    report = run_shard(worker(), task_for(tmp_path / "ints.parquet", tmp_path / "out"))
    assert report.error is None and report.skipped == {"not_text": 2}
    rows = read_phrases_file(str(tmp_path / "out" / "ints.parquet")).to_pylist()
    assert rows == [{"key": key, "caption": None, "phrases": [], "error": "not_text"} for key in ("x", "y")]


def test_shard_ids_and_duplicate_outputs(tmp_path: Path) -> None:
    assert shard_id_of("s3://b/x/00042.tar") == "00042" and shard_id_of("/a/00042.tar.gz") == "00042"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_parquet(tmp_path / "a" / "00000.parquet", ["a cat"])
    write_parquet(tmp_path / "b" / "00000.parquet", ["a dog"])
    with pytest.raises(ValueError, match="same id '00000'"):
        discover_shards([str(tmp_path / "a"), str(tmp_path / "b")])


# --- one shard, no Ray --------------------------------------------------------------------------


def test_shard_round_trip(shard_folder: Path, tmp_path: Path, captions: list[str]) -> None:
    out = tmp_path / "phrases"
    task = task_for(shard_folder / "00000.tar", out)
    report = run_shard(worker(), task)
    assert report.error is None
    table = read_phrases_file(task.output_uri)
    assert table.schema.remove_metadata() == PHRASES_SCHEMA
    rows = {row["key"]: row for row in table.to_pylist()}
    assert list(rows) == [record.key for record in read_caption_records(discover_shards([task.input_uri])[0])]
    for row in rows.values():
        for phrase in row["phrases"]:
            assert row["caption"][phrase["start"] : phrase["end"]] == phrase["text"]
    assert rows["a00000"]["caption"] == captions[0] and rows["a00000"]["error"] is None
    assert [phrase["text"] for phrase in rows["json_only"]["phrases"]] == ["A giraffe", "a tall tree"]
    errors = {key: rows[key]["error"] for key in rows if rows[key]["error"]}
    assert errors == {
        "bad_empty": "empty",
        "bad_space": "empty",
        "bad_latin1": "invalid_utf8",
        "bad_control": "empty",
        "no_caption": "missing",
    }
    assert rows["bad_latin1"]["caption"] == "caf\ufffd and a croissant" and rows["no_caption"]["caption"] is None
    assert [phrase["text"] for phrase in rows["bad_entities"]["phrases"]] == ["A dog", "a cat", "a sofa"]
    assert rows["bad_huge"]["error"] is None and len(rows["bad_huge"]["caption"]) <= 1024

    assert report.samples == report.written == len(rows)
    assert report.counters["truncated"] == 1
    assert report.counters["parsed"] == len(rows) - len(errors)
    assert report.counters["phrases"] == sum(len(row["phrases"]) for row in rows.values())
    assert report.skipped["empty"] == 3 and report.examples["invalid_utf8"] == ["bad_latin1"]
    metadata = read_phrases_metadata(task.output_uri)
    assert metadata["stage"] == "parse-captions" and metadata["source_shard"] == task.input_uri
    assert metadata["spacy_pipeline_version"] == "3.8.0"
    assert json.loads(metadata["extractor_settings"])["mode"] == "noun-chunks"
    stored = read_done_report(task)
    assert stored.counters == report.counters and stored.skipped == report.skipped


def test_repeated_captions_in_a_shard_are_parsed_once(shard_folder: Path, tmp_path: Path, captions: list[str]) -> None:
    report = run_shard(worker(), task_for(shard_folder / "00001.tar", tmp_path / "out"))
    assert report.samples == 80  # 60 captions, then 20 of them again
    distinct = {clean_caption(caption).text for caption in captions[70:130] + captions[70:90]}
    assert report.counters["unique_captions"] == len(distinct) <= 80 - 20


def test_plan_skips_done_shards_removes_temporaries_and_protects_inputs(shard_folder: Path, tmp_path: Path) -> None:
    shards = discover_shards([str(shard_folder)])
    out = tmp_path / "out"
    out.mkdir()
    (out / "00001.parquet").write_bytes(b"done before")
    stray = out / storage.temporary_name("00002.parquet")
    stray.write_bytes(b"half written")
    plan = plan_shards(shards, out=str(out), suffix=".parquet", overwrite=False)
    assert [task.shard_id for task in plan.pending] == ["00000", "00002"]
    assert [task.shard_id for task in plan.done] == ["00001"]
    assert not stray.exists()
    assert len(plan_shards(shards, out=str(out), suffix=".parquet", overwrite=True).pending) == 3
    with pytest.raises(ValueError, match="overwrite an input"):
        plan_shards(shards, out=str(shard_folder), suffix=".parquet", overwrite=False)


def test_cli_missing_input_exits_non_zero_with_the_path(tmp_path: Path) -> None:
    from pipeline.cli import app

    missing = str(tmp_path / "no_such_shards")
    result = CliRunner().invoke(app, ["parse-captions", missing, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "input not found" in result.output and missing in result.output


# --- on Ray -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    """One embedded 2-CPU Ray for every Ray test of this module, stopped at the end."""
    from pipeline.cluster import init_ray, shutdown_ray

    started = init_ray(None, num_cpus=2)
    yield
    shutdown_ray(started)


def config(shards: Path | list[str], out: Path, **overrides: object) -> ParseCaptionsConfig:
    inputs = tuple(shards) if isinstance(shards, list) else (str(shards),)
    return ParseCaptionsConfig(inputs=inputs, out=str(out), workers=2, **overrides)  # type: ignore[arg-type]


def test_two_worker_ray_run_matches_the_in_process_worker(ray_cluster, shard_folder: Path, tmp_path: Path) -> None:
    progress = io.StringIO()
    stats = run_parse_captions(config(shard_folder, tmp_path / "ray"), progress_stream=progress)
    local = tmp_path / "local"
    in_process = worker()
    for name in ("00000.tar", "00001.tar", "00002.parquet"):
        run_shard(in_process, task_for(shard_folder / name, local))
    for shard_id in ("00000", "00001", "00002"):
        assert comparable(tmp_path / "ray" / f"{shard_id}.parquet") == comparable(local / f"{shard_id}.parquet")
    assert stats["shards"] == {"total": 3, "written": 3, "already_done": 0, "failed": 0, "failed_shards": {}}
    assert stats["throughput"]["workers"] == 2 and stats["throughput"]["samples_per_s"] > 0
    assert stats["samples"] == 78 + 80 + 51
    assert sorted(stats["skipped"]["missing"]["examples"]) == ["no_caption", "p0050"]
    assert stats["skipped"]["invalid_utf8"] == {"count": 1, "examples": ["bad_latin1"]}
    assert stats["versions"]["spacy_pipeline_version"] == "3.8.0"
    assert json.loads((tmp_path / "ray" / "_stats.json").read_text()) == stats
    assert "[parse-captions] shards 3/3 (100%)" in progress.getvalue()


def test_cli_on_real_web_parquet(ray_cluster, tmp_path: Path, shared_data: Path) -> None:
    from pipeline.cli import app

    web = tmp_path / "web"
    web.mkdir()
    table = pq.read_table(shared_data / "captions" / "web_alt_text_10000.parquet", columns=["URL", "TEXT"])
    for index in range(2):
        pq.write_table(table.slice(index * 300, 300), web / f"web_{index:05d}.parquet")
    out = tmp_path / "phrases"
    args = ["parse-captions", str(web / "*.parquet"), "--out", str(out), "--caption-column", "TEXT", "--workers", "2"]
    result = CliRunner().invoke(app, [*args, "--mode", "ngrams", "--ngram-max", "2"])
    assert result.exit_code == 0, result.output
    assert "2 shard(s) written" in result.output
    stats = json.loads((out / "_stats.json").read_text())
    assert stats["samples"] == 600 and stats["settings"]["extractor"]["ngram_max"] == 2
    assert stats["settings"]["extractor"]["drop_non_visual"] is False
    rows = read_phrases_file(str(out / "web_00001.parquet")).to_pylist()
    assert rows[0]["key"] == "web_00001_000000000"
    assert all(row["caption"][p["start"] : p["end"]] == p["text"] for row in rows for p in row["phrases"])
