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

from tests.pseudo_fixtures import coco_samples, tiny_teacher, write_shard  # noqa: E402


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

    from model.predict import GLIPPredictor
    from nlp.phrases import ExtractorSettings
    from pipeline.filtering import get_preset
    from pipeline.parse_captions import ParseCaptionsConfig, run_parse_captions
    from pipeline.pseudo_label import PseudoLabelConfig, run_pseudo_label

    work = Path(tempfile.mkdtemp(prefix="bench-pseudo-"))
    samples = coco_samples(SHARED, args.images)
    per_shard = -(-len(samples) // args.shards)
    (work / "shards").mkdir()
    for shard in range(args.shards):
        chunk = samples[shard * per_shard : (shard + 1) * per_shard]
        write_shard(work / "shards" / f"{shard:05d}.tar", [(k, "jpg", d, c) for k, d, c in chunk])
    teacher = tiny_teacher(work / "teacher.pth")
    run_parse_captions(ParseCaptionsConfig(inputs=(str(work / "shards"),), out=str(work / "phrases"), settings=ExtractorSettings(), workers=1))

    # 1. bare loop on the same decoded images and the same phrases
    import pyarrow.parquet as pq

    phrases = {}
    for file in sorted((work / "phrases").glob("*.parquet")):
        for row in pq.read_table(file).to_pylist():
            phrases[row["key"]] = row
    torch.set_num_threads(args.threads)
    predictor = GLIPPredictor.from_checkpoint(str(teacher), min_size=args.min_size, max_size=args.max_size)
    items = [
        (Image.open(io.BytesIO(data)).convert("RGB"), phrases[key]["caption"], [(p["start"], p["end"]) for p in phrases[key]["phrases"]])
        for key, data, _ in samples
        if phrases[key]["phrases"]
    ]
    predictor.predict([items[0][0]], [items[0][1]], [items[0][2]])  # warm-up
    started = time.perf_counter()
    for start in range(0, len(items), args.batch_size):
        chunk = items[start : start + args.batch_size]
        predictor.predict([i[0] for i in chunk], [i[1] for i in chunk], [i[2] for i in chunk])
    bare = len(items) / (time.perf_counter() - started)

    # 2. the stage
    stats = run_pseudo_label(
        PseudoLabelConfig(
            inputs=(str(work / "shards"),), phrases=str(work / "phrases"), teacher=str(teacher), out=str(work / "out"),
            policy=get_preset("glip"), min_size=args.min_size, max_size=args.max_size, batch_size=args.batch_size,
            workers=1, cpus_per_worker=args.threads,
        )
    )
    throughput = stats["throughput"]
    steady = throughput["steady_samples_per_s"]
    print(f"tiny GLIP, CPU, {args.threads} threads, short side {args.min_size}, max {args.max_size}, batch {args.batch_size}, {len(items)} images")
    print(f"bare predict loop:           {bare:7.2f} images/s")
    print(f"pseudo-label stage (steady): {steady:7.2f} images/s  (wall incl. actor start-up {throughput['samples_per_s']:.2f}, start-up {throughput['startup_seconds']:.1f} s)")
    print(f"ratio stage / bare loop:     {steady / bare:7.2f}")


if __name__ == "__main__":
    main()
