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
    `unique_captions`, `truncated`); `skipped`: reason -> count of samples that produced
    nothing usable; `examples`: reason -> up to `MAX_EXAMPLE_KEYS` of their keys;
    `seconds`: worker time on the shard; `error`: shard-level failure (then no output exists).
    """

    shard_id: str
    input_uri: str
    output_uri: str | None
    samples: int = 0
    written: int = 0
    counters: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None

    def skip(self, reason: str, key: str) -> None:
        """Count one skipped sample under `reason`, remembering its key as an example."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        keys = self.examples.setdefault(reason, [])
        if len(keys) < MAX_EXAMPLE_KEYS:
            keys.append(key)

    def count(self, name: str, amount: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + amount

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ShardReport:
        return cls(**json.loads(text))

    @classmethod
    def failed(cls, task: ShardTask, error: str, *, seconds: float = 0.0) -> ShardReport:
        return cls(shard_id=task.shard_id, input_uri=task.input_uri, output_uri=None, seconds=seconds, error=error)
