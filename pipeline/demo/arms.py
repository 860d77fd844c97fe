"""The demo's arms: the schedules and the student recipe, and training or evaluating one arm
(teacher, student or control) with the same verbs a cluster run uses."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.demo.world import BASE_KINDS, TAIL_KINDS, WorldPaths


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
    pseudo_prompt: str = "caption"  # --pseudo-prompt: pseudo samples prompted by their caption or by class names
    known_weight: float = 1.0  # --pseudo-known-weight: pseudo boxes of names the gold already teaches
    # --pseudo-per-step: pseudo samples added to each step's gold batch (per worker); the control's
    # steps are the same gold batches without them. 0: the student mixes pseudo samples into the
    # batch by `pseudo_weight` (fewer gold samples than the control)
    pseudo_per_step: int = 0


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
    # The tiny GLIP-T(A) (no deep fusion) with plain convs in DyHead on an ImageNet-pretrained
    # MobileNetV2 (the only pretrained visual weights available offline), kept frozen; its text
    # encoder starts from all-MiniLM-L6-v2 and stays frozen too: the FPN, the DyHead and the
    # dot-product projection train (docs/results.md: "a teacher that names", for why).
    variant: str = "tiny-mnv2-a"
    init_backbone: str | None = "imagenet"
    freeze_backbone: bool = True
    recipe: StudentRecipe = StudentRecipe()
    preset: str = "glip"  # the student's pseudo-labels when --preset is not given (glip, grit, owlst, calibrated)


# The student recipe measured best on the default world (docs/results.md, the ablation on seed 0): each step is
# the control's gold batch plus as many pseudo-labelled images (`--pseudo-per-step 2`, the
# batches of Unbiased and Soft Teacher: the student loses no gold sample to the pseudo ones;
# `--pseudo-per-step 0` mixes them into the batch by `--pseudo-weight 2` against the two gold
# sources' 1 each instead), pseudo samples prompted by class names (`--pseudo-prompt names`: each
# box's phrase becomes its head noun, the way gold detection data and the class-name evaluation
# prompt the model), the background of pseudo images ignored (`--pseudo-background-weight 0`:
# the objects the teacher missed are not taught as background), and Noisy Student's strong
# augmentation (for the control too). The teacher's score does not tell a right name from a
# wrong one on the tail kinds, so it does not weight the loss.
RECIPE = StudentRecipe(pseudo_weight=2.0, background_weight=0.0, augment="strong", pseudo_prompt="names", pseudo_per_step=2)
# At default and large size the student learns from the calibrated policy's labels (calibrate on
# 10% of the web gold), matched to the caption's phrases jointly (`--assign caption`): a tail
# object, whose name the teacher never saw, takes the phrase the base objects leave. The small
# world's 4-step teacher cannot be calibrated, so its student keeps the `glip` preset.
CAPTION_RECIPE = replace(RECIPE, assign="caption")
SCHEDULES = {
    "small": DemoSchedule(teacher_steps=4, student_steps=4, min_sizes=(128,), gallery=8, recipe=RECIPE),
    "default": DemoSchedule(teacher_steps=1000, student_steps=720, recipe=CAPTION_RECIPE, preset="calibrated"),
    "large": DemoSchedule(teacher_steps=3000, student_steps=3000, recipe=CAPTION_RECIPE, preset="calibrated"),
}


def train_arm(
    out: Path, sources, schedule: DemoSchedule, steps: int, seed: int, *, init: str | None = None,
    recipe: StudentRecipe | None = None,
) -> dict:
    """Train one arm: the teacher (`recipe` None: the official weak augmentation) or, from
    `init`, the student or the control with `recipe`'s options."""
    from pipeline.train.config import CheckpointPolicy, DataConfig, OptimizerConfig, Resources, StudentModel, TrainConfig
    from pipeline.train.data.specs import AugmentSettings, PseudoWeighting
    from pipeline.train.driver import run_training
    from pipeline.train.student import augment_options

    augment, pseudo, per_step = {}, PseudoWeighting(), 0
    if recipe is not None:
        per_step = recipe.pseudo_per_step if any(s.kind == "pseudo" for s in sources) else 0
        augment = augment_options(recipe.augment)
        pseudo = PseudoWeighting(
            score_weight=recipe.score_weight, ignore_below=recipe.ignore_below, background_weight=recipe.background_weight,
            prompt=recipe.pseudo_prompt, known_weight=recipe.known_weight,
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
            freeze_backbone=schedule.freeze_backbone,
        ),
        data=DataConfig(
            sources=tuple(sources),
            batch_size=schedule.batch_size,
            pseudo_per_step=per_step,
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


def evaluate_arm(checkpoint: str, paths: WorldPaths, schedule: DemoSchedule) -> dict:
    from model.inference.predict import GLIPPredictor
    from pipeline.evaluation.evaluate import evaluate_model
    from pipeline.train.tracking import record_evaluation

    predictor = GLIPPredictor.from_checkpoint(checkpoint, min_size=schedule.test_min_size, max_size=schedule.max_size)
    started = time.perf_counter()
    result = evaluate_model(predictor, paths.test_coco, paths.test_images, batch_size=4)
    metrics = {
        **result.as_dict(),
        "AP_base": result.group_ap(BASE_KINDS),
        "AP_tail": result.group_ap(TAIL_KINDS),
        "images_per_s": round(result.num_images / (time.perf_counter() - started), 2),
    }
    # Into the arm's own TensorBoard run: `tensorboard --logdir runs/demo` compares the arms.
    record_evaluation(str(Path(checkpoint).parent), metrics)
    return metrics
