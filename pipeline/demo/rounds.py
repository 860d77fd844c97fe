"""The demo's stages in order: the world, decontamination, the teacher, parse-captions, then
each round of the loop (pseudo-label, filter with every preset, calibrate, student, control,
eval); `pipeline.demo.run` runs them on one embedded Ray and reports."""

from __future__ import annotations

from pathlib import Path

from pipeline.demo.arms import DemoSchedule, evaluate_arm, train_arm
from pipeline.demo.world import WorldPaths, write_world

PRESET_NAMES = ("glip", "grit", "owlst")
# `--preset calibrated`: the student trains on the policy `pipeline calibrate` picked on 10% of
# the web split's hidden gold (the few hundred images a user would check by hand).
CALIBRATED = "calibrated"


# Stages before the rounds (world, decontaminate, teacher, parse-captions), then per round
# pseudo-label, filter, calibrate, student, [control], eval; then the report.
def stage_count(rounds: int, control: bool) -> int:
    return 4 + rounds * (5 + int(control)) + 1


def run_stages(
    out: Path, *, size: str, seed: int, preset: str, control: bool, schedule: DemoSchedule, progress, rounds: int = 1, state,
) -> dict:
    """Every stage of the loop, in order; returns what the report is made of: round 1's
    results at the top (the report's main tables) and every round's under "rounds"."""
    from pipeline.demo.decontamination import decontaminate_web
    from pipeline.demo.world import world_paths
    from pipeline.stages.inspect_labels import write_gallery
    from pipeline.stages.parse_captions import ParseCaptionsConfig, run_parse_captions

    state.run("world", progress, lambda: str(write_world(out / "world", size=size, seed=seed).root))
    paths = world_paths(out / "world")
    # The test split's copies leave the web split before anything reads it; every later stage
    # reads the cleaned shards.
    decontamination = state.run(
        "decontaminate the web shards against the test images", progress, lambda: decontaminate_web(paths, out / "web_clean")
    )
    shards = str(out / "web_clean")
    gold = gold_sources(paths)
    teacher = state.run("train teacher on gold", progress, lambda: train_arm(out / "teacher", gold, schedule, schedule.teacher_steps, seed))
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
        filtered={name: str(folder / "filtered" / name) for name in PRESET_NAMES}, seed=seed, assign=recipe.assign,
    ))
    student_sources = list(gold)
    labels = student_labels(folder, preset, presets, calibration)
    label_names = _label_names(paths, labels)
    if labels is not None:
        student_sources.append(SourceSpec(kind="pseudo", paths=(labels,), weight=recipe.pseudo_weight))
    else:  # a teacher whose scores all stay under the preset's threshold (e.g. --size small)
        print(f"demo: the {preset} preset kept no pseudo-label (every teacher score is under its threshold); "
              "the student trains on gold only", flush=True)
    arms = {"teacher": teacher}
    arms["student"] = state.run(stage(f"train student on gold + pseudo ({preset})"), progress, lambda: train_arm(
        folder / "student", student_sources, schedule, schedule.student_steps, seed + number, init=teacher["checkpoint"], recipe=recipe
    ))
    if control:
        arms["control"] = state.run(
            stage("train control: teacher + the same steps, augmentation and gold, no pseudo-labels"), progress,
            lambda: train_arm(folder / "control", gold, schedule, schedule.student_steps, seed + number, init=teacher["checkpoint"], recipe=recipe),
        )

    def evaluate_arms() -> dict:
        return {
            name: teacher_metrics if name == "teacher" and teacher_metrics is not None else evaluate_arm(run["checkpoint"], paths, schedule)
            for name, run in arms.items()
        }

    models = state.run(stage("eval on the test split"), progress, evaluate_arms)
    return {
        "round": number, "folder": str(folder.relative_to(out)), "models": models, "arms": arms, "presets": presets,
        "curves": curves, "calibration": calibration, "label_stats": label_stats, "pseudo_sources": len(student_sources) > len(gold),
        "label_names": label_names,
    }


def _label_names(paths: WorldPaths, labels: str | None) -> dict:
    """Per kind, whether the student's pseudo-labels name it right (against the web split's
    hidden gold): what the student can learn each word from. Empty without labels."""
    from pipeline.evaluation.evaluate import load_gold
    from pipeline.evaluation.label_names import names_by_category

    return names_by_category(load_gold(paths.web_gold), [labels]) if labels else {}


def gold_sources(paths: WorldPaths) -> list:
    """The gold split as every arm reads it: COCO detection + grounding JSON of the same images."""
    from pipeline.train.data import SourceSpec

    return [
        SourceSpec(kind="coco", paths=(str(paths.gold_coco),), images=str(paths.gold_images)),
        SourceSpec(kind="grounding", paths=(str(paths.gold_grounding),), images=str(paths.gold_images)),
    ]


def student_labels(folder: Path, preset: str, presets: dict, calibration: dict) -> str | None:
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
