"""`pipeline demo`: the whole self-training loop on the embedded world, teacher vs student.

Every step is the code a cluster run uses, on one embedded Ray:
1. `world.write_world`: gold, web and test splits of procedural images (nothing downloaded);
2. `train-student` on the gold split (COCO detection + grounding JSON): the `tiny-cpu` teacher
   (plain convs in DyHead), its text encoder all-MiniLM-L6-v2 (shipped by a registry package)
   kept frozen, trained as 2 DDP workers of one core each;
3. `parse-captions` on the web shards;
4. `pseudo-label` of the web shards with the teacher (detections + the student preset);
5. `filter` of the stored detections with every preset;
6. `train-student` on gold + the pseudo shards of `--preset`, starting from the teacher's
   weights (GLIP's second round: the student learns from the teacher's boxes on new images);
   and, as a control, the teacher trained for the same number of steps on gold alone, so the
   report separates what the pseudo-labels bring from what more steps bring;
7. `eval` of teacher, control and student on the held-out test split (pycocotools), and of
   each preset's pseudo-labels against the web split's hidden gold (precision/recall);
8. `report.json` and `report.html` (tables + a gallery of pseudo-labelled images).
"""

from __future__ import annotations

import html
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import typer

from pipeline.world import SIZES, WorldPaths, write_world


@dataclass(frozen=True)
class DemoSchedule:
    teacher_steps: int
    student_steps: int
    batch_size: int = 2  # per worker
    workers: int = 2  # DDP over the 2 cores: 1.6x the samples/s of one 2-thread worker
    min_sizes: tuple[int, ...] = (112, 128, 144)
    test_min_size: int = 128
    max_size: int = 192
    lr: float = 1e-3
    gallery: int = 24


SCHEDULES = {
    "small": DemoSchedule(teacher_steps=4, student_steps=4, min_sizes=(128,), gallery=8),
    "default": DemoSchedule(teacher_steps=560, student_steps=360),
    "large": DemoSchedule(teacher_steps=3000, student_steps=3000),
}
PRESET_NAMES = ("glip", "grit", "owlst")
# The tiny GLIP with plain convs in DyHead; its text encoder starts from all-MiniLM-L6-v2 and
# stays frozen (the fusion layers train): together 3.5x the training samples/s on a CPU.
VARIANT = "tiny-cpu"


class DemoProgress:
    def __init__(self, total: int) -> None:
        self.total, self.step, self.started = total, 0, time.perf_counter()
        self.timings: dict[str, float] = {}
        self._mark = self.started
        self._name = ""

    def begin(self, name: str) -> None:
        self._finish()
        self.step += 1
        self._name, self._mark = name, time.perf_counter()
        print(f"demo [{self.step}/{self.total}] {name} (elapsed {time.perf_counter() - self.started:.0f} s)", file=sys.stderr, flush=True)

    def _finish(self) -> None:
        if self._name:
            self.timings[self._name] = round(time.perf_counter() - self._mark, 2)

    def done(self) -> float:
        self._finish()
        self._name = ""
        return time.perf_counter() - self.started


