"""`OUT/demo_state.json`: the demo's settings and the result of every stage it finished, so that
`pipeline demo --resume` goes on at the round and stage where a killed run stopped.

A finished stage is skipped and its recorded result (and time) reused. The stage that was
running when the run died runs again, and resumes its own work as every stage does (shards
with outputs are skipped; a training run with a checkpoint continues from it). The file is
rewritten atomically after each stage, so it never names a stage whose outputs are not
complete. Every setting but `--rounds` must be the interrupted run's: raising `--rounds` on a
finished run adds rounds to it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

STATE_FILE = "demo_state.json"


class DemoResumeError(ValueError):
    """`--resume` of a folder that holds no demo, or with other settings (one line)."""


class DemoState:
    def __init__(self, out: Path, settings: dict, *, resume: bool) -> None:
        self.path = Path(out) / STATE_FILE
        self.settings = _plain(settings)
        self.stages: dict[str, dict] = {}
        if resume:
            if not self.path.is_file():
                raise DemoResumeError(f"--resume: {self.path} not found: {out} holds no demo run to resume")
            saved = json.loads(self.path.read_text())
            differ = sorted(k for k in self.settings.keys() | saved["settings"].keys() if self.settings.get(k) != saved["settings"].get(k))
            if differ:
                raise DemoResumeError(
                    f"--resume: {', '.join(differ)} differ from the interrupted run's ({self.path}); give the same options, or a new --out"
                )
            self.stages = saved["stages"]
        self._write()

    def run(self, name: str, progress, work: Callable[[], object]):
        """The result of stage `name`: recorded, or computed now by `work()` and recorded.
        Results are JSON values: the same whether computed or read back."""
        if name in self.stages:
            progress.skip(name, self.stages[name]["seconds"])
            return self.stages[name]["result"]
        progress.begin(name)
        started = time.perf_counter()
        result = _plain(work())
        self.stages[name] = {"result": result, "seconds": round(time.perf_counter() - started, 2)}
        self._write()
        return result

    def _write(self) -> None:
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text(json.dumps({"settings": self.settings, "stages": self.stages}, indent=1))
        os.replace(temporary, self.path)


def _plain(value):
    return json.loads(json.dumps(value))
