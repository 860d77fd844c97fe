"""Restarts of a training's worker group: said in one line, counted in `_stats.json`.

With `--max-failures N` (Ray Train's `FailureConfig(max_failures=N)`), a worker group that
fails (a node lost, a worker process killed, an error raised in a worker) is started again
from the run's last reported checkpoint, up to N times. Ray Train decides that on its
controller (an actor); `RestartRecorder` is a Ray Train callback running there that keeps one
record per failure in `OUT/ray/run/restarts.json`. On the driver, `RestartFollower` prints each
new record as one line as it appears, e.g.

    train-student: the worker group failed (worker 1: RuntimeError: ... Connection reset by peer ...); restarting all 2 workers from the checkpoint of step 4 (restart 1 of at most 3, --max-failures)

(printed by the driver: the controller's own output need not reach it), and the driver puts
the records in `_stats.json` (`restarts`, `restart_events`) when the run ends.
"""

from __future__ import annotations

import datetime as _dt
import json
import sys
import threading

from ray.train.v2.api.callback import UserCallback

from pipeline.io import storage
from pipeline.user_errors import first_line

RESTARTS_FILE = "restarts.json"


class RestartRecorder(UserCallback):
    """Controller-side callback: the last checkpointed step, and one record per failure."""

    def __init__(self, *, path: str, max_failures: int, workers: int, step: int | None) -> None:
        self.path, self.max_failures, self.workers = path, max_failures, workers
        self.step = step  # of the checkpoint a restart starts from (None: from the first step)
        self.events: list[dict] = []

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if checkpoint is not None and metrics and "step" in metrics[0]:
            self.step = int(metrics[0]["step"])

    def after_exception(self, run_context, worker_exceptions) -> None:
        ranks = sorted(worker_exceptions)
        error = worker_exceptions[ranks[0]]
        reason = f"{type(error).__name__}: {first_line(error)}"
        died = any(_is_lost_worker(e) for e in worker_exceptions.values())
        failure = len(self.events) + 1
        restarts = failure <= self.max_failures or self.max_failures < 0
        origin = f"the checkpoint of step {self.step}" if self.step is not None else "the first step (no checkpoint yet)"
        # A lost node often shows first as the survivors' collective error (gloo: "Connection
        # reset by peer"), before Ray reports the dead actor: name the group, then the ranks.
        what = "lost a worker" if died else "failed"
        plural = "s" if len(ranks) > 1 else ""
        limit = "no limit" if self.max_failures < 0 else f"at most {self.max_failures}"
        then = (
            f"restarting all {self.workers} workers from {origin} (restart {failure} of {limit}, --max-failures)"
            if restarts else f"no restart left (--max-failures {self.max_failures}): the run stops; continue it with --resume"
        )
        line = f"train-student: the worker group {what} (worker{plural} {', '.join(map(str, ranks))}: {reason[:200]}); {then}"
        self.events.append({
            "at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "ranks": ranks, "lost": died,
            "error": reason[:500], "from_step": self.step if restarts else None, "restarted": restarts, "line": line,
        })
        storage.write_atomic(self.path, json.dumps(self.events, indent=2).encode("utf-8"))


def _is_lost_worker(error: BaseException) -> bool:
    """A worker process or its node died (as opposed to an exception raised by training code)."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, NodeDiedError, RayActorError, WorkerCrashedError

    return isinstance(error, (ActorDiedError, ActorUnavailableError, NodeDiedError, RayActorError, WorkerCrashedError))


def read_restarts(path: str) -> list[dict]:
    """The records `RestartRecorder` wrote (none when the run never failed)."""
    try:
        return json.loads(storage.read_bytes(path)) if storage.exists(path) else []
    except (OSError, ValueError):
        return []  # being replaced: read again at the next poll


class RestartFollower:
    """Driver thread: prints each new record of `path` once (a look every `interval_s`)."""

    def __init__(self, path: str, *, interval_s: float = 2.0) -> None:
        self.path, self.interval_s = path, interval_s
        self.events: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="train-restarts", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._print_new()

    def finish(self) -> list[dict]:
        """Stop polling; returns every record (the last ones printed now)."""
        self._stop.set()
        self._thread.join()
        self._print_new()
        return self.events

    def _print_new(self) -> None:
        events = read_restarts(self.path)
        for event in events[len(self.events):]:
            print(event["line"], file=sys.stderr, flush=True)
        self.events = events if len(events) > len(self.events) else self.events
