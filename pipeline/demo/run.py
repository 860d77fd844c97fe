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

from pipeline.demo.report import render_html
from pipeline.demo.world import BASE_KINDS, SIZES, TAIL_KINDS, WorldPaths, write_world
from pipeline.user_errors import fail


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
# `--preset calibrated`: the student trains on the policy `pipeline calibrate` picked on 10% of
# the web split's hidden gold (the few hundred images a user would check by hand).
CALIBRATED = "calibrated"
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
        self.earlier: dict[str, float] = {}  # stages skipped on --resume, with their recorded seconds
        self._mark = self.started
        self._name = ""

    def begin(self, name: str) -> None:
        self._finish()
        self.step += 1
        self._name, self._mark = name, time.perf_counter()
        print(f"demo [{self.step}/{self.total}] {name} (elapsed {time.perf_counter() - self.started:.0f} s)", file=sys.stderr, flush=True)

    def skip(self, name: str, seconds: float) -> None:
        """A stage finished by an earlier, interrupted run (`--resume`): its time is that run's."""
        self._finish()
        self.step += 1
        self._name = ""
        self.timings[name] = seconds
        self.earlier[name] = seconds
        print(f"demo [{self.step}/{self.total}] {name}: done by an earlier run, skipped", file=sys.stderr, flush=True)

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
    from pipeline.train.config import CheckpointPolicy, DataConfig, OptimizerConfig, Resources, StudentModel, TrainConfig
    from pipeline.train.data.specs import AugmentSettings, PseudoWeighting
    from pipeline.train.driver import run_training
    from pipeline.train.student import augment_options

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
    try:
        outcome = run_training(config)
    except FileExistsError:  # `out` holds the run a killed demo was training: continue it (--resume)
        outcome = run_training(config, resume=True)
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
    from pipeline.evaluation.evaluate import evaluate_model

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
    recipe: StudentRecipe | None = None, rounds: int = 1, resume: bool = False,
) -> dict:
    """Run the loop in `out`; returns the report dict (also written as report.json/html).
    `recipe` overrides the schedule's student recipe; `rounds` > 1 runs the loop again with
    each round's student as the next teacher; `resume` goes on with the run `out` holds."""
    from pipeline.cluster import init_ray, shutdown_ray
    from pipeline.demo.state import DemoState

    if size not in SCHEDULES:
        raise ValueError(f"unknown --size {size!r}; choose one of {', '.join(SCHEDULES)}")
    if rounds < 1:
        raise ValueError(f"--rounds must be at least 1, got {rounds}")
    schedule = SCHEDULES[size] if recipe is None else replace(SCHEDULES[size], recipe=recipe)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    state = DemoState(out, _resume_settings(size=size, seed=seed, preset=preset, control=control, schedule=schedule), resume=resume)
    progress = DemoProgress(total=_stage_count(rounds, control))
    started_ray = init_ray(None, include_dashboard=True)  # one embedded Ray for every stage
    try:
        runs = _run_stages(
            out, size=size, seed=seed, preset=preset, control=control, schedule=schedule, progress=progress, rounds=rounds, state=state
        )
    finally:
        shutdown_ray(started_ray)
    seconds = progress.done()
    report = _report(runs, size=size, seed=seed, preset=preset, schedule=schedule, progress=progress, seconds=seconds)
    report.update(_loop_sections(runs, progress=progress, seconds=seconds))
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.html").write_text(render_html(report), encoding="utf-8")
    return report


# Stages before the rounds (world, decontaminate, teacher, parse-captions), then per round
# pseudo-label, filter, calibrate, student, [control], eval; then the report.
def _stage_count(rounds: int, control: bool) -> int:
    return 4 + rounds * (5 + int(control)) + 1


def _resume_settings(*, size: str, seed: int, preset: str, control: bool, schedule: DemoSchedule) -> dict:
    """What a `--resume` must find unchanged (everything but the number of rounds)."""
    from pipeline.demo.calibration import DemoCalibration
    from pipeline.demo.decontamination import DEMO_MAX_DISTANCE

    return {
        "size": size, "seed": seed, "preset": preset, "control": control, "schedule": asdict(schedule),
        "world": asdict(SIZES[size]), "calibration": asdict(DemoCalibration()), "decontaminate_max_distance": DEMO_MAX_DISTANCE,
    }


