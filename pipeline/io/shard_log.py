"""`_shards.jsonl`: the report of every finished shard, one JSON line each, beside `_stats.json`.

Why it exists: a resumed run must count the shards earlier runs finished. Reading each
finished shard's own report back (its output's metadata) costs one read per shard: at 10^5
shards on an object store, 10^5 GETs before any work. With this log a resume costs one
listing of the outputs and a few reads.

Files in the stage's output folder (`StageRun.out`):
* `_shards.jsonl`: a header line `{"merged_through": PART}` (the last part folded in), then one
  `ShardReport` JSON per finished shard, in shard-id order, without what follows from the
  shard id (`input_uri`, `output_uri`) and without empty fields (no error, no skips): the log
  is held in the driver for the run (~190 bytes a shard rather than ~340). Rewritten
  atomically (a whole new file renamed over the old one) at the end of every run that
  changed it.
* `_shards.parts/{run}-{seq}.jsonl`: while a run goes, the reports of shards finished since
  the previous part, each part written atomically every `flush_every` reports or
  `flush_seconds`. A killed run so loses at most the last few seconds of reports, and those
  shards' reports are read back from their outputs by the next run. `{"shard_id": X,
  "redo": true}` lines void what earlier runs recorded for a shard this run writes again.
  `{run}` starts with the run's start time in ns, so parts sort in the order runs began.

Reading: the merged file, then the parts named after its `merged_through`, in name order; the
last line about a shard wins. Only shards whose output exists count (the stage decides that
from its listing), so a line about a deleted output is never counted.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict

from pipeline.io import storage
from pipeline.io.shard_report import ShardReport, ShardTask

LOG_FILE = "_shards.jsonl"
PARTS_FOLDER = "_shards.parts"


class ShardLog:
    """The finished shards' reports of one output folder, as raw JSON lines by shard id."""

    def __init__(self, out: str, *, flush_every: int = 2000, flush_seconds: float = 10.0) -> None:
        self.out = out
        self.parts = storage.join(out, PARTS_FOLDER)
        self.flush_every, self.flush_seconds = flush_every, flush_seconds
        self.lines: dict[str, str] = {}  # shard id -> report JSON (raw: parsed only when counted)
        self.merged_through = ""
        self.read_parts: list[str] = []  # part names folded into `lines`, removed after a merge
        self.changed = False
        self._run = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        self._sequence = 0
        self._buffer: list[str] = []
        self._last_flush = time.monotonic()

    @classmethod
    def load(cls, out: str, **options: float) -> ShardLog:
        """The log of `out` as earlier runs left it (empty when there is none)."""
        log = cls(out, **options)  # type: ignore[arg-type]
        merged = storage.join(out, LOG_FILE)
        if storage.exists(merged):
            text = storage.read_bytes(merged).decode("utf-8").splitlines()
            header = json.loads(text[0]) if text else {}
            log.merged_through = str(header.get("merged_through", ""))
            for line in text[1:]:
                log._apply(line)
        for name in storage.list_names(log.parts):
            if storage.is_temporary_name(name):
                storage.remove(storage.join(log.parts, name))  # a part whose writer was killed
            elif name.endswith(".jsonl") and name > log.merged_through:
                for line in storage.read_bytes(storage.join(log.parts, name)).decode("utf-8").splitlines():
                    log._apply(line)
                log.read_parts.append(name)
                log.changed = True
            elif name.endswith(".jsonl"):
                log.read_parts.append(name)  # already merged: only left to remove
        return log

    def _apply(self, line: str) -> None:
        if not line.strip():
            return
        shard_id = _shard_id(line)
        if '"redo": true' in line and json.loads(line).get("redo") is True:
            self.lines.pop(shard_id, None)
        else:
            self.lines[shard_id] = line

    def report(self, task: ShardTask) -> ShardReport | None:
        """The recorded report of `task`'s shard, put at its output, or None."""
        line = self.lines.get(task.shard_id)
        if line is None:
            return None
        return ShardReport(**{**json.loads(line), "input_uri": task.input_uri, "output_uri": task.output_uri})

    def void(self, shard_ids: Iterable[str]) -> None:
        """Forget what earlier runs recorded for shards this run writes again (written to the
        next part, so a killed run never leaves an old report standing for a new output)."""
        for shard_id in shard_ids:
            if self.lines.pop(shard_id, None) is not None:
                self._buffer.append(json.dumps({"shard_id": shard_id, "redo": True}))
        self.flush()

    def record(self, report: ShardReport) -> None:
        """Add a finished shard's report; writes a part when enough have gathered."""
        line = json.dumps(
            {
                key: value for key, value in asdict(report).items()
                if key not in ("input_uri", "output_uri") and value not in (None, {})
            },
            sort_keys=True,
        )
        self.lines[report.shard_id] = line
        self._buffer.append(line)
        self.changed = True
        if len(self._buffer) >= self.flush_every or time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Write the reports gathered since the last part as one new part (atomically)."""
        self._last_flush = time.monotonic()
        if not self._buffer:
            return
        self._sequence += 1
        name = f"{self._run}-{self._sequence:06d}.jsonl"
        storage.write_atomic(storage.join(self.parts, name), ("\n".join(self._buffer) + "\n").encode("utf-8"))
        self.read_parts.append(name)
        self._buffer = []
        self.changed = True

    def merge(self, finished: Iterable[str]) -> None:
        """Rewrite `_shards.jsonl` with the reports of the `finished` shards (those whose output
        exists), then remove the parts folded into it. Nothing is written when nothing changed."""
        self.flush()
        if not self.changed:
            return
        keep = sorted(shard_id for shard_id in finished if shard_id in self.lines)
        header = json.dumps({"merged_through": max(self.read_parts, default=self.merged_through)})
        # Streamed: the whole file at once would be two more copies of the log (str, bytes),
        # ~70 MB of the driver's peak at 10^5 shards.
        with storage.atomic_writer(storage.join(self.out, LOG_FILE)) as stream:
            stream.write(header.encode("utf-8") + b"\n")
            for shard_id in keep:
                stream.write(self.lines[shard_id].encode("utf-8") + b"\n")
        for name in self.read_parts:
            storage.remove(storage.join(self.parts, name))
        self.read_parts = []
        self.changed = False
        location = storage.resolve(self.parts)
        if location.is_local and location.fs.isdir(location.path) and not location.fs.ls(location.path):
            location.fs.rmdir(location.path)  # only finished jobs' folders: no empty folder left


def _shard_id(line: str) -> str:
    return str(json.loads(line)["shard_id"])
