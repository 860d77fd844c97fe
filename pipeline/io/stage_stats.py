"""Merging per-shard reports into the `_stats.json` every stage writes beside its outputs.

`_stats.json` keys:
* `stage`, `inputs` (as given), `out`, `started_at`/`finished_at` (UTC ISO-8601);
* `shards`: `total`, `written` (this run), `already_done` (skipped at start: outputs
  existed), `failed`, and `failed_shards` ({shard id: reason} of the first
  `MAX_FAILED_LISTED` by shard id; no output was written for them, a re-run retries them);
* `samples`, `written` and every stage counter summed over all finished shards (this run
  and earlier runs, whose reports come from `_shards.jsonl`, or from a shard's own output
  when the log lacks it);
* `skipped`: {reason: {"count": n, "examples": [keys]}} (the first keys in shard-id order);
* `members_ignored`: {kind: n}, tar members that are no sample part (`symlink`, `hardlink`,
  `directory`, `device`, `fifo`, `metadata`, `no_extension`): with `tar_members` (all of
  them) a user can reconcile a tar's contents with the samples;
* `throughput`: this run only: `seconds` (driver wall time from submitting the first task
  to the last result; Ray start-up excluded), `samples_per_s`, `startup_seconds` (until the
  first shard began: actor spawn and model load), `steady_samples_per_s` (samples over
  `seconds - startup_seconds`), `shards_per_s`, `worker_seconds` (sum over shards), `workers`;
* `settings` and `versions`: as passed by the stage.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from pipeline.io import storage
from pipeline.io.shard_report import MAX_EXAMPLE_KEYS, ShardReport

STATS_FILE = "_stats.json"


def utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


MAX_FAILED_LISTED = 1000  # failed shards named in `_stats.json` (all of them are counted)
PRINTED_FAILURES = 20  # failed shards named on stderr at the end of a run


class StageStats:
    """Running totals of one stage run's `ShardReport`s (and of earlier runs', on resume).

    Reports are summed as they come and not kept, so the driver's memory does not grow with
    the number of shards (the per-shard detail is in `_shards.jsonl`, `pipeline.io.shard_log`).
    """

    def __init__(
        self,
        *,
        stage: str,
        inputs: Sequence[str],
        out: str,
        total_shards: int,
        settings: dict[str, object],
        versions: dict[str, str],
    ) -> None:
        self.stage = stage
        self.inputs = list(inputs)
        self.out = out
        self.total_shards = total_shards
        self.settings = settings
        self.versions = versions
        self.started_at = utc_now()
        self.totals = _Totals()
        self.counted: set[str] = set()  # shard ids summed (a shard reported twice counts once)

    def add(self, report: ShardReport, *, earlier_run: bool = False) -> None:
        """Sum one shard; `earlier_run` marks shards found finished at start (no throughput)."""
        if report.shard_id in self.counted:
            return
        if report.error is None:
            self.counted.add(report.shard_id)
        self.totals.add(report.shard_id, report, earlier_run)

    def to_dict(self, *, seconds: float, workers: int, startup_seconds: float = 0.0) -> dict[str, object]:
        """The `_stats.json` content. Example keys are the first ones in shard-id order and
        failed shards are listed in shard-id order, so it does not depend on which worker
        finished first."""
        seconds = max(seconds, 1e-9)
        totals = self.totals
        failed = dict(sorted(totals.failed.items())[:MAX_FAILED_LISTED])
        return {
            "stage": self.stage,
            "inputs": self.inputs,
            "out": self.out,
            "started_at": self.started_at,
            "finished_at": utc_now(),
            "shards": {
                "total": self.total_shards,
                "written": totals.written_now,
                "already_done": totals.already_done,
                "failed": len(totals.failed),
                "failed_shards": failed,
            },
            "samples": totals.samples,
            "written": totals.written,
            **dict(sorted(totals.counters.items())),
            "skipped": {
                reason: {"count": count, "examples": [key for _, _, key in totals.examples.get(reason, [])]}
                for reason, count in sorted(totals.skipped.items())
            },
            "members_ignored": dict(sorted(totals.members_ignored.items())),
            "throughput": {
                "seconds": round(seconds, 3),
                "samples_per_s": round(totals.samples_now / seconds, 2),
                "startup_seconds": round(startup_seconds, 3),
                "steady_samples_per_s": round(totals.samples_now / max(seconds - startup_seconds, 1e-9), 2),
                "shards_per_s": round(totals.written_now / seconds, 4),
                "worker_seconds": round(totals.worker_seconds, 3),
                "workers": workers,
            },
            "settings": self.settings,
            "versions": self.versions,
        }


@dataclass
class _Totals:
    """Shard reports summed (`StageStats`); `*_now`: this run's shards only. `examples` keeps,
    per skip reason, the first `MAX_EXAMPLE_KEYS` (shard id, position, key) in shard-id order."""

    failed: dict[str, str] = field(default_factory=dict)
    written_now: int = 0
    already_done: int = 0
    samples: int = 0
    written: int = 0
    samples_now: int = 0
    worker_seconds: float = 0.0
    counters: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[tuple[str, int, str]]] = field(default_factory=dict)
    members_ignored: dict[str, int] = field(default_factory=dict)

    def add(self, shard_id: str, report: ShardReport, earlier_run: bool) -> None:
        if report.error is not None:
            self.failed[shard_id] = report.error
            return
        self.failed.pop(shard_id, None)
        if earlier_run:
            self.already_done += 1
        else:
            self.written_now += 1
            self.samples_now += report.samples
            self.worker_seconds += report.seconds
        self.samples += report.samples
        self.written += report.written
        for name, value in report.counters.items():
            self.counters[name] = self.counters.get(name, 0) + value
        for kind, value in report.members_ignored.items():
            self.members_ignored[kind] = self.members_ignored.get(kind, 0) + value
        for reason, count in report.skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + count
            keys = [(shard_id, position, key) for position, key in enumerate(report.examples.get(reason, []))]
            kept = self.examples.setdefault(reason, [])
            if keys and (len(kept) < MAX_EXAMPLE_KEYS or keys[0] < kept[-1]):
                kept.extend(keys)
                kept.sort()
                del kept[MAX_EXAMPLE_KEYS:]


def write_stats(out: str, stats: dict[str, object]) -> str:
    """Write `stats` as `{out}/_stats.json` atomically (written last by every stage); returns its URI."""
    uri = storage.join(out, STATS_FILE)
    storage.write_atomic(uri, (json.dumps(stats, indent=2, sort_keys=False) + "\n").encode("utf-8"))
    return uri


def print_summary(stats: dict[str, object], out: str, *, counts: str) -> None:
    """One closing line for a stage run (`counts` says what was made), then an error per failed shard.

    When any shard failed (after the runner's bounded retries) it ends the command with exit
    code 1 (`typer.Exit`), so a script, a Ray job or a KubeRay `RayJob` sees the run as failed
    although every other shard's output is written; a re-run retries only the failed shards.
    """
    import sys

    import typer

    shards = stats["shards"]
    throughput = stats["throughput"]
    assert isinstance(shards, dict) and isinstance(throughput, dict)
    print(
        f"{stats['stage']}: {shards['written']} shard(s) written, {shards['already_done']} already done, "
        f"{shards['failed']} failed; {counts}; {throughput['samples_per_s']:,} samples/s this run. "
        f"Stats: {out.rstrip('/')}/_stats.json"
    )
    failed = dict(shards["failed_shards"])
    # A bounded number of lines, however many shards failed (the rest are in _stats.json).
    for shard_id, reason in list(failed.items())[:PRINTED_FAILURES]:
        print(f"error: shard {shard_id} failed and has no output (re-run to retry): {reason}", file=sys.stderr)
    if failed:
        named = ", ".join(sorted(failed)[:PRINTED_FAILURES])
        more = int(shards["failed"]) - min(len(failed), PRINTED_FAILURES)
        print(
            f"error: {shards['failed']} shard(s) failed ({named}{f' and {more:,} more' if more > 0 else ''}); "
            f"every other shard is written. Reasons: failed_shards in {out.rstrip('/')}/_stats.json",
            file=sys.stderr,
        )
        raise typer.Exit(code=1)
