"""What a shard worker hands back: the task it was given and the `ShardReport` it returns.

Both travel between the driver and Ray workers as JSON strings (one column of a Ray Data
row), so their fields are plain JSON types.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

MAX_EXAMPLE_KEYS = 10  # sample keys kept per skip reason, per shard and in `_stats.json`


@dataclass(frozen=True, kw_only=True)
class ShardTask:
    """One unit of work: read `input_uri` (a `kind` shard), write `output_uri` last."""

    shard_id: str
    input_uri: str
    kind: str
    output_uri: str

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ShardTask:
        return cls(**json.loads(text))


@dataclass(kw_only=True)
class ShardReport:
    """Stats of one processed shard.

    `samples`: samples read from the input; `written`: rows/samples in the output;
    `counters`: stage-specific totals (parse-captions: `parsed`, `phrases`,
    `unique_captions`, `truncated`, `tar_members`); `skipped`: reason -> count of samples that
    produced nothing usable; `examples`: reason -> up to `MAX_EXAMPLE_KEYS` of their keys;
    `members_ignored`: kind -> count of tar members that are no sample part (symlinks,
    directories, `__*__` metadata, names without an extension);
    `seconds`: worker time on the shard; `finished_at`: when its worker finished it (Unix time,
    for throughput over time in `pipeline report`); `error`: shard-level failure (then no output exists).
    """

    shard_id: str
    input_uri: str
    output_uri: str | None
    samples: int = 0
    written: int = 0
    counters: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    members_ignored: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    finished_at: float | None = None
    error: str | None = None

    def skip(self, reason: str, key: str) -> None:
        """Count one skipped sample under `reason`, remembering its key as an example."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        keys = self.examples.setdefault(reason, [])
        if len(keys) < MAX_EXAMPLE_KEYS:
            keys.append(key)

    def count(self, name: str, amount: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + amount

    def count_members(self, members: int, ignored: dict[str, int]) -> None:
        """Add a tar's member count (`tar_members`) and its ignored members by kind."""
        self.count("tar_members", members)
        for kind, amount in ignored.items():
            self.members_ignored[kind] = self.members_ignored.get(kind, 0) + amount

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def to_file_json(self) -> str:
        """`to_json` for the copy stored inside an output file: without the worker's timing and
        the output's own location, so two identical runs write byte-identical files, into the
        same folder or another (timing stays in `_stats.json`)."""
        return json.dumps({**asdict(self), "seconds": 0.0, "finished_at": None, "output_uri": None}, sort_keys=True)

    @classmethod
    def from_file_json(cls, text: str, task: ShardTask) -> ShardReport:
        """A report stored by `to_file_json`, put back at `task`'s output."""
        report = cls.from_json(text)
        report.output_uri = task.output_uri
        return report

    @classmethod
    def from_json(cls, text: str) -> ShardReport:
        return cls(**json.loads(text))

    @classmethod
    def failed(cls, task: ShardTask, error: str, *, seconds: float = 0.0) -> ShardReport:
        return cls(shard_id=task.shard_id, input_uri=task.input_uri, output_uri=None, seconds=seconds, error=error)
