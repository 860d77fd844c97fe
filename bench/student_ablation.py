"""One ablation row in two minutes: re-train the student of a finished `pipeline demo` run with
other pseudo-label options, on the same teacher, pseudo-labels, gold, seed and steps, and
evaluate it on the same test split.

    python bench/student_ablation.py runs/demo --out runs/ablation/caption \
        --pseudo-prompt caption --pseudo-weight 1 --pseudo-score-weight --pseudo-background-weight 0.5

It calls what the demo calls (`pipeline.demo.arms.train_arm` and `evaluate_arm`) with the run's
schedule and its recipe, the given options replacing the recipe's. Only options that touch pseudo
samples can be changed: the control never sees a pseudo sample, so the run's own control is this
student's control too (same initialisation, steps, seed, augmentation and gold). Prints the new
student's AP (base / tail) beside the run's teacher, student and control, and its gap to the
control; writes `OUT/ablation.json`.

`--gold-only --batch-size N` trains another control instead: gold alone, from the same teacher
with the same steps, seed and augmentation, N gold images per worker per step. With N = 4 it
sees as many images as a student of `--pseudo-per-step 2` (2 gold + 2 pseudo a step), so the
run's student beats it only by what its pseudo-labels teach, not by the images it sees more:

    python bench/student_ablation.py runs/demo --out runs/ablation/control4 --gold-only --batch-size 4
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished `pipeline demo` folder (its report.json)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the new student")
    parser.add_argument("--pseudo-prompt", choices=("caption", "names"))
    parser.add_argument("--pseudo-weight", type=float)
    parser.add_argument("--pseudo-score-weight", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--pseudo-background-weight", type=float)
    parser.add_argument("--pseudo-ignore-below", type=float)
    parser.add_argument("--pseudo-known-weight", type=float)
    parser.add_argument("--pseudo-per-step", type=int)
    parser.add_argument("--gold-only", action="store_true", help="train a control (no pseudo source) instead of a student")
    parser.add_argument("--batch-size", type=int, help="gold images per worker per step (default: the run's)")
    args = parser.parse_args()

    from pipeline.cluster import init_ray, shutdown_ray
    from pipeline.demo.arms import DemoSchedule, StudentRecipe, evaluate_arm, train_arm
    from pipeline.demo.rounds import gold_sources, student_labels
    from pipeline.demo.world import world_paths
    from pipeline.train.data import SourceSpec
    from pipeline.train.data.specs import PseudoWeighting

    report = json.loads((args.run / "report.json").read_text())
    schedule_dict = dict(report["schedule"])
    recipe = StudentRecipe(**report["student_recipe"])
    overrides = {
        "pseudo_prompt": args.pseudo_prompt, "pseudo_weight": args.pseudo_weight, "score_weight": args.pseudo_score_weight,
        "background_weight": args.pseudo_background_weight, "ignore_below": args.pseudo_ignore_below,
        "known_weight": args.pseudo_known_weight, "pseudo_per_step": args.pseudo_per_step,
    }
    recipe = replace(recipe, **{k: v for k, v in overrides.items() if v is not None})
    PseudoWeighting(score_weight=recipe.score_weight, ignore_below=recipe.ignore_below,  # refuse bad values early
                    background_weight=recipe.background_weight, prompt=recipe.pseudo_prompt, known_weight=recipe.known_weight)
    schedule_dict["recipe"] = recipe
    schedule_dict["min_sizes"] = tuple(schedule_dict["min_sizes"])
    if args.batch_size is not None:
        schedule_dict["batch_size"] = args.batch_size
    schedule = DemoSchedule(**schedule_dict)

    paths = world_paths(args.run / "world")
    sources = gold_sources(paths)
    if not args.gold_only:
        labels = student_labels(args.run, report["preset"], report["pseudo_labels"], report["calibration"])
        if labels is None:
            raise SystemExit(f"error: {args.run}: the run's student had no pseudo-labels to re-train on")
        sources.append(SourceSpec(kind="pseudo", paths=(labels,), weight=recipe.pseudo_weight))
    started_ray = init_ray(None)
    started = time.perf_counter()
    try:
        arm = train_arm(args.out, sources, schedule, schedule.student_steps, report["seed"] + 1,
                        init=report["training"]["teacher"]["checkpoint"], recipe=recipe)
        metrics = evaluate_arm(arm["checkpoint"], paths, schedule)
    finally:
        shutdown_ray(started_ray)
    models = report["models"]

    def line(name: str, m: dict) -> str:
        return f"{name:<10} AP {100 * m['AP']:5.1f}  base {100 * m['AP_base']:5.1f}  tail {100 * m['AP_tail']:5.1f}"

    for name in ("teacher", "student", "control"):
        if name in models:
            print(line(f"run {name}", models[name]))
    if args.gold_only:
        print(line("ablation", metrics) + f"   (gold only, {schedule.batch_size} images per worker per step)")
        print(f"run student - ablation {100 * (models['student']['AP'] - metrics['AP']):+.1f} AP "
              f"(tail {100 * (models['student']['AP_tail'] - metrics['AP_tail']):+.1f})")
    else:
        print(line("ablation", metrics) + f"   ({', '.join(f'{k} {v}' for k, v in asdict(recipe).items())})")
    if "control" in models:
        print(f"ablation - control {100 * (metrics['AP'] - models['control']['AP']):+.1f} AP "
              f"(tail {100 * (metrics['AP_tail'] - models['control']['AP_tail']):+.1f})")
    result = {"run": str(args.run), "recipe": asdict(recipe), "gold_only": args.gold_only, "batch_size": schedule.batch_size,
              "control" if args.gold_only else "student": metrics, "samples_by_source": arm["samples_by_source"],
              "seconds": round(time.perf_counter() - started, 1)}
    (args.out / "ablation.json").write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
