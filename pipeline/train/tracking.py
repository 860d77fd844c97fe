"""What a training run shows while it goes: TensorBoard event files, and MLflow when asked.

Rank 0 of `pipeline train-student` logs one set of scalars per logged step (`step_scalars`):

    loss/total, loss/reg, loss/centerness, loss/dot_product_token   the loss and its terms
    lr/<group>                 each AdamW group's learning rate (`loop.make_optimizer` names them)
    train/grad_norm            the gradient norm before clipping
    train/samples_per_s        over all workers, since the previous logged step
    train/num_positives        anchors assigned to a box in the step's batch
    eval/AP, eval/AP50, ...    when the run is evaluated (`record_evaluation`; the demo's arms)

* TensorBoard (`Tracking.tensorboard`, on by default): the real `torch.utils.tensorboard`
  writer, into `OUT/tensorboard/`. On an object store the events are written to a local folder
  and copied to `OUT/tensorboard/` at each checkpoint and at the end. A resumed run opens a new
  event file with `purge_step` past its checkpoint, so TensorBoard drops what the interrupted
  run logged after it and the curves read as one run.
* MLflow (`--mlflow-uri`): the driver opens one run (`start_mlflow_run`: the configuration as
  params, the OUT folder as a tag) before Ray starts; rank 0 logs the same scalars to it; the
  driver ends it with the final checkpoint's path (`finish_mlflow_run`). MLflow is an optional
  extra (`.[mlflow]`, mlflow-skinny), imported only here.

A tracking sink that fails mid-run (a tracking server down) is said once and training goes on:
`metrics.jsonl` keeps every step.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from pipeline.io import storage
from pipeline.train.config import TrainConfig

TENSORBOARD_DIR = "tensorboard"
EVAL_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AP_base", "AP_tail", "precision50", "recall50")
_MLFLOW_PARAM_LENGTH = 500  # MLflow's own limit was 500 characters per value before 2.x
logger = logging.getLogger(__name__)


def step_scalars(record: dict) -> dict[str, float]:
    """The tracked scalars of one `metrics.jsonl` record (`loop.StudentTrainer.log`)."""
    scalars = {"loss/total": record["loss"]}
    scalars.update({f"loss/{key[len('loss_'):]}": value for key, value in record.items() if key.startswith("loss_")})
    lrs = record.get("lr_groups") or {"all": record["lr"]}
    scalars.update({f"lr/{name}": value for name, value in lrs.items()})
    for key in ("grad_norm", "samples_per_s", "num_positives"):
        if key in record:
            scalars[f"train/{key}"] = record[key]
    return scalars


def _mlflow_client(uri: str):
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ValueError(
            f"--mlflow-uri {uri}: MLflow is not installed; install the extra: pip install 'glip-data-engine[mlflow]'"
        ) from None
    if uri.startswith("file:"):
        # MLflow 3 refuses its file store unless told; a `file://` URI given on purpose is that.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=uri)


class RunTracker:
    """Rank 0's sinks of a run's scalars; `resume_step`: the step the run (re)starts after."""

    def __init__(self, config: TrainConfig, *, resume_step: int) -> None:
        tracking = config.tracking
        self.out = config.out
        self.writer = None
        self.staging: str | None = None  # the local folder of an object-store run's events
        self.mlflow = None
        self.run_id = tracking.mlflow_run_id
        self._warned: set[str] = set()
        if tracking.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            if "://" in config.out:
                self.staging = tempfile.mkdtemp(prefix="glip-tensorboard-")
                logdir = self.staging
            else:
                logdir = str(Path(config.out) / TENSORBOARD_DIR)
            # purge_step: the interrupted run's events past the checkpoint are dropped by readers
            self.writer = SummaryWriter(logdir, purge_step=resume_step + 1 if resume_step else None)
        if tracking.mlflow_uri and self.run_id:
            self.mlflow = _mlflow_client(tracking.mlflow_uri)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, global_step=step)
            self.writer.flush()  # a few small records per logged step: TensorBoard shows them now
        if self.mlflow is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            metrics = [Metric(key=name, value=float(value), timestamp=now, step=step) for name, value in scalars.items()]
            self._guarded("mlflow", lambda: self.mlflow.log_batch(self.run_id, metrics=metrics))

    def sync(self) -> None:
        """Copy an object-store run's event files to OUT/tensorboard/ (at checkpoints, at the end)."""
        if self.staging is None or self.writer is None:
            return
        self.writer.flush()
        for name in os.listdir(self.staging):
            data = Path(self.staging, name).read_bytes()
            self._guarded("tensorboard upload", lambda: storage.write_atomic(storage.join(self.out, TENSORBOARD_DIR, name), data))

    def close(self) -> None:
        self.sync()
        if self.writer is not None:
            self.writer.close()
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)

    def _guarded(self, sink: str, call) -> None:
        try:
            call()
        except Exception as error:  # noqa: BLE001 - a tracking sink never stops training
            if sink not in self._warned:
                self._warned.add(sink)
                logger.warning("train-student: warning: %s logging failed (%s); training goes on, metrics.jsonl has every step",
                               sink, str(error).splitlines()[0] if str(error) else type(error).__name__)


