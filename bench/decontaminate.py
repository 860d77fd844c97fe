"""Benchmark: perceptual hashing of web images vs decoding the same JPEGs, on one core.

The 80 real COCO images of ../shared/data/coco_mini (JPEG, about 640x480), each read from
memory `--repeat` times, on one core (`os.sched_setaffinity`), best of `--rounds`:
* decode: `images.decode_rgb` (full-size RGB, EXIF applied: what the teacher stage decodes);
* hash: what `pipeline decontaminate` does per web image: `images.decode_gray_small` (libjpeg
  DCT scaling to >= 64 px) + pHash + dHash (`near_duplicates.image_hashes`, imagehash);
* hash (full decode): the same hashes from a full-size decode, to show what DCT scaling buys;
* match: one image's two hashes against the variants of 5,000 evaluation images (100,000
  hash pairs, COCO val2017's size), the other per-image cost of the stage.
It prints images/s of each and the ratio hash / decode (target >= 0.5).

Run: `.venv/bin/python bench/decontaminate.py` (about 20 seconds).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.io.images import decode_gray_small, decode_rgb  # noqa: E402
from pipeline.stages.near_duplicates import DECODE_SIDE, EvalHashes, image_hashes, nearest_match  # noqa: E402


def rate(work, images: list[bytes], *, repeat: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(repeat):
            for data in images:
                work(data)
        best = min(best, time.perf_counter() - started)
    return repeat * len(images) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    images = [path.read_bytes() for path in sorted((args.data / "coco_mini" / "train2017").glob("*.jpg"))]
    print(f"{len(images)} COCO JPEGs x {args.repeat}, one core, best of {args.rounds}")
    decode = rate(lambda data: decode_rgb(data), images, repeat=args.repeat, rounds=args.rounds)
    hashed = rate(lambda data: image_hashes(decode_gray_small(data, side=DECODE_SIDE)), images, repeat=args.repeat, rounds=args.rounds)
    full = rate(lambda data: image_hashes(decode_rgb(data).image.convert("L")), images, repeat=args.repeat, rounds=args.rounds)
    rng = np.random.default_rng(0)
    index = EvalHashes(names=["eval"], image=np.zeros(100_000, dtype=np.int32), variant=["full"] * 100_000,
                       hashes=rng.integers(0, 2**63, size=(100_000, 2), dtype=np.uint64))
    hashes = [image_hashes(decode_gray_small(data, side=DECODE_SIDE)) for data in images]
    started = time.perf_counter()
    for value in hashes * args.repeat:
        nearest_match(value, index, max_distance=14)
    match = len(hashes) * args.repeat / (time.perf_counter() - started)
    print(f"decode (full RGB)            {decode:8.1f} images/s")
    print(f"hash (pHash + dHash)         {hashed:8.1f} images/s   ratio hash / decode {hashed / decode:.2f} (target >= 0.5)")
    print(f"hash from a full decode      {full:8.1f} images/s   ratio {full / decode:.2f}")
    print(f"match vs 5,000 eval images   {match:8.1f} images/s   (100,000 variant hash pairs)")
    both = 1.0 / (1.0 / hashed + 1.0 / match)
    print(f"hash + match                 {both:8.1f} images/s   ratio {both / decode:.2f}")


if __name__ == "__main__":
    main()
