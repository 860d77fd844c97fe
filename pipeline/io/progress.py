"""Plain progress lines on stderr: shards and samples done, rate, ETA.

One line per `interval_s` seconds at most (and always for the last shard), so logs of a
long cluster job stay readable, e.g.:
`[parse-captions] shards 12/40 (30%)  samples 120,000  1,043.2 samples/s  ETA 0:04:31`
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import TextIO

from pipeline.io.shard_report import ShardReport


class ProgressReporter:
    """Counts finished shards of one run and prints a progress line now and then."""

    def __init__(self, *, stage: str, total_shards: int, stream: TextIO | None = None, interval_s: float = 5.0) -> None:
        self.stage = stage
        self.total_shards = total_shards
        self.stream = stream if stream is not None else sys.stderr
        self.interval_s = interval_s
        self.shards_done = 0
        self.samples_done = 0
        self.failed = 0
        self.started = time.perf_counter()
        self._last_print = float("-inf")

    def update(self, report: ShardReport) -> None:
        self.shards_done += 1
        self.samples_done += report.samples
        self.failed += report.error is not None
        now = time.perf_counter()
        if now - self._last_print >= self.interval_s or self.shards_done == self.total_shards:
            self._last_print = now
            print(self.line(now), file=self.stream, flush=True)

    def line(self, now: float | None = None) -> str:
        elapsed = max((now if now is not None else time.perf_counter()) - self.started, 1e-9)
        rate = self.samples_done / elapsed
        percent = 100.0 * self.shards_done / self.total_shards if self.total_shards else 100.0
        remaining = self.total_shards - self.shards_done
        eta = timedelta(seconds=round(elapsed / self.shards_done * remaining)) if self.shards_done else "?"
        failed = f"  failed {self.failed}" if self.failed else ""
        return (
            f"[{self.stage}] shards {self.shards_done}/{self.total_shards} ({percent:.0f}%)  "
            f"samples {self.samples_done:,}  {rate:,.1f} samples/s  ETA {eta}{failed}"
        )