def _run_stages(
    out: Path, *, size: str, seed: int, preset: str, control: bool, schedule: DemoSchedule, progress, rounds: int = 1, state,
) -> dict:
    """Every stage of the loop, in order; returns what the report is made of: round 1's
    results at the top (the report's main tables) and every round's under "rounds"."""
    from pipeline.demo.decontamination import decontaminate_web
    from pipeline.demo.world import world_paths
    from pipeline.stages.inspect_labels import write_gallery
    from pipeline.stages.parse_captions import ParseCaptionsConfig, run_parse_captions
    from pipeline.train.data import SourceSpec

    state.run("world", progress, lambda: str(write_world(out / "world", size=size, seed=seed).root))
    paths = world_paths(out / "world")
    # The test split's copies leave the web split before anything reads it; every later stage
    # reads the cleaned shards.
    decontamination = state.run(
        "decontaminate the web shards against the test images", progress, lambda: decontaminate_web(paths, out / "web_clean")
    )
    shards = str(out / "web_clean")
    gold = [
        SourceSpec(kind="coco", paths=(str(paths.gold_coco),), images=str(paths.gold_images)),
        SourceSpec(kind="grounding", paths=(str(paths.gold_grounding),), images=str(paths.gold_images)),
    ]
    teacher = state.run("train teacher on gold", progress, lambda: _train(out / "teacher", gold, schedule, schedule.teacher_steps, seed))
    parse_stats = state.run(
        "parse-captions", progress, lambda: run_parse_captions(ParseCaptionsConfig(inputs=(shards,), out=str(out / "phrases")))
    )
    done: list[dict] = []
    for number in range(1, rounds + 1):
        previous = done[-1] if done else None
        done.append(
            _run_round(
                out, number, teacher=teacher if previous is None else previous["arms"]["student"],
                teacher_metrics=None if previous is None else previous["models"]["student"], shards=shards, paths=paths, gold=gold,
                schedule=schedule, seed=seed, preset=preset, control=control, progress=progress, state=state,
            )
        )
    progress.begin("report")
    for run in done:
        folder = out / run["folder"]
        labels = folder / "calibration" / "filtered" if preset == CALIBRATED else folder / "filtered" / preset
        if not (labels / "pseudo").is_dir():
            continue
        write_gallery(str(labels), folder / "gallery", n=schedule.gallery,
                      title=f"pseudo-labels ({preset}, round {run['round']})")
    return {**done[0], "parse_stats": parse_stats, "decontamination": decontamination, "rounds": done}


def _run_round(
    out: Path, number: int, *, teacher: dict, teacher_metrics: dict | None, shards: str, paths: WorldPaths, gold: list,
    schedule: DemoSchedule, seed: int, preset: str, control: bool, progress, state,
) -> dict:
    """One round of the loop with `teacher` (round 1: the gold-trained teacher; round k: round
    k-1's student) in its own folder (round 1: `out` itself, round k: `out/round_k`): pseudo-label,
    filter with every preset, calibrate, the student and the control from the teacher's weights
    (seed + k), eval. `teacher_metrics`: the teacher's eval when an earlier round made it."""
    from pipeline.demo.calibration import calibrate_on_part
    from pipeline.stages.filtering import get_preset
    from pipeline.stages.pseudo_label import PseudoLabelConfig, run_pseudo_label
    from pipeline.train.data import SourceSpec

    folder = out if number == 1 else out / f"round_{number}"
    recipe = schedule.recipe

    def stage(name: str) -> str:
        return name if number == 1 else f"round {number}: {name}"

    label_stats = state.run(stage("pseudo-label"), progress, lambda: run_pseudo_label(
        PseudoLabelConfig(
            inputs=(shards,), phrases=str(out / "phrases"), teacher=teacher["checkpoint"],
            out=str(folder / "pseudo_label"), policy=get_preset("glip" if preset == CALIBRATED else preset), min_size=schedule.test_min_size,
            max_size=schedule.max_size, batch_size=4, phrase_score=recipe.phrase_score,
        )
    ))
    presets, curves = state.run(
        stage("filter (every preset) and pseudo-label quality"), progress,
        lambda: _filter_every_preset(folder, paths, shards=shards, assign=recipe.assign),
    )
    calibration = state.run(stage("calibrate on part of the web gold, filter the rest"), progress, lambda: calibrate_on_part(
        shards=shards, detections=str(folder / "pseudo_label"), web_gold=paths.web_gold, out=folder / "calibration",
        filtered={name: str(folder / "filtered" / name) for name in PRESET_NAMES}, seed=seed,
    ))
    student_sources = list(gold)
    labels = _student_labels(folder, preset, presets, calibration)
    if labels is not None:
        student_sources.append(SourceSpec(kind="pseudo", paths=(labels,), weight=recipe.pseudo_weight))
    else:  # a teacher whose scores all stay under the preset's threshold (e.g. --size small)
        print(f"demo: the {preset} preset kept no pseudo-label (every teacher score is under its threshold); "
              "the student trains on gold only", flush=True)
    arms = {"teacher": teacher}
    arms["student"] = state.run(stage(f"train student on gold + pseudo ({preset})"), progress, lambda: _train(
        folder / "student", student_sources, schedule, schedule.student_steps, seed + number, init=teacher["checkpoint"], recipe=recipe
    ))
    if control:
        arms["control"] = state.run(
            stage("train control: teacher + the same steps, augmentation and gold, no pseudo-labels"), progress,
            lambda: _train(folder / "control", gold, schedule, schedule.student_steps, seed + number, init=teacher["checkpoint"], recipe=recipe),
        )

    def evaluate_arms() -> dict:
        return {
            name: teacher_metrics if name == "teacher" and teacher_metrics is not None else _evaluate(run["checkpoint"], paths, schedule)
            for name, run in arms.items()
        }

    models = state.run(stage("eval on the test split"), progress, evaluate_arms)
    return {
        "round": number, "folder": str(folder.relative_to(out)), "models": models, "arms": arms, "presets": presets,
        "curves": curves, "calibration": calibration, "label_stats": label_stats, "pseudo_sources": len(student_sources) > len(gold),
    }


