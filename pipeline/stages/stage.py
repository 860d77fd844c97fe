"""The per-shard stage runner every stage uses (parse-captions, pseudo-label, filter).

Contract (DESIGN.md, STYLE.md 5):
1. `plan_shards`: list input shards; a shard is done when its output marker
   `{out}/{shard}{suffix}` exists (the last file its worker writes, atomically); done shards
   are skipped unless `overwrite`. Temporaries left by a killed run are removed.
2. `run_stage`: run each pending shard through a worker on Ray Data: a Dataset of task
   indexes (the tasks themselves reach each actor once, packed), several small shards per
   block (`block_count`: a block's fixed cost is paid once per block, not per shard),
   `map_batches` over a callable actor class (`ShardActor`, built once per actor from the
   stage's picklable `worker_factory`), `batch_size=1` shard per call,
   a pool of actors (`ActorPoolStrategy`) with explicit `num_cpus`/`num_gpus`: `workers` of
   them with `--workers`, else one per CPU (GPU) the cluster has at the start, growing onto
   nodes that join while shards wait. The worker reads its
   shard, writes the outputs (data first, marker last) and returns a `ShardReport`; an
   exception in one shard becomes that shard's `error`, the job goes on. Failed shards are
   run again in up to `StageRun.retries` more passes (fresh actors); a shard still failing
   is reported with its last reason and "(failed N attempts)". A worker process that dies
   mid-shard is restarted by Ray Data and the shard re-run; its partial output never had a
   final name, so every sample is written exactly once.
3. The driver sums reports as shards finish (`StageStats`: running totals, no report kept;
   progress lines on stderr at most every few seconds) and appends each to the shard log
   (`pipeline.io.shard_log`: `{out}/_shards.jsonl`, parts written atomically as shards
   finish). Shards done by earlier runs are counted from that log: a resume costs one listing
   and a few reads, whatever the number of shards; only a done shard the log lacks (its run
   was killed before the log part was written) has its own report read back
   (`read_done_report`). `{out}/_stats.json` is written last.

A worker is any callable `worker(task: ShardTask) -> ShardReport`; `worker_factory()`
builds it inside the actor so heavy state (a spaCy pipeline, a model) loads once per actor.
"""

from __future__ import annotations

import os
import time
import traceback
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TextIO

from pipeline.cluster import init_ray, shutdown_ray
from pipeline.io import storage
from pipeline.io.progress import ProgressReporter
from pipeline.io.shard_log import ShardLog
from pipeline.io.shard_report import ShardReport, ShardTask
from pipeline.io.shards import ShardSource
from pipeline.io.stage_stats import StageStats, write_stats
from pipeline.stages.cluster_events import ClusterWatch, StartNotifier

ShardWorker = Callable[[ShardTask], ShardReport]


@dataclass(frozen=True, kw_only=True)
class ShardPlan:
    """Shards to run now (`pending`) and shards whose output already exists (`done`)."""

    pending: list[ShardTask]
    done: list[ShardTask]


@dataclass(frozen=True, kw_only=True)
class StageRun:
    """How to run a stage: where, how wide, and on what resources per worker."""

    stage: str
    out: str
    suffix: str
    overwrite: bool = False
    workers: int | None = None  # None: one per CPU of the (embedded or joined) cluster
    address: str | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    show_ray_progress: bool = False  # Ray Data's own progress bars (off: our lines are enough)
    # Folder of the per-shard output markers when it is not `out` itself (pseudo-label writes
    # `out/detections/` and `out/pseudo/`, the tar being the marker, and `out/_stats.json`).
    marker_dir: str | None = None
    # A shard whose worker fails is run again (a fresh pass over the failed shards) up to
    # `retries` times; then it is reported in `_stats.json` as failed, with the last reason.
    retries: int = 2
    # Shards per Ray Data block (one actor task): several small shards share a task's fixed
    # cost; at most this many, and never so many that a worker gets fewer than ~16 blocks.
    max_shards_per_block: int = 16


