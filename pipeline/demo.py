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

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import typer
from typing import Optional

from pipeline.demo_report import render_html
from pipeline.user_errors import fail
from pipeline.world import BASE_KINDS, SIZES, TAIL_KINDS, WorldPaths, write_world


@dataclass(frozen=True)
class StudentRecipe:
    """How the student learns from the teacher's pseudo-labels (each a `train-student` option).

    The control gets the same augmentation, steps, initialisation and gold; the pseudo-label
    options only touch pseudo samples, which the control has none of.
    """

    pseudo_weight: float = 1.0  # mixing weight of the pseudo source (each gold source weighs 1)
    score_weight: bool = False  # --pseudo-score-weight
    ignore_below: float = 0.0  # --pseudo-ignore-below
    background_weight: float = 1.0  # --pseudo-background-weight
    augment: str = "weak"  # --augment (student and control)
    phrase_score: str = "mean"  # the teacher's phrase scores in pseudo-label (--phrase-score)
    assign: str = "none"  # the filter's box-to-phrase matching (--assign none|caption)


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
    # The tiny GLIP with plain convs in DyHead on an ImageNet-pretrained MobileNetV2 (the only
    # pretrained visual weights available offline); its text encoder starts from
    # all-MiniLM-L6-v2 and stays frozen (the fusion layers train).
    variant: str = "tiny-mnv2"
    init_backbone: str | None = "imagenet"
    recipe: StudentRecipe = StudentRecipe()


# The student recipe measured best on the default world (README's ablation table): Noisy
# Student's strong augmentation (for the control too), Soft Teacher's score-weighted
# classification loss, and the background of pseudo images at half weight.
RECIPE = StudentRecipe(score_weight=True, background_weight=0.5, augment="strong")
SCHEDULES = {
    "small": DemoSchedule(teacher_steps=4, student_steps=4, min_sizes=(128,), gallery=8, recipe=RECIPE),
    "default": DemoSchedule(teacher_steps=560, student_steps=360, recipe=RECIPE),
    "large": DemoSchedule(teacher_steps=3000, student_steps=3000, recipe=RECIPE),
}
PRESET_NAMES = ("glip", "grit", "owlst")
WORLD_DESCRIPTION = (
    f"The gold split (the teacher's human annotations) draws and names only the base kinds "
    f"({', '.join(BASE_KINDS)}), as COCO or Flickr30k annotate a fixed, narrow vocabulary. The web split is several "
    f"times larger and holds every kind; the tail kinds ({', '.join(TAIL_KINDS)}) appear only there, named by the "
    "captions alone, as CC3M/SBU alt-texts name concepts no detection set boxes. The test split covers every kind, so "
    "its tail AP measures what the loop learnt from captions (GLIP's LVIS-rare gain from CC3M+SBU, OWL-ST's APr gain)."
)


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


