"""One GPU check of the whole engine: forward speed and parity, the pseudo-label stage against a
bare loop, and a train-student step; prints one table.

Needs only the checkout: weights are the reference runs' deterministic fill
(`bench/reference_weights.py`, shared/reference/glip/README.md), images are the real COCO
images of ../shared/data/coco_mini (or `$GLIP_SHARED_DIR/data`). Rows:

* forward, GLIP-T(C) and GLIP-L on real images resized to 800x1333 (HxW): images/s and peak
  memory for the official recipe (prompt padded to 256 tokens, batch 1, fp32), dynamic text
  padding at batch 1/4/8 in fp32 and in bf16 autocast, each as a ratio to the official recipe
  (goal >= 2x; GLIP-T >= 20 img/s on an H100-class GPU). fp32 means true fp32 (TF32 off).
* parity: `GLIPPredictor` detections of the GPU in fp32 and bf16 against the same model in fp32
  on the CPU: the fraction of CPU detections matched by one of the same phrase with IoU >= 0.9
  and a score within 0.02.
* pseudo-label: `pipeline pseudo-label` on one GPU actor (GLIP-T teacher, bf16) against a bare
  `predict` loop of the same model on the same decoded images (goal >= 0.9), and the GPU's busy
  fraction during the stage (nvidia-smi samples every 0.2 s).
* train-student: one optimizer step (forward, losses, backward, AdamW) of GLIP-T and GLIP-L
  with gradient checkpointing at batch 2 on real COCO batches (short side 800): samples/s and
  peak memory.

* teacher (only with `--hf-teacher hf:DIR`, repeatable): a saved Grounding DINO or OWLv2
  folder's `predict` images/s at batch 4 in fp32 and bf16, and its detections against the same
  folder on the CPU (as the parity rows). No such weights ship with the checkout.

`--smoke` runs the same code on the CPU with the `tiny` variant at a small size (what the test
runs); `bench/gpu_check.sh` is the entry point.

    bash bench/gpu_check.sh [--smoke] [--json FILE] [--hf-teacher hf:DIR ...]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import pseudo_label as pseudo_bench  # noqa: E402
from bench.model_forward import CAPTION, measure  # noqa: E402
from bench.train_student import train_step  # noqa: E402

SHARED = pseudo_bench.SHARED


@dataclass(frozen=True, kw_only=True)
class CheckPlan:
    """What one run measures: the GPU plan, or the CPU smoke plan of the same steps."""

    device: str
    variants: tuple[str, ...]
    height: int
    width: int
    batches: tuple[int, ...]
    repeats: int
    parity_images: int
    teacher: str  # variant of the pseudo-label teacher
    pseudo_images: int
    pseudo_shards: int
    train_steps: int
    train_min_size: int
    train_max_size: int


GPU_PLAN = CheckPlan(
    device="cuda", variants=("glip-t", "glip-l"), height=800, width=1333, batches=(1, 4, 8), repeats=3,
    parity_images=2, teacher="glip-t", pseudo_images=80, pseudo_shards=4, train_steps=3, train_min_size=800, train_max_size=1333,
)
SMOKE_PLAN = CheckPlan(
    device="cpu", variants=("tiny",), height=160, width=256, batches=(1, 2), repeats=1,
    parity_images=1, teacher="tiny", pseudo_images=4, pseudo_shards=2, train_steps=1, train_min_size=160, train_max_size=256,
)


@dataclass(frozen=True, kw_only=True)
class Row:
    check: str
    variant: str
    setting: str
    value: str
    peak: str = "-"
    ratio: str = "-"


def filled_model(variant: str) -> torch.nn.Module:
    """GLIP of `variant` with the reference runs' deterministic weights, on the CPU, in eval mode."""
    from model.config import get_config
    from model.network.glip import GLIP
    from bench.reference_weights import fill_reference_weights

    model = GLIP(get_config(variant))
    fill_reference_weights(model)
    return model.eval()


def coco_images(count: int) -> list[Image.Image]:
    folder = SHARED / "coco_mini" / "train2017"
    files = sorted(folder.glob("*.jpg"))[:count]
    if len(files) < count:
        raise FileNotFoundError(f"{folder}: expected {count} COCO images, found {len(files)} (set GLIP_SHARED_DIR)")
    return [Image.open(path).convert("RGB") for path in files]


def phrase_spans(caption: str) -> list[tuple[int, int]]:
    """One span per ". "-separated phrase of a detection prompt."""
    spans, start = [], 0
    for phrase in caption.rstrip(".").split(". "):
        spans.append((start, start + len(phrase)))
        start += len(phrase) + 2
    return spans