# -- the driver's side of MLflow ----------------------------------------------------------


def _flat(config: dict, prefix: str = "") -> dict[str, str]:
    params: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            params.update(_flat(value, f"{name}."))
        else:
            params[name] = json.dumps(value)[:_MLFLOW_PARAM_LENGTH]
    return params


def start_mlflow_run(config: TrainConfig, *, previous_run_id: str | None = None) -> str:
    """Open (or, for `--resume` of a run that had one, reopen) the MLflow run; returns its id.
    The configuration becomes the run's params, OUT its `glip.out` tag."""
    tracking = config.tracking
    client = _mlflow_client(tracking.mlflow_uri)  # first: without MLflow, its one line
    from mlflow.entities import Param, RunStatus

    if previous_run_id:
        client.update_run(previous_run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        return previous_run_id
    experiment = client.get_experiment_by_name(tracking.mlflow_experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(tracking.mlflow_experiment)
    run = client.create_run(experiment_id, run_name=storage.basename(config.out.rstrip("/")) or None, tags={"glip.out": config.out})
    settings = config.to_dict()
    settings.pop("tracking")
    params = [Param(key, value) for key, value in sorted(_flat(settings).items())]
    for start in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
        client.log_batch(run.info.run_id, params=params[start:start + 100])
    return run.info.run_id


def finish_mlflow_run(config: TrainConfig, *, status: str, student: str | None = None, checkpoint: str | None = None) -> None:
    """End the run (`status` FINISHED or FAILED), naming the final weights."""
    tracking = config.tracking
    client = _mlflow_client(tracking.mlflow_uri)
    if student:
        client.set_tag(tracking.mlflow_run_id, "glip.student", student)
    if checkpoint:
        client.set_tag(tracking.mlflow_run_id, "glip.checkpoint", checkpoint)
    client.set_terminated(tracking.mlflow_run_id, status=status)


# -- evaluation after training ------------------------------------------------------------


def record_evaluation(out: str, metrics: dict, *, prefix: str = "eval") -> None:
    """Log an evaluation of the run in `out` (pycocotools AP as fractions, `EVAL_KEYS` that are
    present) at its last step, to the run's own sinks (its `train_config.json`'s tracking).
    Does nothing for a folder that holds no run."""
    import dataclasses

    config_path = storage.join(out, "train_config.json")
    if not storage.exists(config_path):
        return  # weights that no training run of ours made: nothing to log to
    config = TrainConfig.from_dict(json.loads(storage.read_bytes(config_path)))
    config = dataclasses.replace(config, out=out)  # where the run is now
    scalars = {f"{prefix}/{key}": float(metrics[key]) for key in EVAL_KEYS if metrics.get(key) is not None}
    stats_path = storage.join(out, "_stats.json")
    steps = json.loads(storage.read_bytes(stats_path)).get("steps", config.steps) if storage.exists(stats_path) else config.steps
    tracker = RunTracker(config, resume_step=0)
    try:
        tracker.log(int(steps), scalars)
    finally:
        tracker.close()