def _student_labels(folder: Path, preset: str, presets: dict, calibration: dict) -> str | None:
    """The pseudo shards the student reads: a preset's filter output, or the calibrated policy's
    (`--preset calibrated`; None when calibrate refused the sample), None when they are empty."""
    if preset == CALIBRATED:
        if "refused" in calibration or not calibration.get("filtered_images"):
            print(f"demo: no calibrated pseudo-labels ({calibration.get('refused', 'no image kept')}); "
                  "the student trains on gold only", flush=True)
            return None
        return str(folder / "calibration" / "filtered" / "pseudo")
    return str(folder / "filtered" / preset / "pseudo") if presets[preset]["images"] else None


def _filter_every_preset(out: Path, paths: WorldPaths, *, shards: str, assign: str = "none") -> tuple[dict, dict]:
    """`filter` the stored detections with each preset; rate each against the web split's
    hidden gold (class-agnostic, IoU 0.5), with its precision-recall curve over score thresholds."""
    from pipeline.demo.report import pr_curve
    from pipeline.evaluation.evaluate import load_gold, pseudo_predictions, score_boxes
    from pipeline.stages.filter_stage import FilterConfig, run_filter
    from pipeline.stages.filtering import get_preset

    web_gold = load_gold(paths.web_gold)
    presets, curves = {}, {}
    for name in PRESET_NAMES:
        folder = out / "filtered" / name
        policy = get_preset(name).with_overrides(assign=None if assign == "none" else assign)
        filter_stats = run_filter(
            FilterConfig(inputs=(shards,), detections=str(out / "pseudo_label"), out=str(folder), policy=policy)
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
    from pipeline.demo.report import ap_chart, pr_chart

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
        "student_pseudo_images": (runs["calibration"].get("filtered_images", 0) if preset == CALIBRATED else presets[preset]["images"]),
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
    report["charts"] = {"ap": ap_chart(models), "pr": pr_chart(runs["curves"], presets, runs["calibration"])}
    return report


def _loop_sections(runs: dict, *, progress, seconds: float) -> dict:
    """The report's sections on decontamination, calibration and rounds (see `_run_stages`)."""
    from pipeline.demo.report import AP_SUMMARY

    rounds = []
    for run in runs["rounds"]:
        models = run["models"]
        rounds.append({
            "round": run["round"],
            "folder": run["folder"],
            "teacher_checkpoint": run["arms"]["teacher"]["checkpoint"],
            "models": {name: {key: m[key] for key in AP_SUMMARY} for name, m in models.items()},
            "student_minus_control": _gap(models, "AP", "student", "control"),
            "student_minus_teacher": _gap(models, "AP", "student", "teacher"),
            "pseudo_labels": run["presets"],
            "calibration": run["calibration"],
        })
    return {
        "decontamination": runs["decontamination"],
        "calibration": runs["calibration"],
        "rounds": rounds,
        "resumed_stages": sorted(progress.earlier),
        "total_seconds": round(seconds + sum(progress.earlier.values()), 1),
    }


def demo_command(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Folder for the world, every stage's output and the report."),
    size: str = typer.Option("default", "--size", help="small (CI, ~1 min), default (<= 10 min on 2 cores) or large."),
    seed: int = typer.Option(0, "--seed", help="World and training seed."),
    preset: str = typer.Option("glip", "--preset", help="Filter preset of the student's pseudo-labels (glip, grit, owlst), or calibrated: the policy calibrate picks on 10% of the web gold."),
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
    rounds: int = typer.Option(1, "--rounds", min=1, help="Rounds of the loop: round k's teacher is round k-1's student."),
    resume: bool = typer.Option(False, "--resume", help="Go on with the interrupted (or finished) demo in --out: skip its finished rounds and stages."),
) -> None:
    """Run the whole self-training loop on an embedded world: teacher, student and gold-only control.

    The student recipe defaults to the size's schedule; each option overrides one ingredient
    (the README's ablation table is made of such runs), e.g.

        pipeline demo --out runs/weak --augment weak

    Two rounds (round 2's teacher is round 1's student), and going on after an interruption:

        pipeline demo --out runs/r2 --rounds 2

        pipeline demo --out runs/r2 --rounds 2 --resume
    """
    if preset not in (*PRESET_NAMES, CALIBRATED):
        raise fail(f"--preset {preset}: not one of {', '.join((*PRESET_NAMES, CALIBRATED))}")
    if resume and overwrite:
        raise fail("--resume and --overwrite exclude each other")
    if out.exists() and any(out.iterdir()) and not resume:
        if not overwrite:
            raise fail(f"--out {out} is not empty: give a new folder, --resume to go on with it, or --overwrite to replace "
                       "the earlier demo")
        if not (out / "world").is_dir():
            raise fail(f"--out {out} does not hold a demo run: not overwriting it")
        shutil.rmtree(out)
    from pipeline.train.data import TrainDataError
    from pipeline.train.driver import TrainingInterrupted

    overrides = {
        "pseudo_weight": pseudo_weight, "score_weight": pseudo_score_weight, "ignore_below": pseudo_ignore_below,
        "background_weight": pseudo_background_weight, "augment": augment, "phrase_score": phrase_score,
        "assign": assign,
    }
    base = SCHEDULES.get(size, SCHEDULES["default"]).recipe
    recipe = replace(base, **{k: v for k, v in overrides.items() if v is not None})
    from pipeline.demo.state import DemoResumeError

    try:
        report = run_demo(out, size=size, seed=seed, preset=preset, control=control, recipe=recipe, rounds=rounds, resume=resume)
    except DemoResumeError as error:
        raise fail(str(error)) from None
    except (ValueError, TrainDataError, TrainingInterrupted, FileNotFoundError) as error:
        print(f"error: demo stopped: {error}", file=sys.stderr)
        raise typer.Exit(code=1) from None
    models, gaps = report["models"], report["gaps"]
    arms = ", ".join(
        f"{name} AP {100 * m['AP']:.1f} (tail {100 * max(m['AP_tail'], 0):.1f})" for name, m in models.items()
    )
    print(f"demo: {arms}; report: {out / 'report.html'} ({report['total_seconds']:.0f} s)")
    _print_loop_sections(report)
    control_gap = f"student - control {gaps['student_minus_control']:+.1f} AP, " if "control" in models else ""
    print(f"demo: {control_gap}student - teacher {gaps['student_minus_teacher']:+.1f} AP")



def _print_loop_sections(report: dict) -> None:
    """One line each on decontamination, calibration and every later round."""
    clean = report["decontamination"]
    print(f"demo: decontaminate: {clean['found']}/{clean['injected']} copies of test images found, "
          f"{clean['false_matches']} other web images dropped (--max-distance {clean['max_distance']})")
    calibration = report["calibration"]
    if "refused" in calibration:
        print(f"demo: calibrate: refused: {calibration['refused']}")
    else:
        low, high = calibration["sample"]["precision_interval"]
        print(f"demo: calibrate: target precision {calibration['settings']['target_precision']}, "
              f"{calibration['sample']['precision']:.3f} [{low:.3f}, {high:.3f}] on the sample, "
              f"{calibration['calibrated_on_rest']['precision50']:.3f} on the rest "
              f"({'inside' if calibration['inside_interval'] else 'OUTSIDE'} the interval)")
    for entry in report["rounds"][1:]:
        arms = ", ".join(f"{name} AP {100 * m['AP']:.1f}" for name, m in entry["models"].items())
        print(f"demo: round {entry['round']}: {arms}")
