"""What happens to the cluster under a running stage: nodes lost and joined, shards re-run.

Ray Data already carries a stage through a lost worker or node (its actors restart elsewhere
and the lost shards run again; a shard's output only gets its final name when complete, so
nothing is written twice). What it does not do is say so: the user saw raylet state dumps
and "Task ... failed. There are infinite retries remaining", and `_stats.json` said nothing.
`ClusterWatch` turns that into one line per event on the progress stream, e.g.

    [parse-captions] lost node 5f3e2a1b (127.0.0.1): 1 shard(s) in progress there run again elsewhere (00007); 1 node(s) can run workers
    [parse-captions] node 9a8b7c6d (127.0.0.1, 1 CPU) joined: workers start there
    [parse-captions] shard 00003 runs again: its worker on node 5f3e2a1b died mid-shard

and into the `cluster` section of `_stats.json` (`nodes_lost`, `nodes_added`,
`workers_lost`, `shards_rerun`, `shards_by_node`, `events`).

How it knows, cheaply: a thread of the driver polls `ray.nodes()` (one GCS call) once per
`poll_s`; each shard actor tells a small `ShardLedger` actor (no CPU, pinned to the driver's
node) which shard it starts on which node, fire-and-forget. A shard started more often than
the driver submitted it was re-run because its worker or node was lost.

When no node can run a worker (every worker node gone) for `PIPELINE_NODE_WAIT_S` seconds
(default 300: time for an autoscaler or an operator to bring one back), the stage stops with
one error (`NoWorkerNodes`); every shard already written stays, temporaries of shards in
flight are removed, and a re-run of the same command does the rest.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TextIO, TypeVar

from pipeline.io import storage
from pipeline.io.shard_report import ShardReport
from pipeline.user_errors import RunAborted

NODE_WAIT_ENV = "PIPELINE_NODE_WAIT_S"
DEFAULT_NODE_WAIT_S = 300.0
MAX_EVENTS = 100  # event lines kept in `_stats.json` (all are printed)

Item = TypeVar("Item")


class NoWorkerNodes(RunAborted):
    """No node of the cluster could run a worker for longer than the node wait."""


def node_wait_seconds() -> float:
    """The wait for a usable node: `$PIPELINE_NODE_WAIT_S` or 300 s."""
    value = os.environ.get(NODE_WAIT_ENV, "")
    try:
        return float(value) if value.strip() else DEFAULT_NODE_WAIT_S
    except ValueError:
        raise ValueError(f"{NODE_WAIT_ENV}={value!r}: expected a number of seconds") from None


class ShardLedger:
    """Ray actor: (shard id, node id, actor id) of every shard start, taken by the driver in batches."""

    def __init__(self) -> None:
        self.starts: list[tuple[str, str, str]] = []

    def started(self, shard_id: str, node_id: str, actor_id: str) -> None:
        self.starts.append((shard_id, node_id, actor_id))

    def take(self) -> list[tuple[str, str, str]]:
        starts, self.starts = self.starts, []
        return starts


class StartNotifier:
    """Held by each shard actor: tells the ledger (if any) that this actor starts a shard."""

    def __init__(self, ledger) -> None:
        import ray

        self.ledger = ledger
        context = ray.get_runtime_context()
        self.node_id, self.actor_id = context.get_node_id(), context.get_actor_id() or ""

    def started(self, shard_id: str) -> None:
        if self.ledger is not None:
            self.ledger.started.remote(shard_id, self.node_id, self.actor_id)  # fire-and-forget


def short(node_id: str) -> str:
    return node_id[:8]


@dataclass
class _Node:
    address: str
    cpus: float
    gpus: float


@dataclass
class _Counts:
    nodes_seen: int = 0
    nodes_lost: int = 0
    nodes_added: int = 0
    workers_lost: int = 0
    shards_rerun: int = 0
    events: list[str] = field(default_factory=list)


class ClusterWatch:
    """Polls the cluster while a stage runs; use as a context manager around the shard passes.

    `need_cpus`/`need_gpus`: what one worker asks for (a node with less cannot run one).
    """

    def __init__(
        self, *, stage: str, need_cpus: float, need_gpus: float, stream: TextIO | None = None,
        node_wait_s: float | None = None, poll_s: float = 1.0, cleanup: Sequence[str] = (),
    ) -> None:
        self.stage, self.need_cpus, self.need_gpus = stage, need_cpus, need_gpus
        self.stream = stream if stream is not None else sys.stderr
        self.node_wait_s = node_wait_seconds() if node_wait_s is None else node_wait_s
        self.poll_s, self.cleanup = poll_s, tuple(cleanup)
        self.counts = _Counts()
        self.ledger = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._alive: dict[str, _Node] = {}
        self._lost: set[str] = set()
        self._expected: dict[str, int] = {}  # shard -> passes the driver submitted it in
        self._starts: dict[str, list[tuple[str, str]]] = {}  # shard -> [(node, actor)] in start order
        self._reported: set[str] = set()
        self._unusable_since: float | None = None
        self.fatal: str | None = None

    # -- life cycle ------------------------------------------------------------------------

    def __enter__(self) -> ClusterWatch:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self._alive = self._poll_nodes()
        self.counts.nodes_seen = len(self._alive)
        here = ray.get_runtime_context().get_node_id()
        # On the driver's node: if that node goes, the driver goes with it anyway.
        self.ledger = ray.remote(num_cpus=0, max_restarts=0)(ShardLedger).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False)
        ).remote()
        self._thread = threading.Thread(target=self._watch, name=f"{self.stage}-cluster-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        import ray

        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if exc_info[0] is None:
            # The last starts (for shards_by_node), and the nodes once more: a node whose loss
            # held the stage up (a shard in flight there) is dead in the GCS by now, maybe not
            # yet polled.
            self._tick(nodes=True)
        if self.ledger is not None:
            ray.kill(self.ledger)

    # -- what the driver tells the watch ----------------------------------------------------

    def submitting(self, shard_ids: Iterable[str]) -> None:
        """These shards are submitted (again, on a retry pass): their next start is expected."""
        with self._lock:
            for shard_id in shard_ids:
                self._expected[shard_id] = self._expected.get(shard_id, 0) + 1
                self._reported.discard(shard_id)

    def follow(self, reports: Iterator[ShardReport]) -> Iterator[ShardReport]:
        """`reports` as they come, noting each shard done; raises `NoWorkerNodes` when no
        node could run a worker for the node wait (the iterator would wait forever)."""
        inbox: queue.Queue = queue.Queue()
        done, stop = object(), threading.Event()

        def pump() -> None:
            try:
                for report in reports:
                    if stop.is_set():
                        # Abandoned: closing the generator shuts Ray Data's executor down, so
                        # it does not take up the stage again when nodes come back.
                        getattr(reports, "close", lambda: None)()
                        return
                    inbox.put(report)
                inbox.put(done)
            except BaseException as error:  # noqa: BLE001 - handed to the consumer, raised there
                inbox.put(error)

        threading.Thread(target=pump, name=f"{self.stage}-reports", daemon=True).start()
        try:
            while True:
                try:
                    item = inbox.get(timeout=0.5)
                except queue.Empty:
                    if self.fatal is not None:
                        self._abort()
                    continue
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                with self._lock:
                    self._reported.add(item.shard_id)
                yield item
        finally:
            stop.set()

    def summary(self) -> dict[str, object]:
        """The `cluster` section of `_stats.json`."""
        with self._lock:
            by_node: dict[str, int] = {}
            for shard_id in self._reported:
                starts = self._starts.get(shard_id)
                if starts:
                    node = short(starts[-1][0])
                    by_node[node] = by_node.get(node, 0) + 1
            counts = self.counts
            return {
                "nodes_seen": counts.nodes_seen,
                "nodes_lost": counts.nodes_lost,
                "nodes_added": counts.nodes_added,
                "workers_lost": counts.workers_lost,
                "shards_rerun": counts.shards_rerun,
                "shards_by_node": dict(sorted(by_node.items())),
                "node_wait_s": self.node_wait_s,
                "events": list(counts.events),
            }

    # -- the polling thread -----------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self._tick(nodes=True)
            except Exception as error:  # noqa: BLE001 - a missed poll is retried; the stage goes on
                if self._stop.is_set():
                    return
                self._say(f"could not poll the cluster ({type(error).__name__}: {error}); trying again")

    def _tick(self, *, nodes: bool) -> None:
        import ray

        if nodes:
            self._nodes_changed(self._poll_nodes())
        if self.ledger is not None:
            self._shards_started(ray.get(self.ledger.take.remote(), timeout=60))

    def _poll_nodes(self) -> dict[str, _Node]:
        import ray

        alive = {}
        for node in ray.nodes():
            if node.get("Alive"):
                resources = node.get("Resources") or {}
                alive[node["NodeID"]] = _Node(
                    address=str(node.get("NodeManagerAddress", "?")),
                    cpus=float(resources.get("CPU", 0.0)),
                    gpus=float(resources.get("GPU", 0.0)),
                )
        return alive

    def _usable(self, node: _Node) -> bool:
        return node.cpus >= self.need_cpus and node.gpus >= self.need_gpus

    def _nodes_changed(self, alive: dict[str, _Node]) -> None:
        with self._lock:
            gone = [node_id for node_id in self._alive if node_id not in alive]
            joined = [node_id for node_id in alive if node_id not in self._alive and node_id not in self._lost]
            previous, self._alive = self._alive, alive
            usable = sum(self._usable(node) for node in alive.values())
            for node_id in gone:
                self._lost.add(node_id)
                self.counts.nodes_lost += 1
                in_flight = sorted(
                    shard_id for shard_id, starts in self._starts.items()
                    if starts[-1][0] == node_id and shard_id not in self._reported
                )
                actors = {actor for starts in self._starts.values() for node, actor in starts if node == node_id}
                self.counts.workers_lost += len(actors)
                listed = f" ({', '.join(in_flight[:5])}{', ...' if len(in_flight) > 5 else ''})" if in_flight else ""
                self._say(
                    f"lost node {short(node_id)} ({previous[node_id].address}): {len(in_flight)} shard(s) in progress there "
                    f"run again elsewhere{listed}; {usable} node(s) can run workers"
                )
            for node_id in joined:
                node = alive[node_id]
                self.counts.nodes_added += 1
                what = "workers start there" if self._usable(node) else "too small for a worker"
                self._say(f"node {short(node_id)} ({node.address}, {node.cpus:g} CPU) joined: {what}")
            if usable:
                self._unusable_since = None
            elif self._unusable_since is None:
                self._unusable_since = time.monotonic()
                self._say(
                    f"no node can run a worker ({self.need_cpus:g} CPU{f', {self.need_gpus:g} GPU' if self.need_gpus else ''}"
                    f" each): waiting up to {self.node_wait_s:g} s for one ({NODE_WAIT_ENV})"
                )
            elif time.monotonic() - self._unusable_since > self.node_wait_s and self.fatal is None:
                self.fatal = (
                    f"{self.stage}: no node could run a worker for {self.node_wait_s:g} s ({self.counts.nodes_lost} node(s) "
                    f"lost); {len(self._reported)} shard(s) of this run are written and nothing is half-written: "
                    f"run the same command again when the cluster has nodes (wait longer with {NODE_WAIT_ENV})"
                )

    def _shards_started(self, starts: list[tuple[str, str, str]]) -> None:
        with self._lock:
            for shard_id, node_id, actor_id in starts:
                history = self._starts.setdefault(shard_id, [])
                # Interned: a node's and an actor's id are one string each, not one per shard
                # (~190 bytes a shard, 19 MB of the driver at 10^5 shards).
                history.append((sys.intern(node_id), sys.intern(actor_id)))
                if len(history) <= self._expected.get(shard_id, 1):
                    continue
                self.counts.shards_rerun += 1
                before = history[-2][0]
                if before in self._lost or before not in self._alive:
                    continue  # its node's loss was (or will be) said, naming this shard
                self.counts.workers_lost += 1
                self._say(f"shard {shard_id} runs again: its worker on node {short(before)} died mid-shard")

    def _say(self, line: str) -> None:
        text = f"[{self.stage}] {line}"
        if len(self.counts.events) < MAX_EVENTS:
            self.counts.events.append(line)
        print(text, file=self.stream, flush=True)

    def _abort(self) -> None:
        """Remove temporaries of shards that were in flight, then raise the fatal error."""
        for folder in self.cleanup:
            for name in _names(folder):
                if storage.is_temporary_name(name):
                    storage.remove(storage.join(folder, name))
        raise NoWorkerNodes(self.fatal)


def _names(folder: str) -> list[str]:
    try:
        return storage.list_names(folder)
    except FileNotFoundError:
        return []