def peak_gib(device: torch.device) -> str:
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}" if device.type == "cuda" else "-"


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def forward_rows(model, variant: str, plan: CheckPlan, device: torch.device) -> list[Row]:
    """Images/s of the official recipe, then dynamic padding at each batch in fp32 and bf16."""
    from model.inputs.preprocess import batch_images, image_to_tensor
    from model.inputs.text import load_tokenizer, tokenize

    tokenizer = load_tokenizer()
    images = [image.resize((plan.width, plan.height)) for image in coco_images(max(plan.batches))]
    tensors = [image_to_tensor(image, min_size=None, max_size=None) for image in images]
    settings = [(1, True, False)] + [(b, False, bf16) for bf16 in (False, True) for b in plan.batches]
    rows, official = [], None
    for batch, pad_to_max, bf16 in settings:
        name = "pad-256 b1 fp32 (official)" if pad_to_max else f"dynamic b{batch} {'bf16' if bf16 else 'fp32'}"
        if bf16 and device.type != "cuda":  # torchvision's deform_conv2d has no CPU bf16 kernel
            rows.append(Row(check="forward img/s", variant=variant, setting=name, value="n/a (bf16 on CUDA only)"))
            continue
        pixels, _ = batch_images(tensors[:batch], size_divisibility=32)
        text = tokenize(tokenizer, [CAPTION] * batch, max_length=256, pad_to_max=pad_to_max)
        text = {key: value.to(device) for key, value in text.items()}
        reset_peak(device)
        rate = batch / measure(model, pixels.to(device), text, repeats=plan.repeats, bf16=bf16)
        official = official or rate
        rows.append(Row(check="forward img/s", variant=variant, setting=name, value=f"{rate:.2f}",
                        peak=peak_gib(device), ratio=f"{rate / official:.2f}x"))
    return rows


def matched_fraction(reference, other, *, iou: float = 0.9, score_tolerance: float = 0.02) -> float:
    """Share of `reference` detections with an `other` detection of the same phrase, IoU >= `iou`
    and a score within `score_tolerance` (1.0 when the reference has none)."""
    from torchvision.ops import box_iou

    if len(reference) == 0:
        return 1.0 if len(other) == 0 else 0.0
    if len(other) == 0:
        return 0.0
    overlaps = box_iou(reference.boxes, other.boxes)
    same_phrase = reference.phrase_ids[:, None] == other.phrase_ids[None, :]
    close_score = (reference.scores[:, None] - other.scores[None, :]).abs() <= score_tolerance
    return float(((overlaps >= iou) & same_phrase & close_score).any(dim=1).float().mean())


def parity_rows(cpu_model, device_model, variant: str, plan: CheckPlan, device: torch.device) -> list[Row]:
    """Detections of the device model (fp32, bf16) against the CPU fp32 model on the same images."""
    from model.inference.predict import GLIPPredictor

    images = [image.resize((plan.width, plan.height)) for image in coco_images(plan.parity_images)]
    captions = [CAPTION] * len(images)
    spans = [phrase_spans(CAPTION)] * len(images)
    size = dict(min_size=plan.height, max_size=plan.width)
    reference = GLIPPredictor(cpu_model, **size).predict(images, captions, spans)
    rows = []
    for bf16 in (False, True):
        name = f"{device.type} {'bf16' if bf16 else 'fp32'} vs cpu fp32"
        if bf16 and device.type != "cuda":
            rows.append(Row(check="parity matched", variant=variant, setting=name, value="n/a (bf16 on CUDA only)"))
            continue
        found = GLIPPredictor(device_model, bf16=bf16, **size).predict(images, captions, spans)
        fractions = [matched_fraction(ref, got) for ref, got in zip(reference, found)]
        count = sum(len(ref) for ref in reference)
        value = f"{sum(fractions) / len(fractions):.3f} of {count} dets"
        rows.append(Row(check="parity matched", variant=variant, setting=name, value=value))
    return rows