def _train(out: Path, sources, schedule: DemoSchedule, steps: int, seed: int, *, init: str | None = None) -> dict:
    from pipeline.train_loop import TrainConfig
    from pipeline.train_student import run_training

    config = TrainConfig(
        variant=VARIANT,
        out=str(out),
        sources=tuple(sources),
        steps=steps,
        batch_size=schedule.batch_size,
        min_sizes=schedule.min_sizes,
        max_size=schedule.max_size,
        seed=seed,
        lr=schedule.lr,
        lang_lr=schedule.lr / 10,
        warmup_steps=max(1, steps // 10),
        schedule="cosine",
        init=init,
        init_text=None if init else "minilm",
        checkpoint_every=max(steps, 1),
        log_every=max(1, steps // 10),
        workers=schedule.workers,
        cpus_per_worker=1,
        freeze_text=True,
    )
    outcome = run_training(config)
    stats = json.loads((out / "_stats.json").read_text())
    rate = stats.get("samples_per_s")
    return {
        "checkpoint": outcome.student,
        "steps": outcome.steps,
        "final_loss": outcome.final_loss,
        "samples_per_s": round(rate, 2) if rate is not None else None,
    }


def _evaluate(checkpoint: str, paths: WorldPaths, schedule: DemoSchedule) -> dict:
    from model.predict import GLIPPredictor
    from pipeline.evaluate import evaluate_model

    predictor = GLIPPredictor.from_checkpoint(checkpoint, min_size=schedule.test_min_size, max_size=schedule.max_size)
    started = time.perf_counter()
    result = evaluate_model(predictor, paths.test_coco, paths.test_images, batch_size=4)
    return {**result.as_dict(), "images_per_s": round(result.num_images / (time.perf_counter() - started), 2)}


def run_demo(out: Path, *, size: str = "default", seed: int = 0, preset: str = "glip", control: bool = True) -> dict:
    """Run the loop in `out`; returns the report dict (also written as report.json/html)."""
    from pipeline.cluster import init_ray, shutdown_ray
    from pipeline.evaluate import load_gold, pseudo_predictions, score_boxes
    from pipeline.filter_stage import FilterConfig, run_filter
    from pipeline.filtering import get_preset
    from pipeline.inspect_labels import write_gallery
    from pipeline.parse_captions import ParseCaptionsConfig, run_parse_captions
    from pipeline.pseudo_label import PseudoLabelConfig, run_pseudo_label
    from pipeline.train_data import SourceSpec

    if size not in SCHEDULES:
        raise ValueError(f"unknown --size {size!r}; choose one of {', '.join(SCHEDULES)}")
    schedule = SCHEDULES[size]
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    progress = DemoProgress(total=9 if control else 8)
    started_ray = init_ray(None, include_dashboard=True)  # one embedded Ray for every stage
    try:
        progress.begin("world")
        paths = write_world(out / "world", size=size, seed=seed)
        gold = [
            SourceSpec(kind="coco", paths=(str(paths.gold_coco),), images=str(paths.gold_images)),
            SourceSpec(kind="grounding", paths=(str(paths.gold_grounding),), images=str(paths.gold_images)),
        ]
        progress.begin("train teacher on gold")
        teacher = _train(out / "teacher", gold, schedule, schedule.teacher_steps, seed)

        progress.begin("parse-captions")
        parse_stats = run_parse_captions(ParseCaptionsConfig(inputs=(str(paths.web_shards),), out=str(out / "phrases")))

        progress.begin("pseudo-label")
        label_stats = run_pseudo_label(
            PseudoLabelConfig(
                inputs=(str(paths.web_shards),), phrases=str(out / "phrases"), teacher=teacher["checkpoint"],
                out=str(out / "pseudo_label"), policy=get_preset(preset), min_size=schedule.test_min_size,
                max_size=schedule.max_size, batch_size=4,
            )
        )
        progress.begin("filter (every preset) and pseudo-label quality")
        web_gold = load_gold(paths.web_gold)
        presets = {}
        for name in PRESET_NAMES:
            folder = out / "filtered" / name
            filter_stats = run_filter(
                FilterConfig(inputs=(str(paths.web_shards),), detections=str(out / "pseudo_label"), out=str(folder), policy=get_preset(name))
            )
            quality = score_boxes(web_gold, pseudo_predictions(web_gold, [str(folder / "pseudo")]), class_agnostic=True)
            presets[name] = {
                "images": filter_stats["written"],
                "boxes": filter_stats.get("kept_boxes", 0),
                "precision50": round(quality.precision50, 4),
                "recall50": round(quality.recall50, 4),
                "AP50": round(quality.ap["AP50"], 4),
            }

        progress.begin(f"train student on gold + pseudo ({preset})")
        student_sources = list(gold)
        if presets[preset]["images"]:
            student_sources.append(SourceSpec(kind="pseudo", paths=(str(out / "filtered" / preset / "pseudo"),)))
        else:  # a teacher whose scores all stay under the preset's threshold (e.g. --size small)
            print(f"demo: the {preset} preset kept no pseudo-label (every teacher score is under its threshold); "
                  "the student trains on gold only", flush=True)
        student = _train(out / "student", student_sources, schedule, schedule.student_steps, seed + 1, init=teacher["checkpoint"])
        if control:
            progress.begin("train control: teacher + the same steps on gold only")
            control_run = _train(out / "control", gold, schedule, schedule.student_steps, seed + 1, init=teacher["checkpoint"])

        progress.begin("eval on the test split")
        models = {"teacher": _evaluate(teacher["checkpoint"], paths, schedule), "student": _evaluate(student["checkpoint"], paths, schedule)}
        if control:
            models["control"] = _evaluate(control_run["checkpoint"], paths, schedule)

        progress.begin("report")
        write_gallery(str(out / "filtered" / preset), out / "gallery", n=schedule.gallery, title=f"pseudo-labels ({preset})")
    finally:
        shutdown_ray(started_ray)
    seconds = progress.done()
    report = {
        "size": size,
        "seed": seed,
        "preset": preset,
        "schedule": asdict(schedule),
        "world": asdict(SIZES[size]),
        "models": models,
        "student_minus_teacher_AP": round(100 * (models["student"]["AP"] - models["teacher"]["AP"]), 2),
        "student_pseudo_images": presets[preset]["images"],
        "pseudo_labels": presets,
        "throughput": {
            "parse_captions_per_s": parse_stats["throughput"]["samples_per_s"],
            "pseudo_label_images_per_s": label_stats["throughput"]["samples_per_s"],
            "teacher_train_samples_per_s": teacher["samples_per_s"],
            "student_train_samples_per_s": student["samples_per_s"],
            "eval_images_per_s": models["teacher"]["images_per_s"],
        },
        "training": {"teacher": teacher, "student": student, **({"control": control_run} if control else {})},
        "stage_seconds": progress.timings,
        "total_seconds": round(seconds, 1),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.html").write_text(render_html(report), encoding="utf-8")
    return report


def _pct(value: float) -> str:
    return "n/a" if value < 0 else f"{100 * value:.1f}"


def render_html(report: dict) -> str:
    ap_keys = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    rows = "".join(
        f"<tr><th>{html.escape(name)}</th>" + "".join(f"<td>{_pct(m[k])}</td>" for k in ap_keys) + "</tr>"
        for name, m in report["models"].items()
    )
    presets = "".join(
        f"<tr><th>{html.escape(name)}{' (student)' if name == report['preset'] else ''}</th><td>{p['images']}</td><td>{p['boxes']}</td>"
        f"<td>{_pct(p['precision50'])}</td><td>{_pct(p['recall50'])}</td><td>{_pct(p['AP50'])}</td></tr>"
        for name, p in report["pseudo_labels"].items()
    )
    throughput = "".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in report["throughput"].items())
    stages = "".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in report["stage_seconds"].items())
    delta = report["student_minus_teacher_AP"]
    no_pseudo = ""
    if not report.get("student_pseudo_images", 1):
        no_pseudo = (f"<p><b>The {html.escape(report['preset'])} preset kept no pseudo-label</b> (every teacher score is under "
                     "its threshold): the student trained on gold only, like the control.</p>")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>GLIP data engine demo</title>
<style>body{{font-family:sans-serif;margin:24px;max-width:1100px}}table{{border-collapse:collapse;margin:8px 0 20px}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}th{{text-align:left;background:#f4f4f4}}
.big{{font-size:22px}}iframe{{width:100%;height:900px;border:1px solid #ccc}}</style></head><body>
<h1>GLIP self-training demo</h1>
<p>World <b>{html.escape(report['size'])}</b>, seed {report['seed']}, student preset <b>{html.escape(report['preset'])}</b>,
total {report['total_seconds']} s. Every number below comes from pycocotools on this run's outputs.</p>
<p class="big">Student - teacher: <b>{delta:+.1f} AP</b> on the held-out test split.</p>
<h2>Test split (zero-shot detection, class names as the prompt)</h2>
<table><tr><th>model</th>{''.join(f'<th>{k}</th>' for k in ap_keys)}</tr>{rows}</table>
<p>teacher: trained on gold only; student: teacher weights + {report['schedule']['student_steps']} steps on gold + pseudo;
control: teacher weights + the same steps on gold only.</p>{no_pseudo}
<h2>Pseudo-labels vs the web split's hidden gold (class-agnostic, IoU 0.5)</h2>
<table><tr><th>preset</th><th>images</th><th>boxes</th><th>precision</th><th>recall</th><th>AP50</th></tr>{presets}</table>
<h2>Throughput</h2><table>{throughput}</table>
<h2>Stage times (s)</h2><table>{stages}</table>
<h2>Pseudo-labelled images</h2><p><a href="gallery/index.html">gallery/index.html</a></p>
<iframe src="gallery/index.html"></iframe>
</body></html>"""


def demo_command(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Folder for the world, every stage's output and the report."),
    size: str = typer.Option("default", "--size", help="small (CI, ~1 min), default (<= 10 min on 2 cores) or large."),
    seed: int = typer.Option(0, "--seed", help="World and training seed."),
    preset: str = typer.Option("glip", "--preset", help="Filter preset of the student's pseudo-labels."),
    control: bool = typer.Option(True, "--control/--no-control", help="Also train the gold-only control."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier demo run in --out."),
) -> None:
    """Run the whole self-training loop on an embedded world and report student vs teacher."""
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            print(f"error: --out {out} is not empty: give a new folder, or --overwrite to replace the earlier demo", file=sys.stderr)
            raise typer.Exit(code=2)
        if not (out / "world").is_dir():
            print(f"error: --out {out} does not hold a demo run: not overwriting it", file=sys.stderr)
            raise typer.Exit(code=2)
        shutil.rmtree(out)
    from pipeline.train_data import TrainDataError
    from pipeline.train_student import TrainingInterrupted

    try:
        report = run_demo(out, size=size, seed=seed, preset=preset, control=control)
    except (ValueError, TrainDataError, TrainingInterrupted, FileNotFoundError) as error:
        print(f"error: demo stopped: {error}", file=sys.stderr)
        raise typer.Exit(code=1) from None
    models = report["models"]
    print(
        f"demo: teacher AP {100 * models['teacher']['AP']:.1f}, student AP {100 * models['student']['AP']:.1f} "
        f"({report['student_minus_teacher_AP']:+.1f})"
        + (f", control AP {100 * models['control']['AP']:.1f}" if "control" in models else "")
        + f"; report: {out / 'report.html'} ({report['total_seconds']:.0f} s)"
    )

