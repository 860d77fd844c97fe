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
from dataclasses import asdict, replace
from pathlib import Path

import typer
from typing import Optional

from pipeline import run_log
from pipeline.demo.arms import SCHEDULES, DemoSchedule, StudentRecipe
from pipeline.demo.report import render_html
from pipeline.demo.rounds import CALIBRATED, PRESET_NAMES, run_stages, stage_count
from pipeline.demo.world import BASE_KINDS, SIZES, TAIL_KINDS
from pipeline.user_errors import fail

LOG_FILE = "demo.log"  # Ray's own lines of the run (`pipeline.run_log`)

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


def run_demo(
    out: Path, *, size: str = "default", seed: int = 0, preset: str | None = None, control: bool = True,
    recipe: StudentRecipe | None = None, rounds: int = 1, resume: bool = False,
) -> dict:
    """Run the loop in `out`; returns the report dict (also written as report.json/html).
    `preset` (None: the schedule's) picks the student's pseudo-labels; `recipe` overrides the
    schedule's student recipe; `rounds` > 1 runs the loop again with
    each round's student as the next teacher; `resume` goes on with the run `out` holds."""
    from pipeline.cluster import init_ray, shutdown_ray
    from pipeline.demo.state import DemoState

    if size not in SCHEDULES:
        raise ValueError(f"unknown --size {size!r}; choose one of {', '.join(SCHEDULES)}")
    if rounds < 1:
        raise ValueError(f"--rounds must be at least 1, got {rounds}")
    schedule = SCHEDULES[size] if recipe is None else replace(SCHEDULES[size], recipe=recipe)
    preset = preset or schedule.preset
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    state = DemoState(out, _resume_settings(size=size, seed=seed, preset=preset, control=control, schedule=schedule), resume=resume)
    progress = DemoProgress(total=stage_count(rounds, control))
    if not run_log.verbose():
        run_log.use_log_file(out / LOG_FILE)
        print(f"demo: Ray's own log lines go to {out / LOG_FILE} (--verbose or GLIP_VERBOSE=1 shows them here)",
              file=sys.stderr, flush=True)
    started_ray = init_ray(None, include_dashboard=True)  # one embedded Ray for every stage
    try:
        runs = run_stages(
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


def _resume_settings(*, size: str, seed: int, preset: str, control: bool, schedule: DemoSchedule) -> dict:
    """What a `--resume` must find unchanged (everything but the number of rounds)."""
    from pipeline.demo.calibration import DemoCalibration
    from pipeline.demo.decontamination import DEMO_MAX_DISTANCE

    return {
        "size": size, "seed": seed, "preset": preset, "control": control, "schedule": asdict(schedule),
        "world": asdict(SIZES[size]), "calibration": asdict(DemoCalibration()), "decontaminate_max_distance": DEMO_MAX_DISTANCE,
    }


def _gap(models: dict, key: str, a: str, b: str) -> float | None:
    if a not in models or b not in models:
        return None  # --no-control
    return round(100 * (models[a][key] - models[b][key]), 2)


def _report(runs: dict, *, size: str, seed: int, preset: str, schedule: DemoSchedule, progress, seconds: float) -> dict:
    from pipeline.demo.report import ap_chart, loss_chart, pr_chart

    models, arms, presets = runs["models"], runs["arms"], runs["presets"]
    drawn = arms["student"].get("samples_by_source", {})
    recipe = schedule.recipe
    weights = {"coco": 1.0, "grounding": 1.0, **({"pseudo": recipe.pseudo_weight} if runs["pseudo_sources"] else {})}
    per_step = recipe.pseudo_per_step if runs["pseudo_sources"] else 0
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
            "gold_per_step": schedule.batch_size,  # per worker
            "pseudo_per_step": per_step,  # per worker, on top of the gold (0: mixed in by weight)
            "samples_drawn_worker0": drawn,
            "pseudo_fraction": round(drawn.get("pseudo", 0) / max(sum(drawn.values()), 1), 4),
        },
        "pseudo_labels": presets,
        "pseudo_label_names": runs["label_names"],
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
    report["charts"] = {
        "ap": ap_chart(models), "pr": pr_chart(runs["curves"], presets, runs["calibration"]),
        "loss": loss_chart({name: str(Path(arm["checkpoint"]).parent) for name, arm in arms.items()}),
    }
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
    preset: Optional[str] = typer.Option(None, "--preset", help="Filter preset of the student's pseudo-labels (glip, grit, owlst), or calibrated: the policy calibrate picks on 10% of the web gold (default: calibrated; glip at --size small)."),
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
    pseudo_prompt: Optional[str] = typer.Option(None, "--pseudo-prompt", help="The student's prompt of a pseudo sample: caption or names."),
    pseudo_known_weight: Optional[float] = typer.Option(
        None, "--pseudo-known-weight", help="Weight of pseudo boxes whose name the gold already teaches (0: ignored)."
    ),
    pseudo_per_step: Optional[int] = typer.Option(
        None, "--pseudo-per-step", min=0,
        help="Pseudo images added to each step's gold batch (0: mixed into it by --pseudo-weight).",
    ),
    rounds: int = typer.Option(1, "--rounds", min=1, help="Rounds of the loop: round k's teacher is round k-1's student."),
    resume: bool = typer.Option(False, "--resume", help="Go on with the interrupted (or finished) demo in --out: skip its finished rounds and stages."),
    verbose: bool = typer.Option(False, "--verbose", help="Show Ray's own log lines here too (default: OUT/demo.log; also GLIP_VERBOSE=1)."),
) -> None:
    """Run the whole self-training loop on an embedded world: teacher, student and gold-only control.

    The student recipe defaults to the size's schedule; each option overrides one ingredient
    (the README's ablation table is made of such runs), e.g.

        pipeline demo --out runs/weak --augment weak

    Two rounds (round 2's teacher is round 1's student), and going on after an interruption:

        pipeline demo --out runs/r2 --rounds 2

        pipeline demo --out runs/r2 --rounds 2 --resume
    """
    if verbose:
        run_log.set_verbose()
    if preset is not None and preset not in (*PRESET_NAMES, CALIBRATED):
        raise fail(f"--preset {preset}: not one of {', '.join((*PRESET_NAMES, CALIBRATED))}")
    if resume and overwrite:
        raise fail("--resume and --overwrite exclude each other")
    from pipeline.train.data.specs import PseudoWeighting

    try:  # the pseudo-sample options are checked before any stage runs
        PseudoWeighting(prompt=pseudo_prompt or "caption", known_weight=1.0 if pseudo_known_weight is None else pseudo_known_weight)
    except ValueError as error:
        raise fail(str(error)) from None
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
        "assign": assign, "pseudo_prompt": pseudo_prompt, "known_weight": pseudo_known_weight,
        "pseudo_per_step": pseudo_per_step,
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
              f"({'inside' if calibration['inside_interval'] else 'outside'} the sample's interval)")
    for entry in report["rounds"][1:]:
        arms = ", ".join(f"{name} AP {100 * m['AP']:.1f}" for name, m in entry["models"].items())
        print(f"demo: round {entry['round']}: {arms}")
