"""The part of a report every shard stage shares (parse-captions, pseudo-label, filter,
decontaminate): counts, skip reasons with example keys, failed shards, and throughput over
time, from `_stats.json` and the per-shard reports of `_shards.jsonl` (`pipeline.io.shard_log`).

Nothing here opens a shard: a run of 10^4 shards costs two reads and a listing."""

from __future__ import annotations

import json

from pipeline.io import storage
from pipeline.io.shard_log import LOG_FILE, PARTS_FOLDER
from pipeline.report import figures
from pipeline.report.page import details, esc, image, key_value_table, table

FAILED_LISTED = 20  # failed shards named in the report (`_stats.json` has up to 1000)
TIME_BINS = 40


def shard_reports(folder: str) -> list[dict]:
    """The per-shard reports of a stage folder: `_shards.jsonl` (merged at the end of each run)
    and the parts of a run still going or killed; the last line about a shard wins."""
    lines: list[str] = []
    merged = storage.join(folder, LOG_FILE)
    if storage.exists(merged):
        lines += storage.read_bytes(merged).decode("utf-8").splitlines()[1:]  # the first line is a header
    parts = storage.join(folder, PARTS_FOLDER)
    for name in sorted(storage.list_names(parts)):
        if name.endswith(".jsonl") and not storage.is_temporary_name(name):
            lines += storage.read_bytes(storage.join(parts, name)).decode("utf-8").splitlines()
    reports: dict[str, dict] = {}
    for line in lines:
        if line.strip():
            record = json.loads(line)
            if record.get("redo"):
                reports.pop(record["shard_id"], None)
            else:
                reports[record["shard_id"]] = record
    return list(reports.values())


def throughput_chart(reports: list[dict]) -> tuple[str, str]:
    """(chart, what it shows). With the workers' finishing times (`finished_at`): samples/s of
    the whole stage over wall time, in up to `TIME_BINS` bins of about 4 shards or more.
    Without (runs before they were recorded): each shard's own samples/s (its samples over its
    worker seconds), in shard order."""
    timed = sorted((r for r in reports if r.get("finished_at")), key=lambda r: r["finished_at"])
    if len(timed) >= 2:
        start = min(r["finished_at"] - r.get("seconds", 0.0) for r in timed)
        span = max(timed[-1]["finished_at"] - start, 1e-6)
        # About 4 shards a bin at least: with one, the bins where no worker happened to finish read
        # 0 samples/s and a steady stage draws a saw-tooth.
        count = max(2, min(TIME_BINS, len(timed) // 4))
        width = span / count
        bins = [0.0] * count
        for r in timed:
            bins[min(int((r["finished_at"] - start) / width), len(bins) - 1)] += r.get("samples", 0)
        unit, scale = ("minutes", 60.0) if span >= 120 else ("seconds", 1.0)  # short stages: readable ticks
        times = [(i + 0.5) * width / scale for i in range(len(bins))]
        chart = figures.lines({"samples/s": (times, [b / width for b in bins])}, xlabel=f"{unit} since the first shard began",
                              ylabel="samples/s (all workers)", from_zero=True)
        return chart, f"samples/s of the whole stage over time, from the finishing times of {len(timed):,} shards"
    rated = [r for r in sorted(reports, key=lambda r: r["shard_id"]) if r.get("seconds")]
    if not rated:
        return "", ""
    chart = figures.lines({"samples/s": (list(range(len(rated))), [r["samples"] / r["seconds"] for r in rated])},
                          xlabel="shard (in id order)", ylabel="samples/s of its worker")
    return chart, f"each shard's samples per worker-second, {len(rated):,} shards (no finishing times recorded)"


def counts_html(stats: dict) -> str:
    shards = stats.get("shards", {})
    listed = {"stage", "inputs", "out", "started_at", "finished_at", "shards", "skipped", "members_ignored", "throughput",
              "settings", "versions", "cluster"}
    rows = [
        ("inputs", ", ".join(map(str, stats.get("inputs", [])))),
        ("run", f"{stats.get('started_at', '?')} to {stats.get('finished_at', '?')}"),
        ("shards", f"{shards.get('total', 0):,} total: {shards.get('written', 0):,} written by the last run, "
                   f"{shards.get('already_done', 0):,} by earlier runs, {shards.get('failed', 0):,} failed"),
    ]
    rows += [(name, f"{value:,}" if isinstance(value, int) else value) for name, value in stats.items()
             if name not in listed and not isinstance(value, (dict, list))]
    rows += [(f"tar members ignored: {kind}", count) for kind, count in stats.get("members_ignored", {}).items()]
    return key_value_table(rows)


def skipped_html(stats: dict) -> str:
    skipped = stats.get("skipped", {})
    if not skipped:
        return "<p>No sample skipped.</p>"
    rows = [(reason, f"{entry['count']:,}", ", ".join(entry.get("examples", [])[:5])) for reason, entry in
            sorted(skipped.items(), key=lambda item: -item[1]["count"])]
    return "<h3>Skipped samples</h3>" + table(["reason", "samples", "examples (keys)"], rows, text_columns=(0, 2))


def failed_html(stats: dict) -> str:
    shards = stats.get("shards", {})
    failed = shards.get("failed_shards", {})
    if not shards.get("failed"):
        return "<p>No shard failed.</p>"
    rows = list(failed.items())[:FAILED_LISTED]
    more = shards["failed"] - len(rows)
    return (f'<h3 class="warn">{shards["failed"]:,} failed shards (no output; a re-run retries them)</h3>'
            + table(["shard", "reason"], rows, text_columns=(0, 1)) + (f"<p>and {more:,} more (failed_shards in _stats.json).</p>" if more > 0 else ""))


def throughput_html(stats: dict, reports: list[dict]) -> str:
    chart, caption = throughput_chart(reports)
    rows = [(name, value) for name, value in stats.get("throughput", {}).items()]
    figure = f'<div class="charts">{image(chart, "throughput over time")}</div><p>{esc(caption)}</p>' if chart else ""
    return "<h3>Throughput (the last run)</h3>" + key_value_table(rows) + figure


def shard_stage_html(stats: dict, folder: str) -> str:
    """Counts, skips, failures, throughput and settings of a shard stage's output `folder`."""
    reports = shard_reports(folder)
    settings = details("settings and versions", json.dumps({"settings": stats.get("settings"), "versions": stats.get("versions")}, indent=2))
    return counts_html(stats) + skipped_html(stats) + failed_html(stats) + throughput_html(stats, reports) + settings
