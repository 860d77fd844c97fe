"""Pseudo-label stage throughput against a bare loop of the same model on the same images.

Packs the 80 real COCO images of ../shared/data/coco_mini (with their first human caption)
into WebDataset shards, parses the captions, then measures on the CPU with the `tiny` variant
(random weights: the cost of a forward does not depend on them):
  1. bare loop: `GLIPPredictor.predict` over the decoded images in batches (decoding not timed);
  2. the stage: `pipeline pseudo-label` (Ray Data, 1 actor, decode thread, aspect-ratio
     batches, detections parquet + pseudo tar), its steady images/s (actor start-up excluded);
and prints the ratio stage / bare loop (target >= 0.9).

    .venv/bin/python bench/pseudo_label.py [--min-size 320] [--max-size 512] [--batch-size 4] [--device cpu]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("GLIP_SHARED_DIR", REPO.parent / "shared")) / "data"

from bench.sample_shards import coco_samples, tiny_teacher, write_shard  # noqa: E402


def prepare_world(work: Path, *, images: int, shards: int) -> list[tuple[str, bytes, str]]:
    """`images` COCO samples packed into `shards` WebDataset tars under `work/shards`, their
    captions parsed into `work/phrases`; returns the (key, jpeg bytes, caption) samples."""
    from nlp.phrases import ExtractorSettings
    from pipeline.stages.parse_captions import ParseCaptionsConfig, run_parse_captions

    samples = coco_samples(SHARED, images)
    per_shard = -(-len(samples) // shards)
    (work / "shards").mkdir(parents=True)
    for shard in range(shards):
        chunk = samples[shard * per_shard : (shard + 1) * per_shard]
        write_shard(work / "shards" / f"{shard:05d}.tar", [(k, "jpg", d, c) for k, d, c in chunk])
    config = ParseCaptionsConfig(inputs=(str(work / "shards"),), out=str(work / "phrases"), settings=ExtractorSettings(), workers=1)
    run_parse_captions(config)
    return samples


def bare_loop_rate(predictor, work: Path, samples, *, batch_size: int) -> float:
    """Images/s of `predictor.predict` over the decoded samples that have phrases (decoding not timed)."""
    import pyarrow.parquet as pq

    phrases = {}
    for file in sorted((work / "phrases").glob("*.parquet")):
        for row in pq.read_table(file).to_pylist():
            phrases[row["key"]] = row
    items = [
        (Image.open(io.BytesIO(data)).convert("RGB"), phrases[key]["caption"], [(p["start"], p["end"]) for p in phrases[key]["phrases"]])
        for key, data, _ in samples
        if phrases[key]["phrases"]
    ]
    predictor.predict([items[0][0]], [items[0][1]], [items[0][2]])  # warm-up
    if predictor.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        predictor.predict([i[0] for i in chunk], [i[1] for i in chunk], [i[2] for i in chunk])
    if predictor.device.type == "cuda":
        torch.cuda.synchronize()
    return len(items) / (time.perf_counter() - started)


def run_stage(work: Path, teacher: Path, *, min_size: int, max_size: int, batch_size: int, threads: int,
              num_gpus: float = 0.0, bf16: bool = False) -> dict:
    """`pipeline pseudo-label` on `work/shards` with one actor; returns its `_stats.json` dict."""
    from pipeline.stages.filtering import get_preset
    from pipeline.stages.pseudo_label import PseudoLabelConfig, run_pseudo_label

    return run_pseudo_label(
        PseudoLabelConfig(
            inputs=(str(work / "shards"),), phrases=str(work / "phrases"), teacher=str(teacher), out=str(work / "out"),
            policy=get_preset("glip"), min_size=min_size, max_size=max_size, batch_size=batch_size,
            workers=1, cpus_per_worker=threads, num_gpus=num_gpus, bf16=bf16,
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--min-size", type=int, default=320)
    parser.add_argument("--max-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--images", type=int, default=80)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (and CPUs of the stage's actor)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

    from model.inference.predict import GLIPPredictor

    work = Path(tempfile.mkdtemp(prefix="bench-pseudo-"))
    samples = prepare_world(work, images=args.images, shards=args.shards)
    teacher = tiny_teacher(work / "teacher.pth")
    torch.set_num_threads(args.threads)
    predictor = GLIPPredictor.from_checkpoint(str(teacher), min_size=args.min_size, max_size=args.max_size)
    bare = bare_loop_rate(predictor, work, samples, batch_size=args.batch_size)
    stats = run_stage(work, teacher, min_size=args.min_size, max_size=args.max_size, batch_size=args.batch_size, threads=args.threads)
    throughput = stats["throughput"]
    steady = throughput["steady_samples_per_s"]
    print(f"tiny GLIP, CPU, {args.threads} threads, short side {args.min_size}, max {args.max_size}, batch {args.batch_size}, {stats['images']} images")
    print(f"bare predict loop:           {bare:7.2f} images/s")
    print(f"pseudo-label stage (steady): {steady:7.2f} images/s  (wall incl. actor start-up {throughput['samples_per_s']:.2f}, start-up {throughput['startup_seconds']:.1f} s)")
    print(f"ratio stage / bare loop:     {steady / bare:7.2f}")


if __name__ == "__main__":
    main()