def hf_teacher_rows(teacher: str, plan: CheckPlan, device: torch.device) -> list[Row]:
    """A transformers teacher (`--hf-teacher hf:DIR`): `predict` images/s at batch 4 in fp32 and
    bf16 on the device, and its detections (fp32, bf16) against the same folder on the CPU."""
    from pipeline.stages.teachers import inspect_teacher, load_teacher

    source = inspect_teacher(teacher)
    variant = f"{source.kind} {source.identity.name}"
    images = coco_images(4)
    captions, spans = [CAPTION] * 4, [phrase_spans(CAPTION)] * 4
    reference = load_teacher(source).predict(images[: plan.parity_images], captions[: plan.parity_images], spans[: plan.parity_images])
    rows = []
    for bf16 in (False, True):
        precision = "bf16" if bf16 else "fp32"
        if bf16 and device.type != "cuda":
            rows.append(Row(check="teacher img/s", variant=variant, setting=f"b4 {precision}", value="n/a (bf16 on CUDA only)"))
            continue
        model = load_teacher(source, device=str(device), bf16=bf16)
        model.predict(images[:1], captions[:1], spans[:1])  # warm-up
        reset_peak(device)
        times = []
        for _ in range(plan.repeats):
            _sync(device)
            start = time.perf_counter()
            found = model.predict(images, captions, spans)
            _sync(device)
            times.append(time.perf_counter() - start)
        rows.append(Row(check="teacher img/s", variant=variant, setting=f"b4 {precision}", value=f"{4 / min(times):.2f}", peak=peak_gib(device)))
        fractions = [matched_fraction(ref, got) for ref, got in zip(reference, found)]
        value = f"{sum(fractions) / len(fractions):.3f} of {sum(len(r) for r in reference)} dets"
        rows.append(Row(check="parity matched", variant=variant, setting=f"{device.type} {precision} vs cpu fp32", value=value))
        del model
    return rows


class BusySampler:
    """The GPU's utilisation (nvidia-smi, every 0.2 s) while the `with` block runs; None without one."""

    def __init__(self, device: torch.device) -> None:
        self.on_gpu = device.type == "cuda"
        self.enabled = self.on_gpu and shutil.which("nvidia-smi") is not None
        self.index = device.index or 0
        self.samples: list[float] = []

    def __enter__(self) -> BusySampler:
        if self.enabled:
            command = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", str(self.index), "-lms", "200"]
            self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
            self.reader = threading.Thread(target=self._read, daemon=True)
            self.reader.start()
        return self

    def _read(self) -> None:
        for line in self.process.stdout:  # type: ignore[union-attr]
            if line.strip().isdigit():
                self.samples.append(float(line))

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.process.terminate()
            self.process.wait()

    def busy_fraction(self) -> str:
        if not self.samples:
            return "n/a (CPU)" if not self.on_gpu else "n/a (no nvidia-smi samples)"
        return f"{sum(self.samples) / len(self.samples) / 100:.2f}"


def pseudo_label_rows(teacher_model, plan: CheckPlan, device: torch.device, work: Path) -> list[Row]:
    """The stage on one actor against a bare loop of the same teacher on the same images."""
    from model.weights.checkpoint import save_glip
    from model.inference.predict import GLIPPredictor

    samples = pseudo_bench.prepare_world(work, images=plan.pseudo_images, shards=plan.pseudo_shards)
    teacher = Path(save_glip(teacher_model, work / "teacher.pth", provenance={"note": "reference-fill weights"}))
    on_gpu = device.type == "cuda"
    threads = 4 if on_gpu else 1
    size = dict(min_size=plan.train_min_size, max_size=plan.train_max_size)
    predictor = GLIPPredictor.from_checkpoint(str(teacher), device=device, bf16=on_gpu, **size)
    bare = pseudo_bench.bare_loop_rate(predictor, work, samples, batch_size=4)
    del predictor
    reset_peak(device)
    with BusySampler(device) as busy:
        stats = pseudo_bench.run_stage(work, teacher, batch_size=4, threads=threads, num_gpus=1.0 if on_gpu else 0.0,
                                       bf16=on_gpu, **size)
    steady = stats["throughput"]["steady_samples_per_s"]
    precision = "bf16" if on_gpu else "fp32"
    return [
        Row(check="pseudo-label img/s", variant=plan.teacher, setting=f"bare predict loop b4 {precision}", value=f"{bare:.2f}"),
        Row(check="pseudo-label img/s", variant=plan.teacher, setting="stage, 1 actor (steady)", value=f"{steady:.2f}",
            ratio=f"{steady / bare:.2f} of bare"),
        Row(check="pseudo-label", variant=plan.teacher, setting="GPU busy fraction in stage", value=busy.busy_fraction()),
    ]