def _train(
    out: Path, sources, schedule: DemoSchedule, steps: int, seed: int, *, init: str | None = None,
    recipe: StudentRecipe | None = None,
) -> dict:
    """Train one arm: the teacher (`recipe` None: the official weak augmentation) or, from
    `init`, the student or the control with `recipe`'s options."""
    from pipeline.train_config import CheckpointPolicy, DataConfig, OptimizerConfig, Resources, StudentModel, TrainConfig
    from pipeline.train_data.specs import AugmentSettings, PseudoWeighting
    from pipeline.train_student import augment_options, run_training

    augment, pseudo = {}, PseudoWeighting()
    if recipe is not None:
        augment = augment_options(recipe.augment)
        pseudo = PseudoWeighting(
            score_weight=recipe.score_weight, ignore_below=recipe.ignore_below, background_weight=recipe.background_weight
        )

    config = TrainConfig(
        out=str(out),
        steps=steps,
        seed=seed,
        log_every=max(1, steps // 10),
        model=StudentModel(
            variant=schedule.variant,
            init=init,
            init_text=None if init else "minilm",
            init_backbone=None if init else schedule.init_backbone,
            freeze_text=True,
        ),
        data=DataConfig(
            sources=tuple(sources),
            batch_size=schedule.batch_size,
            augment=AugmentSettings(min_sizes=schedule.min_sizes, max_size=schedule.max_size, **augment),
            pseudo=pseudo,
        ),
        optimizer=OptimizerConfig(lr=schedule.lr, lang_lr=schedule.lr / 10, warmup_steps=max(1, steps // 10), schedule="cosine"),
        resources=Resources(workers=schedule.workers, cpus_per_worker=1),
        checkpoints=CheckpointPolicy(every=max(steps, 1)),
    )
    outcome = run_training(config)
    stats = json.loads((out / "_stats.json").read_text())
    rate = stats.get("samples_per_s")
    return {
        "checkpoint": outcome.student,
        "steps": outcome.steps,
        "final_loss": outcome.final_loss,
        "samples_per_s": round(rate, 2) if rate is not None else None,
        "samples_by_source": stats.get("samples_by_source_worker0", {}),
    }


def _evaluate(checkpoint: str, paths: WorldPaths, schedule: DemoSchedule) -> dict:
    from model.predict import GLIPPredictor
    from pipeline.evaluate import evaluate_model

    predictor = GLIPPredictor.from_checkpoint(checkpoint, min_size=schedule.test_min_size, max_size=schedule.max_size)
    started = time.perf_counter()
    result = evaluate_model(predictor, paths.test_coco, paths.test_images, batch_size=4)
    return {
        **result.as_dict(),
        "AP_base": result.group_ap(BASE_KINDS),
        "AP_tail": result.group_ap(TAIL_KINDS),
        "images_per_s": round(result.num_images / (time.perf_counter() - started), 2),
    }


def run_demo(
    out: Path, *, size: str = "default", seed: int = 0, preset: str = "glip", control: bool = True,
    recipe: StudentRecipe | None = None,
) -> dict:
    """Run the loop in `out`; returns the report dict (also written as report.json/html).
    `recipe` overrides the schedule's student recipe."""
    from pipeline.cluster import init_ray, shutdown_ray

    if size not in SCHEDULES:
        raise ValueError(f"unknown --size {size!r}; choose one of {', '.join(SCHEDULES)}")
    schedule = SCHEDULES[size] if recipe is None else replace(SCHEDULES[size], recipe=recipe)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    progress = DemoProgress(total=9 if control else 8)
    started_ray = init_ray(None, include_dashboard=True)  # one embedded Ray for every stage
    try:
        runs = _run_stages(out, size=size, seed=seed, preset=preset, control=control, schedule=schedule, progress=progress)
    finally:
        shutdown_ray(started_ray)
    seconds = progress.done()
    report = _report(runs, size=size, seed=seed, preset=preset, schedule=schedule, progress=progress, seconds=seconds)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.html").write_text(render_html(report), encoding="utf-8")
    return report


def _run_stages(out: Path, *, size: str, seed: int, preset: str, control: bool, schedule: DemoSchedule, progress) -> dict:
    """Every stage of the loop, in order; returns what the report is made of."""
    from pipeline.filtering import get_preset
    from pipeline.inspect_labels import write_gallery
    from pipeline.parse_captions import ParseCaptionsConfig, run_parse_captions
    from pipeline.pseudo_label import PseudoLabelConfig, run_pseudo_label
    from pipeline.train_data import SourceSpec

    recipe = schedule.recipe
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
            max_size=schedule.max_size, batch_size=4, phrase_score=recipe.phrase_score,
        )
    )
    progress.begin("filter (every preset) and pseudo-label quality")
    presets, curves = _filter_every_preset(out, paths, assign=recipe.assign)

    progress.begin(f"train student on gold + pseudo ({preset})")
    student_sources = list(gold)
    if presets[preset]["images"]:
        pseudo_folder = str(out / "filtered" / preset / "pseudo")
        student_sources.append(SourceSpec(kind="pseudo", paths=(pseudo_folder,), weight=recipe.pseudo_weight))
    else:  # a teacher whose scores all stay under the preset's threshold (e.g. --size small)
        print(f"demo: the {preset} preset kept no pseudo-label (every teacher score is under its threshold); "
              "the student trains on gold only", flush=True)
    arms = {"teacher": teacher}
    arms["student"] = _train(
        out / "student", student_sources, schedule, schedule.student_steps, seed + 1, init=teacher["checkpoint"], recipe=recipe
    )
    if control:
        progress.begin("train control: teacher + the same steps, augmentation and gold, no pseudo-labels")
        arms["control"] = _train(
            out / "control", gold, schedule, schedule.student_steps, seed + 1, init=teacher["checkpoint"], recipe=recipe
        )

    progress.begin("eval on the test split")
    models = {name: _evaluate(run["checkpoint"], paths, schedule) for name, run in arms.items()}

    progress.begin("report")
    write_gallery(str(out / "filtered" / preset), out / "gallery", n=schedule.gallery, title=f"pseudo-labels ({preset})")
    return {
        "models": models, "arms": arms, "presets": presets, "curves": curves,
        "parse_stats": parse_stats, "label_stats": label_stats, "pseudo_sources": len(student_sources) > len(gold),
    }


def _filter_every_preset(out: Path, paths: WorldPaths, *, assign: str = "none") -> tuple[dict, dict]:
    """`filter` the stored detections with each preset; rate each against the web split's
    hidden gold (class-agnostic, IoU 0.5), with its precision-recall curve over score thresholds."""
    from pipeline.demo_report import pr_curve
    from pipeline.evaluate import load_gold, pseudo_predictions, score_boxes
    from pipeline.filter_stage import FilterConfig, run_filter
    from pipeline.filtering import get_preset

    web_gold = load_gold(paths.web_gold)
    presets, curves = {}, {}
    for name in PRESET_NAMES:
        folder = out / "filtered" / name
        policy = get_preset(name).with_overrides(assign=None if assign == "none" else assign)
        filter_stats = run_filter(
            FilterConfig(inputs=(str(paths.web_shards),), detections=str(out / "pseudo_label"), out=str(folder), policy=policy)
        )
        predictions = pseudo_predictions(web_gold, [str(folder / "pseudo")])
        quality = score_boxes(web_gold, predictions, class_agnostic=True)
        presets[name] = {
            "images": filter_stats["written"],
            "boxes": filter_stats.get("kept_boxes", 0),
            "precision50": round(quality.precision50, 4),
            "recall50": round(quality.recall50, 4),
            "AP50": round(quality.ap["AP50"], 4),
        }
        curves[name] = pr_curve(web_gold, predictions)
    return presets, curves


def _gap(models: dict, key: str, a: str, b: str) -> float | None:
    if a not in models or b not in models:
        return None  # --no-control
    return round(100 * (models[a][key] - models[b][key]), 2)


def _report(runs: dict, *, size: str, seed: int, preset: str, schedule: DemoSchedule, progress, seconds: float) -> dict:
    from pipeline.demo_report import ap_chart, pr_chart

    models, arms, presets = runs["models"], runs["arms"], runs["presets"]
    drawn = arms["student"].get("samples_by_source", {})
    recipe = schedule.recipe
    weights = {"coco": 1.0, "grounding": 1.0, **({"pseudo": recipe.pseudo_weight} if runs["pseudo_sources"] else {})}
    report = {
        "size": size,
        "seed": seed,
        "preset": preset,
        "schedule": asdict(schedule),
        "world": asdict(SIZES[size]),
        "world_description": WORLD_DESCRIPTION,
        "models": models,
        "gaps": {
            "student_minus_control": _gap(models, "AP", "student", "control"),
            "student_minus_teacher": _gap(models, "AP", "student", "teacher"),
            "tail_student_minus_control": _gap(models, "AP_tail", "student", "control"),
            "base_student_minus_control": _gap(models, "AP_base", "student", "control"),
        },
        "student_minus_teacher_AP": _gap(models, "AP", "student", "teacher"),
        "student_pseudo_images": presets[preset]["images"],
        "student_recipe": asdict(recipe),
        "student_mix": {
            "weights": weights,
            "samples_drawn_worker0": drawn,
            "pseudo_fraction": round(drawn.get("pseudo", 0) / max(sum(drawn.values()), 1), 4),
        },
        "pseudo_labels": presets,
        "pseudo_label_curves": runs["curves"],
        "throughput": {
            "parse_captions_per_s": runs["parse_stats"]["throughput"]["samples_per_s"],
            "pseudo_label_images_per_s": runs["label_stats"]["throughput"]["samples_per_s"],
            "teacher_train_samples_per_s": arms["teacher"]["samples_per_s"],
            "student_train_samples_per_s": arms["student"]["samples_per_s"],
            "eval_images_per_s": models["teacher"]["images_per_s"],
        },
        "training": arms,
        "stage_seconds": progress.timings,
        "total_seconds": round(seconds, 1),
    }
    report["charts"] = {"ap": ap_chart(models), "pr": pr_chart(runs["curves"], presets)}
    return report


def demo_command(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Folder for the world, every stage's output and the report."),
    size: str = typer.Option("default", "--size", help="small (CI, ~1 min), default (<= 10 min on 2 cores) or large."),
    seed: int = typer.Option(0, "--seed", help="World and training seed."),
    preset: str = typer.Option("glip", "--preset", help="Filter preset of the student's pseudo-labels."),
    control: bool = typer.Option(True, "--control/--no-control", help="Also train the gold-only control."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier demo run in --out."),
    pseudo_weight: Optional[float] = typer.Option(None, "--pseudo-weight", help="Mixing weight of the pseudo source (gold sources weigh 1)."),
    pseudo_score_weight: Optional[bool] = typer.Option(
        None, "--pseudo-score-weight/--no-pseudo-score-weight", help="Score-weighted classification loss on pseudo boxes."
    ),
    pseudo_ignore_below: Optional[float] = typer.Option(None, "--pseudo-ignore-below", help="Ignore band: pseudo boxes under T."),
    pseudo_background_weight: Optional[float] = typer.Option(None, "--pseudo-background-weight", help="Background weight in pseudo images."),
    augment: Optional[str] = typer.Option(None, "--augment", help="weak or strong, for student and control alike."),
    phrase_score: Optional[str] = typer.Option(None, "--phrase-score", help="The teacher's phrase scores: mean or max."),
    assign: Optional[str] = typer.Option(None, "--assign", help="The filter's phrase matching: none or caption."),
) -> None:
    """Run the whole self-training loop on an embedded world: teacher, student and gold-only control.

    The student recipe defaults to the size's schedule; each option overrides one ingredient
    (the README's ablation table is made of such runs), e.g.

        pipeline demo --out runs/weak --augment weak
    """
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise fail(f"--out {out} is not empty: give a new folder, or --overwrite to replace the earlier demo")
        if not (out / "world").is_dir():
            raise fail(f"--out {out} does not hold a demo run: not overwriting it")
        shutil.rmtree(out)
    from pipeline.train_data import TrainDataError
    from pipeline.train_student import TrainingInterrupted

    overrides = {
        "pseudo_weight": pseudo_weight, "score_weight": pseudo_score_weight, "ignore_below": pseudo_ignore_below,
        "background_weight": pseudo_background_weight, "augment": augment, "phrase_score": phrase_score,
        "assign": assign,
    }
    base = SCHEDULES.get(size, SCHEDULES["default"]).recipe
    recipe = replace(base, **{k: v for k, v in overrides.items() if v is not None})
    try:
        report = run_demo(out, size=size, seed=seed, preset=preset, control=control, recipe=recipe)
    except (ValueError, TrainDataError, TrainingInterrupted, FileNotFoundError) as error:
        print(f"error: demo stopped: {error}", file=sys.stderr)
        raise typer.Exit(code=1) from None
    models, gaps = report["models"], report["gaps"]
    arms = ", ".join(
        f"{name} AP {100 * m['AP']:.1f} (tail {100 * max(m['AP_tail'], 0):.1f})" for name, m in models.items()
    )
    print(f"demo: {arms}; report: {out / 'report.html'} ({report['total_seconds']:.0f} s)")
    control_gap = f"student - control {gaps['student_minus_control']:+.1f} AP, " if "control" in models else ""
    print(f"demo: {control_gap}student - teacher {gaps['student_minus_teacher']:+.1f} AP")

