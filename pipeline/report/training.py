"""What a report shows of a `train-student` run: its curves (loss and its terms, the learning
rate of each group, gradient norm, samples/s) and its evaluation, read from the run's
TensorBoard event files (`pipeline.train.tracking`) with TensorBoard's own reader, or from
`metrics.jsonl` for a run without them; and the run's `_stats.json`."""

from __future__ import annotations

import json

from pipeline.io import storage
from pipeline.report import figures
from pipeline.report.page import details, image, key_value_table, table
from pipeline.train.tracking import EVAL_KEYS, TENSORBOARD_DIR, step_scalars

Scalars = dict[str, list[tuple[int, float]]]
CURVE_POINTS = 2000  # per scalar: TensorBoard's reservoir keeps a bounded, even sample of a long run


def read_scalars(folder: str) -> tuple[Scalars, str]:
    """Every tracked scalar of a run folder, and where it came from."""
    events = storage.join(folder, TENSORBOARD_DIR)
    if storage.list_names(events):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        local = storage.local_folder_copy(events)  # an object store's event files: copied once (small)
        accumulator = EventAccumulator(local, size_guidance={"scalars": CURVE_POINTS})
        accumulator.Reload()
        tags = accumulator.Tags()["scalars"]
        return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in tags}, "TensorBoard event files"
    metrics = storage.join(folder, "metrics.jsonl")
    if not storage.exists(metrics):
        return {}, ""
    scalars: Scalars = {}
    for line in storage.read_bytes(metrics).decode("utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            for tag, value in step_scalars(record).items():
                scalars.setdefault(tag, []).append((record["step"], value))
    return scalars, "metrics.jsonl"


def _series(scalars: Scalars, prefix: str) -> dict[str, tuple[list[int], list[float]]]:
    return {tag[len(prefix):]: ([s for s, _ in points], [v for _, v in points]) for tag, points in sorted(scalars.items())
            if tag.startswith(prefix)}


def loss_chart(scalars: Scalars, *, width: float = 5.0) -> str:
    return figures.lines(_series(scalars, "loss/"), xlabel="step", ylabel="loss", width=width)


def _percent(value: float) -> str:
    return "n/a" if value < 0 else f"{100 * value:.1f}"  # pycocotools gives -1 where a size has no object


def training_html(stats: dict, folder: str) -> str:
    scalars, source = read_scalars(folder)
    rows = [(name, stats.get(name)) for name in ("variant", "steps", "samples", "final_loss", "samples_per_s",
                                                  "wall_s_this_session", "workers", "use_gpu", "restarts", "skipped_samples",
                                                  "student", "tensorboard") if stats.get(name) is not None]
    rows += [("inputs", ", ".join(stats.get("inputs", []))), ("samples by source (worker 0)", stats.get("samples_by_source_worker0"))]
    if stats.get("sources_without_samples"):
        rows.append(("never drawn", ", ".join(stats["sources_without_samples"])))
    if stats.get("mlflow"):
        rows.append(("MLflow run", f"{stats['mlflow']['run_id']} at {stats['mlflow']['uri']}"))
    evaluation = {tag[len("eval/"):]: points[-1] for tag, points in scalars.items() if tag.startswith("eval/")}
    ap = ""
    if evaluation:
        keys = [k for k in EVAL_KEYS if k in evaluation]
        ap = "<h3>Evaluation (the last one logged)</h3>" + table(
            ["step", *keys], [(max(step for step, _ in evaluation.values()), *(_percent(evaluation[k][1]) for k in keys))])
    charts = [
        image(loss_chart(scalars), "loss curves"),
        image(figures.lines(_series(scalars, "lr/"), xlabel="step", ylabel="learning rate", log=True), "learning rates"),
        image(figures.lines({"grad norm": _series(scalars, "train/").get("grad_norm", ([], []))}, xlabel="step", ylabel="gradient norm"),
              "gradient norm"),
        image(figures.lines({"samples/s": _series(scalars, "train/").get("samples_per_s", ([], []))}, xlabel="step",
                            ylabel="samples/s (all workers)"), "samples per second"),
    ]
    curves = f'<h3>Curves (from {source})</h3><div class="charts">{"".join(charts)}</div>' if source else "<p>No curves: no metrics.jsonl or event files.</p>"
    config = details("configuration", json.dumps(stats.get("config", {}), indent=2))
    return key_value_table(rows) + ap + curves + config