def train_rows(variant: str, plan: CheckPlan, device: torch.device) -> list[Row]:
    """Samples/s and peak memory of train-student steps with gradient checkpointing at batch 2."""
    from model.training.loss import GLIPLoss
    from model.inputs.text import load_tokenizer
    from pipeline.train.config import OptimizerConfig, StudentModel
    from pipeline.train.data import AugmentSettings, SourceSpec
    from pipeline.train.data.loader import TrainLoader
    from pipeline.train.data.mixing import MixedSampleStream
    from pipeline.train.loop import build_student, make_optimizer, make_scheduler

    coco = SHARED / "coco_mini"
    spec = SourceSpec(kind="coco", paths=(str(coco / "annotations/instances_train2017_subset.json"),), images=str(coco / "train2017"))
    tokenizer = load_tokenizer()
    settings = AugmentSettings(min_sizes=(plan.train_min_size,), max_size=plan.train_max_size)
    loader = TrainLoader(stream=MixedSampleStream(specs=[spec], tokenizer=tokenizer, seed=0), batch_size=2, settings=settings)
    batches = [loaded.batch for loaded in itertools.islice(iter(loader), plan.train_steps + 1)]
    model = build_student(StudentModel(variant=variant, grad_checkpointing=True), seed=0).to(device)
    optimizer = make_optimizer(model, OptimizerConfig())
    scheduler = make_scheduler(optimizer, OptimizerConfig(), steps=1000)
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    loss_fn = GLIPLoss()
    on_device = [_batch_to(batch, device) for batch in batches]
    reset_peak(device)
    train_step(model, optimizer, scheduler, loss_fn, on_device[0], autocast=autocast)  # warm-up
    _sync(device)
    started = time.perf_counter()
    for batch in on_device[1:]:
        train_step(model, optimizer, scheduler, loss_fn, batch, autocast=autocast)
    _sync(device)
    rate = 2 * plan.train_steps / (time.perf_counter() - started)
    precision = "bf16" if autocast else "fp32"
    setting = f"1 step b2 grad-ckpt {precision} short {plan.train_min_size}"
    return [Row(check="train-student samples/s", variant=variant, setting=setting, value=f"{rate:.2f}", peak=peak_gib(device))]


def _batch_to(batch, device: torch.device):
    import dataclasses

    targets = [{key: value.to(device) for key, value in target.items()} for target in batch.targets]
    return dataclasses.replace(
        batch, images=batch.images.to(device), input_ids=batch.input_ids.to(device),
        attention_mask=batch.attention_mask.to(device), targets=targets,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def format_table(rows: list[Row], title: str) -> str:
    header = Row(check="check", variant="variant", setting="setting", value="value", peak="peak GiB", ratio="ratio")
    table = [header, *rows]
    fields = ("check", "variant", "setting", "value", "peak", "ratio")
    widths = {name: max(len(getattr(row, name)) for row in table) for name in fields}
    lines = [title, "| " + " | ".join(getattr(header, n).ljust(widths[n]) for n in fields) + " |"]
    lines.append("|" + "|".join("-" * (widths[n] + 2) for n in fields) + "|")
    lines += ["| " + " | ".join(getattr(row, n).ljust(widths[n]) for n in fields) + " |" for row in rows]
    return "\n".join(lines)


def run_checks(plan: CheckPlan, work: Path, hf_teachers: tuple[str, ...] = ()) -> list[Row]:
    from pipeline.cluster import init_ray, shutdown_ray

    device = torch.device(plan.device)
    # fp32 rows are true fp32 (the CPU reference is); bf16 rows use autocast.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows: list[Row] = []
    teacher_model = None
    for variant in plan.variants:
        cpu_model = filled_model(variant)
        device_model = copy.deepcopy(cpu_model).to(device) if device.type == "cuda" else cpu_model
        rows += forward_rows(device_model, variant, plan, device)
        rows += parity_rows(cpu_model, device_model, variant, plan, device)
        if variant == plan.teacher:
            teacher_model = cpu_model
        del device_model
        reset_peak(device)
    started = init_ray(None, num_cpus=os.cpu_count() or 1, num_gpus=1 if device.type == "cuda" else 0)
    try:
        rows += pseudo_label_rows(teacher_model or filled_model(plan.teacher), plan, device, work)
    finally:
        shutdown_ray(started)
    for variant in plan.variants:
        rows += train_rows(variant, plan, device)
    for teacher in hf_teachers:
        rows += hf_teacher_rows(teacher, plan, device)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny variant, small sizes: the same steps in about a minute.")
    parser.add_argument("--json", type=Path, help="Also write the rows as JSON here.")
    parser.add_argument("--hf-teacher", action="append", default=[], metavar="hf:DIR",
                        help="Also time a saved Grounding DINO / OWLv2 teacher folder (repeatable).")
    args = parser.parse_args()
    plan = SMOKE_PLAN if args.smoke else GPU_PLAN
    if plan.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device visible to torch (run with --smoke on a CPU machine)", file=sys.stderr)
        raise SystemExit(2)
    name = torch.cuda.get_device_name(0) if plan.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        rows = run_checks(plan, Path(work), tuple(args.hf_teacher))
    title = (f"gpu_check {'--smoke ' if args.smoke else ''}on {name}, torch {torch.__version__}, "
             f"{time.strftime('%Y-%m-%d')}, {time.perf_counter() - started:.0f} s")
    print(format_table(rows, title))
    if args.json:
        args.json.write_text(json.dumps({"title": title, "rows": [row.__dict__ for row in rows]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