def plan_shards(shards: Sequence[ShardSource], *, out: str, suffix: str, overwrite: bool) -> ShardPlan:
    """Split `shards` into pending and done by the presence of `{out}/{shard_id}{suffix}`.

    Lists `out` once (cheap on object stores) and deletes temporaries of a killed writer.
    Raises ValueError when an output would overwrite one of the inputs.
    """
    names = set(storage.list_names(out))
    for name in sorted(names):
        if storage.is_temporary_name(name):
            storage.remove(storage.join(out, name))
    inputs = {resolved_uri(shard.uri) for shard in shards}
    resolved_out = resolved_uri(out)
    pending, done = [], []
    for shard in shards:
        output_uri = storage.join(out, f"{shard.shard_id}{suffix}")
        if storage.join(resolved_out, f"{shard.shard_id}{suffix}") in inputs:
            raise ValueError(f"output {output_uri} would overwrite an input shard: choose another --out")
        task = ShardTask(shard_id=shard.shard_id, input_uri=shard.uri, kind=shard.kind, output_uri=output_uri)
        finished = f"{shard.shard_id}{suffix}" in names
        (done if finished and not overwrite else pending).append(task)
    return ShardPlan(pending=pending, done=done)


def check_shard_files(
    shards: Sequence[ShardSource], folder: str, *, suffix: str, flag: str, made_by: str, stream: TextIO | None = None
) -> None:
    """Before any worker starts: `folder` (one listing) must hold `{shard_id}{suffix}` of the
    input shards, as the stage `made_by` writes them. None of them: the folder is the wrong
    one (another corpus, a parent folder), refused in one line. Some: one warning line; those
    shards fail and are reported in `_stats.json` like any unreadable shard."""
    import sys

    names = set(storage.list_names(folder))
    missing = [shard for shard in shards if f"{shard.shard_id}{suffix}" not in names]
    if shards and len(missing) == len(shards):
        first = shards[0]
        raise FileNotFoundError(
            f"{flag} {folder}: holds no {made_by} output of these shards (no {first.shard_id}{suffix} for {first.uri}); "
            f"give the --out of {made_by} run on the same input shards"
        )
    if missing:
        print(
            f"warning: {flag} {folder} has no {made_by} output for {len(missing)} of {len(shards)} shards "
            f"(e.g. {missing[0].shard_id}{suffix}): those shards fail and are counted in _stats.json",
            file=stream or sys.stderr, flush=True,
        )


