"""The Ray Train driver of `pipeline train-student`: one `TrainConfig` -> a finished run.

`run_training` starts (or joins) Ray and runs `pipeline.train.loop.train_worker` under a
`TorchTrainer`: one CPU worker locally by default, `--workers N --use-gpu` on a cluster (DDP;
bf16 autocast and optional gradient checkpointing on GPUs). Checkpoints are reported through
`ray.train.report` into `OUT/ray/run/` (a local folder or an object-store URI); `--resume`
re-attaches to that run, and Ray Train hands the latest checkpoint back to the workers. At the
end the last checkpoint's `model.pth` (official GLIP layout + metadata, loadable by `pipeline
ground`/`pseudo-label`/`eval`) is copied to `OUT/student.pth`, and `OUT/_stats.json` records
the run.

Layout of OUT:
    student.pth            final weights (official layout)
    metrics.jsonl          one line per logged step (loss terms, lr, samples/s)
    tensorboard/           the same scalars as TensorBoard event files (`pipeline.train.tracking`)
    train_config.json      the resolved configuration
    _stats.json            steps, throughput, skipped samples, final loss, restarts
    ray/run/checkpoint_*/  model.pth, train_state.pt, rank_{r}.pt
    ray/run/restarts.json  this session's worker-group failures (`pipeline.train.restarts`)
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.io import storage
from pipeline.train.config import TrainConfig, setting
from pipeline.user_errors import first_line

RUN_NAME = "run"
STUDENT_FILE = "student.pth"
CONFIG_FILE = "train_config.json"
_SNAPSHOT = "checkpoint_manager_snapshot.json"


class TrainingInterrupted(RuntimeError):
    """The run stopped before its last step; its checkpoints allow `--resume`."""


@dataclass(frozen=True)
class TrainOutcome:
    """Where a finished run left its results."""

    student: str
    checkpoint: str
    steps: int
    final_loss: float | None


def _storage(out: str) -> str:
    return f"{out.rstrip('/')}/ray" if "://" in out else str(Path(out).resolve() / "ray")


def _absolute(path: str | None) -> str | None:
    """Local paths made absolute (Ray Train workers do not run in the caller's directory)."""
    if not path or "://" in path:
        return path
    return os.path.abspath(path)


def with_absolute_paths(config: TrainConfig) -> TrainConfig:
    sources = tuple(
        dataclasses.replace(
            spec,
            paths=tuple(_absolute(p) for p in spec.paths),
            images=_absolute(spec.images) or "",
            label_map=_absolute(spec.label_map),
        )
        for spec in config.data.sources
    )
    model = config.model
    backbone = model.init_backbone if model.init_backbone == "imagenet" else _absolute(model.init_backbone)
    return dataclasses.replace(
        config,
        out=_absolute(config.out),
        data=dataclasses.replace(config.data, sources=sources),
        model=dataclasses.replace(model, init=_absolute(model.init), init_backbone=backbone),
    )


def _worker_error(error: BaseException) -> str:
    """The worker's exception line of a Ray Train failure (its message ends with the traceback)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def run_training(config: TrainConfig, *, resume: bool = False, address: str | None = None) -> TrainOutcome:
    """Train (or continue, with `resume`) the run in `config.out`; returns the final weights."""
    config = with_absolute_paths(config)
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.cluster import init_ray, shutdown_ray
    from pipeline.train.loop import train_worker
    from pipeline.train.restarts import RESTARTS_FILE, RestartFollower, RestartRecorder

    out, storage_path = config.out, _storage(config.out)
    snapshot = f"{storage_path}/{RUN_NAME}/{_SNAPSHOT}"
    if resume and not storage.exists(snapshot):
        raise FileNotFoundError(f"--resume: {out} holds no run to resume (no {snapshot})")
    if not resume and storage.exists(snapshot):
        raise FileExistsError(f"{out} already holds a training run: continue it with --resume, or use a new --out")
    storage.makedirs(out)
    if resume:
        _check_resumable(storage.join(out, CONFIG_FILE), config)
    if config.tracking.mlflow_uri:  # before Ray: a missing MLflow or a bad URI is one line
        config = _with_mlflow_run(config, resume=resume)
    storage.write_atomic(storage.join(out, CONFIG_FILE), json.dumps(config.to_dict(), indent=2).encode("utf-8"))
    restarts_path = f"{storage_path}/{RUN_NAME}/{RESTARTS_FILE}"
    if storage.exists(restarts_path):
        storage.remove(restarts_path)  # it lists this session's restarts

    # Embedded loopback-only Ray unless --address. Ray Train's controller watchdog polls the
    # state API, which lives in the dashboard: without it every poll logs a warning.
    started_ray = init_ray(address, include_dashboard=True)
    started = time.time()
    resources = config.resources
    progress = _ProgressFollower(config, since=started) if _follows_progress(config) else None
    try:
        trainer = TorchTrainer(
            train_worker,
            train_loop_config=config.to_dict(),
            torch_config=TorchConfig(backend="nccl" if resources.use_gpu else "gloo"),
            scaling_config=ScalingConfig(
                num_workers=resources.workers,
                use_gpu=resources.use_gpu,
                resources_per_worker={"CPU": resources.cpus_per_worker, **({"GPU": 1} if resources.use_gpu else {})},
            ),
            run_config=RunConfig(
                name=RUN_NAME,
                storage_path=storage_path,
                checkpoint_config=CheckpointConfig(num_to_keep=config.checkpoints.keep),
                # A failed worker group (a node lost, a worker killed) starts again from the last
                # checkpoint; RestartRecorder writes down each failure for the line and _stats.json.
                failure_config=FailureConfig(max_failures=config.max_failures),
                callbacks=[
                    RestartRecorder(
                        path=restarts_path, max_failures=config.max_failures, workers=resources.workers,
                        step=_checkpointed_step(storage_path) if resume else None,
                    )
                ],
            ),
        )
        restarts = RestartFollower(restarts_path)
        try:
            result = trainer.fit()
        except TrainingFailedError as exc:
            _end_mlflow_run(config, status="FAILED")
            if _checkpointed_step(storage_path) is None:  # nothing to resume: the cause is all there is to say
                raise TrainingInterrupted(f"training stopped before its first checkpoint: {_worker_error(exc)}") from exc
            raise TrainingInterrupted(
                f"training stopped before step {config.steps}: {_worker_error(exc)}; "
                f"its last checkpoint is under {storage_path}/{RUN_NAME}: continue with --resume"
            ) from exc
        finally:
            restart_events = restarts.finish()
    finally:
        if progress is not None:
            progress.finish()
        shutdown_ray(started_ray)
    if result.checkpoint is None:
        raise TrainingInterrupted(f"the run in {out} reported no checkpoint")
    return _finish(config, result, time.time() - started, restarts=restart_events)


def _with_mlflow_run(config: TrainConfig, *, resume: bool) -> TrainConfig:
    """`config` with the MLflow run its workers log to: a new one, or on `--resume` the
    interrupted run's (when it logged to the same tracking URI)."""
    from pipeline.train.tracking import start_mlflow_run

    previous = None
    path = storage.join(config.out, CONFIG_FILE)
    if resume and storage.exists(path):
        tracking = json.loads(storage.read_bytes(path)).get("tracking") or {}
        if tracking.get("mlflow_uri") == config.tracking.mlflow_uri:
            previous = tracking.get("mlflow_run_id")
    run_id = start_mlflow_run(config, previous_run_id=previous)
    return dataclasses.replace(config, tracking=dataclasses.replace(config.tracking, mlflow_run_id=run_id))


def _end_mlflow_run(config: TrainConfig, *, status: str, student: str | None = None, checkpoint: str | None = None) -> None:
    """End the run's MLflow run, if it has one; a tracking server that fails here is a warning
    line (the training itself is done, or its own error follows)."""
    if not config.tracking.mlflow_run_id:
        return
    from pipeline.train.tracking import finish_mlflow_run

    try:
        finish_mlflow_run(config, status=status, student=student, checkpoint=checkpoint)
    except Exception as error:  # noqa: BLE001
        print(f"train-student: warning: could not end the MLflow run ({first_line(error)})", file=sys.stderr, flush=True)


def _checkpointed_step(storage_path: str) -> int | None:
    """The step of the run's latest checkpoint folder (`checkpoint_00000004` -> 4), if any."""
    steps = [
        int(name[len("checkpoint_"):]) for name in storage.list_folders(f"{storage_path}/{RUN_NAME}")
        if name.startswith("checkpoint_") and name[len("checkpoint_"):].isdigit()
    ]
    return max(steps, default=None)


def _follows_progress(config: TrainConfig) -> bool:
    """The driver prints the progress lines itself when the workers' own do not reach it
    (`init_ray` did not forward their output) and rank 0's metrics.jsonl is on this machine."""
    from pipeline.cluster import worker_output_forwarded

    return worker_output_forwarded() is False and "://" not in config.out


class _ProgressFollower:
    """Prints rank 0's progress lines (`loop.progress_line`) from OUT/metrics.jsonl as they are
    written, each once: the records of this session (`since`, wall clock), in step order."""

    def __init__(self, config: TrainConfig, *, since: float, interval_s: float = 1.0) -> None:
        from pipeline.train.loop import METRICS_FILE

        self.path = Path(config.out) / METRICS_FILE
        self.steps, self.since, self.interval_s = config.steps, since, interval_s
        self.printed_step, self.skipped = -1, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="train-progress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._print_new()

    def finish(self) -> None:
        self._stop.set()
        self._thread.join()
        self._print_new()
        if self.skipped:  # the workers' own warning stays in their log
            print(f"train-student: skipped {self.skipped} unreadable samples (see the run's log)", file=sys.stderr, flush=True)

    def _print_new(self) -> None:
        from pipeline.train.loop import progress_line

        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        for line in text.splitlines(keepends=True):
            if not line.endswith("\n"):
                break  # being written
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("time", 0) >= self.since and record["step"] > self.printed_step and "eta_s" in record:
                print(progress_line(record, self.steps), file=sys.stderr, flush=True)
                self.printed_step, self.skipped = record["step"], record.get("skipped_samples", 0)


def _finish(config: TrainConfig, result, seconds: float, *, restarts: list[dict]) -> TrainOutcome:
    """Copy the last checkpoint's weights to OUT/student.pth and write OUT/_stats.json."""
    from pipeline.train.checkpoints import MODEL_FILE

    student = storage.join(config.out, STUDENT_FILE)
    with result.checkpoint.as_directory() as directory:
        weights = Path(directory) / MODEL_FILE
        if not _link_atomically(weights, student):
            with open(weights, "rb") as source, storage.atomic_writer(student) as handle:
                while chunk := source.read(16 << 20):
                    handle.write(chunk)
    metrics = result.metrics or {}
    unused = sources_without_samples(config, metrics)
    if unused:
        print(
            f"train-student: warning: worker 0 drew no {' and no '.join(unused)} sample in {metrics.get('step', config.steps)} "
            "steps: raise its --mix weight, or pair batches (--pseudo-per-step)",
            file=sys.stderr, flush=True,
        )
    _write_stats(config, metrics, result.checkpoint.path, seconds, restarts=restarts, unused=unused)
    _end_mlflow_run(config, status="FINISHED", student=student, checkpoint=result.checkpoint.path)
    return TrainOutcome(
        student=student,
        checkpoint=result.checkpoint.path,
        steps=int(metrics.get("step", config.steps)),
        final_loss=metrics.get("loss"),
    )


def _link_atomically(source: Path, target: str) -> bool:
    """`target` as a hard link of the last checkpoint's weights when both are on one local
    filesystem: the weights are on disk once (a GLIP-L file is 1.7 GB), and the link outlives
    the checkpoint folder should `--keep-checkpoints` remove it later. False: copy instead."""
    if "://" in target or "://" in str(source):
        return False
    temporary = Path(target).parent / storage.temporary_name(Path(target).name)
    try:
        os.link(source, temporary)
        os.replace(temporary, target)
    except OSError:
        temporary.unlink(missing_ok=True)
        return False
    return True


# Settings that must not change when a run is resumed (the rest, e.g. logging, may).
_RESUME_KEYS = (
    "model.variant", "steps", "data.batch_size", "data.pseudo_per_step", "resources.workers", "seed", "data.sources",
    "data.augment.min_sizes", "data.augment.max_size", "optimizer.schedule", "model.init", "model.init_backbone",
    "model.freeze_backbone",
    "data.pseudo.score_weight", "data.pseudo.ignore_below", "data.pseudo.background_weight", "data.pseudo.prompt",
    "data.pseudo.known_weight",
    "data.augment.crop_probability", "data.augment.cutout_probability", "data.augment.scale_jitter",
)


def _check_resumable(path: str, config: TrainConfig) -> None:
    if not storage.exists(path):
        return
    previous = json.loads(storage.read_bytes(path))
    try:
        TrainConfig.from_dict(previous)
    except (TypeError, ValueError) as error:
        raise ValueError(f"--resume: {path} is not a configuration this version reads ({first_line(error)})") from None
    current = json.loads(json.dumps(config.to_dict()))
    changed = [key for key in _RESUME_KEYS if setting(previous, key) != setting(current, key)]
    if changed:
        details = ", ".join(f"{k}: {setting(previous, k)!r} -> {setting(current, k)!r}" for k in changed)
        raise ValueError(f"--resume: these settings differ from the interrupted run ({path}): {details}")


def sources_without_samples(config: TrainConfig, metrics: dict) -> list[str]:
    """Kinds of data given to the run that worker 0 never drew a sample of."""
    drawn = {k[len("samples_"):]: v for k, v in metrics.items() if k.startswith("samples_")}
    if not drawn:
        return []
    return sorted({spec.kind for spec in config.data.sources if not drawn.get(spec.kind)})


def _write_stats(
    config: TrainConfig, metrics: dict, checkpoint: str, seconds: float, *, restarts: list[dict], unused: list[str]
) -> None:
    from pipeline.train.loop import METRICS_FILE
    from pipeline.train.tracking import TENSORBOARD_DIR

    lines = []
    metrics_path = storage.join(config.out, METRICS_FILE)
    if storage.exists(metrics_path):
        lines = [json.loads(line) for line in storage.read_bytes(metrics_path).decode("utf-8").splitlines() if line.strip()]
    rates = [line["samples_per_s"] for line in lines[1:]] or [line["samples_per_s"] for line in lines]
    steps = int(metrics.get("step", config.steps))
    stats = {
        "stage": "train-student",
        "variant": config.model.variant,
        "inputs": [s.name for s in config.data.sources],
        "steps": steps,
        "samples": steps * (config.data.batch_size + config.data.pseudo_per_step) * config.resources.workers,
        "final_loss": metrics.get("loss"),
        "skipped_samples": metrics.get("skipped_samples", 0),
        "samples_by_source_worker0": {k[len("samples_"):]: v for k, v in metrics.items() if k.startswith("samples_")},
        "sources_without_samples": unused,  # kinds given but never drawn by worker 0 (a warning line too)
        "samples_per_s": sum(rates) / len(rates) if rates else None,
        "wall_s_this_session": seconds,
        # Worker-group failures of this session, each restarted from the last checkpoint (--max-failures).
        "restarts": sum(1 for event in restarts if event.get("restarted")),
        "restart_events": [{k: v for k, v in event.items() if k != "line"} for event in restarts],
        "workers": config.resources.workers,
        "use_gpu": config.resources.use_gpu,
        "checkpoint": checkpoint,
        "student": storage.join(config.out, STUDENT_FILE),
        "tensorboard": storage.join(config.out, TENSORBOARD_DIR) if config.tracking.tensorboard else None,
        "mlflow": {"uri": config.tracking.mlflow_uri, "run_id": config.tracking.mlflow_run_id} if config.tracking.mlflow_run_id else None,
        "config": config.to_dict(),
    }
    storage.write_atomic(storage.join(config.out, "_stats.json"), json.dumps(stats, indent=2).encode("utf-8"))