def resolved_uri(uri: str) -> str:
    """`uri` as `storage.resolve` spells it (local paths absolute), without building a
    filesystem per call: planning 10^5 shards calls this 2 x 10^5 times."""
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def run_stage(
    run: StageRun,
    *,
    shards: Sequence[ShardSource],
    inputs: Sequence[str],
    worker_factory: Callable[[], ShardWorker],
    read_done_report: Callable[[ShardTask], ShardReport],
    settings: dict[str, object],
    versions: dict[str, str],
    progress_stream: TextIO | None = None,
) -> dict[str, object]:
    """Run every pending shard on Ray, then write `_stats.json`; returns the stats dict."""
    storage.ensure_writable_folder(run.out)
    markers = run.marker_dir or run.out
    storage.ensure_writable_folder(markers)
    plan = plan_shards(shards, out=markers, suffix=run.suffix, overwrite=run.overwrite)
    stats = StageStats(
        stage=run.stage, inputs=inputs, out=run.out, total_shards=len(shards), settings=settings, versions=versions
    )
    log = ShardLog.load(run.out)
    log.void(task.shard_id for task in plan.pending)
    finished = {task.shard_id for task in plan.done}
    workers = 0
    cluster: dict[str, object] | None = None
    startup_seconds: float | None = None
    started_at = finished_at = time.perf_counter()
    if plan.pending:
        import ray

        width = run.workers or 0
        started = init_ray(run.address, num_cpus=None if run.address else max(os.cpu_count() or 1, width))
        try:
            if not width:
                width = max(1, int(ray.cluster_resources().get("CPU", 1) // max(run.num_cpus, 1e-9)))
            workers = min(width, len(plan.pending))
            started_at = time.perf_counter()  # Ray start-up is not stage throughput
            progress = ProgressReporter(stage=run.stage, total_shards=len(plan.pending), stream=progress_stream)
            tasks = {task.shard_id: task for task in plan.pending}
            attempt_tasks = list(plan.pending)
            # Lost nodes and workers, said as they happen and counted in `_stats.json`.
            watch = ClusterWatch(
                stage=run.stage, need_cpus=run.num_cpus, need_gpus=run.num_gpus, stream=progress_stream,
                cleanup=(run.out, markers),
            )
            with watch:
                for attempt in range(1, run.retries + 2):
                    retry = []
                    watch.submitting(task.shard_id for task in attempt_tasks)
                    reports = run_on_ray(
                        attempt_tasks, run=run, workers=min(workers, len(attempt_tasks)), worker_factory=worker_factory,
                        ledger=watch.ledger,
                    )
                    for report in watch.follow(reports):
                        if startup_seconds is None:
                            # The first shard began `report.seconds` before it came back: what precedes
                            # that is actor start-up (process spawn, model load), not throughput.
                            startup_seconds = max(0.0, time.perf_counter() - report.seconds - started_at)
                        if report.error is not None and attempt <= run.retries:
                            retry.append(tasks[report.shard_id])
                            continue
                        if report.error is not None:
                            report.error = f"{report.error} (failed {attempt} attempts)"
                        else:
                            log.record(report)
                            finished.add(report.shard_id)
                        stats.add(report)
                        progress.update(report)
                    if not retry:
                        break
                    attempt_tasks = retry
            cluster = watch.summary()
            finished_at = time.perf_counter()  # before Ray shuts down: not throughput either
        finally:
            log.flush()  # a killed or failed run keeps the reports of the shards it finished
            shutdown_ray(started)
    seconds = finished_at - started_at
    unlogged = []
    for task in plan.done:
        report = log.report(task)
        if report is None:
            unlogged.append(task)  # finished by a run killed before its log part, or a run before logs
        else:
            stats.add(report, earlier_run=True)
    for report in _read_reports(unlogged, read_done_report):
        stats.add(report, earlier_run=True)
        log.record(report)
    log.merge(finished)
    result = stats.to_dict(seconds=seconds, workers=workers, startup_seconds=startup_seconds or 0.0)
    if cluster is not None:
        result["cluster"] = cluster
    write_stats(run.out, result)
    return result


def run_on_ray(
    tasks: Sequence[ShardTask], *, run: StageRun, workers: int, worker_factory: Callable[[], ShardWorker], ledger=None
) -> Iterator[ShardReport]:
    """Reports of `tasks` processed by Ray Data actors, in completion order; each actor tells
    `ledger` (a `cluster_events.ShardLedger` actor, optional) the shards it starts.

    The pool starts with `workers` actors. Fixed at that size when `run.workers` is given
    (`--workers`), else elastic: Ray Data's actor autoscaler adds actors while shards wait and
    the cluster has room for them (a node that joins mid-stage, or an autoscaler asked for
    more), up to one per block."""
    import ray

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = run.show_ray_progress
    blocks = block_count(len(tasks), workers=workers, max_shards_per_block=run.max_shards_per_block)
    if run.workers:
        compute = ray.data.ActorPoolStrategy(size=workers)
    else:
        compute = ray.data.ActorPoolStrategy(min_size=workers, max_size=max(workers, blocks))
    # Rows are task indexes; the tasks reach each actor once, packed (~9 bytes a shard instead
    # of ~250 in rows, and a row list the driver never builds: ~65 MB of its peak at 10^5).
    # `from_items`, not `ray.data.range`: range's read tasks wait for CPUs the pool holds.
    dataset = ray.data.from_items(list(range(len(tasks))), override_num_blocks=blocks)
    reports = dataset.map_batches(
        ShardActor,
        fn_constructor_kwargs={"worker_factory": worker_factory, "ledger": ledger, "tasks": pack_tasks(tasks)},
        batch_size=1,
        batch_format="numpy",
        compute=compute,
        num_cpus=run.num_cpus,
        num_gpus=run.num_gpus or None,
    )
    for row in reports.iter_rows():
        yield ShardReport.from_json(str(row["report"]))


def pack_tasks(tasks: Sequence[ShardTask]) -> bytes:
    """`tasks` as zlib-compressed JSON lines, built a line at a time (`ShardActor` unpacks them)."""
    compressor = zlib.compressobj(1)
    chunks = [compressor.compress(task.to_json().encode("utf-8") + b"\n") for task in tasks]
    chunks.append(compressor.flush())
    return b"".join(chunks)


def block_count(tasks: int, *, workers: int, max_shards_per_block: int) -> int:
    """Ray Data blocks for `tasks` shards. A block is one actor task with a fixed cost (~10-20
    ms: scheduling, object transfer), paid once per shard with one shard per block; so up to
    `max_shards_per_block` shards share a block, but each worker still gets ~16 blocks or
    more (the last blocks of a run are what leave workers idle, and a shard's report comes
    back when its block ends)."""
    per_block = max(1, min(max_shards_per_block, tasks // max(16 * workers, 1)))
    return max(1, -(-tasks // per_block))


class ShardActor:
    """Ray Data callable class: builds the stage's worker once, then runs one shard per row."""

    def __init__(self, *, worker_factory: Callable[[], ShardWorker], tasks: bytes, ledger=None) -> None:
        self.tasks = zlib.decompress(tasks).decode("utf-8").splitlines()  # JSON of each task, by row index
        self.worker = worker_factory()
        self.starts = StartNotifier(ledger)
        self.delay_s = testing_shard_delay()
        self.gate = os.environ.get("PIPELINE_TESTING_SHARD_GATE", "").strip()
        self.shards_run = 0

    def __call__(self, batch: dict[str, object]) -> dict[str, list[str]]:
        tasks = [ShardTask.from_json(self.tasks[int(index)]) for index in batch["item"]]  # type: ignore[union-attr]
        reports = []
        for task in tasks:
            self.starts.started(task.shard_id)
            if self.delay_s:
                time.sleep(self.delay_s)
            if self.gate and self.shards_run:
                wait_for_testing_gate(self.gate)
            reports.append(run_shard(self.worker, task).to_json())
            self.shards_run += 1
        return {"report": reports}


def testing_shard_delay() -> float:
    """Fault injection for tests (as Ray's own `testing_*` settings): seconds each worker waits
    before each shard, from `PIPELINE_TESTING_SHARD_DELAY_S` in the worker's environment. A
    test that loses a node mid-stage needs the stage to outlast Ray's detection of the loss;
    a few tiny shards would not. Never set it for real work."""
    value = os.environ.get("PIPELINE_TESTING_SHARD_DELAY_S", "").strip()
    return max(0.0, float(value)) if value else 0.0


def wait_for_testing_gate(path: str, within_s: float = 300.0) -> None:
    """Fault injection for tests: a worker whose environment names a file in
    `PIPELINE_TESTING_SHARD_GATE` runs its first shard, then waits before each later one until
    that file exists (at most `within_s`). A test holds one node's worker this way while it
    checks that a node joining mid-stage takes the waiting shards, without betting on timing.
    Never set it for real work."""
    deadline = time.monotonic() + within_s
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.1)


def run_shard(worker: ShardWorker, task: ShardTask) -> ShardReport:
    """`worker(task)`, with any exception turned into a failed report naming the shard, stamped
    with the time it finished."""
    started = time.perf_counter()
    try:
        report = worker(task)
    except Exception as error:  # noqa: BLE001 - one shard's failure is recorded, never fatal
        detail = "".join(traceback.format_exception_only(type(error), error)).strip()
        report = ShardReport.failed(task, f"{task.input_uri}: {detail}", seconds=time.perf_counter() - started)
    report.finished_at = round(time.time(), 3)
    return report


def _read_reports(tasks: Sequence[ShardTask], read: Callable[[ShardTask], ShardReport]) -> list[ShardReport]:
    """Reports of shards finished by earlier runs, read in parallel (object stores are slow per file)."""
    if not tasks:
        return []
    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(read, tasks))
