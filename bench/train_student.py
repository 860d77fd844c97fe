"""Student training throughput on the CPU: the training step vs the data path alone.

Measures, for the `tiny` variant on real COCO images (../shared/data/coco_mini):
  1. data path alone: `TrainLoader` (plan, decode, random resize/flip, collate) in samples/s;
  2. training step alone: forward + losses + backward + AdamW on batches already in memory;
  3. the two together, as `pipeline train-student` runs them (loader threads prefetching
     while the step runs);
and prints the ratio data/step: above 1 means the data path is not the bottleneck.

    .venv/bin/python bench/train_student.py [--steps 8] [--batch-size 2] [--min-size 480 ...]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import time
from pathlib import Path

import torch

from model.training.loss import GLIPLoss, total_loss
from model.inputs.text import load_tokenizer
from pipeline.train.config import OptimizerConfig, StudentModel
from pipeline.train.data import AugmentSettings, SourceSpec
from pipeline.train.data.loader import TrainLoader
from pipeline.train.data.mixing import MixedSampleStream
from pipeline.train.loop import build_student, make_optimizer, make_scheduler

SHARED = Path(os.environ.get("GLIP_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))


def make_loader(args, tokenizer) -> TrainLoader:
    spec = SourceSpec(
        kind="coco",
        paths=(str(SHARED / "data/coco_mini/annotations/instances_train2017_subset.json"),),
        images=str(SHARED / "data/coco_mini/train2017"),
    )
    stream = MixedSampleStream(specs=[spec], tokenizer=tokenizer, seed=0)
    settings = AugmentSettings(min_sizes=tuple(args.min_size), max_size=args.max_size)
    return TrainLoader(stream=stream, batch_size=args.batch_size, settings=settings, num_threads=args.loader_threads)


def train_step(model, optimizer, scheduler, loss_fn, batch, *, autocast=None) -> float:
    """One optimizer step as `pipeline train-student` makes it (forward under `autocast`, the
    losses in fp32, clipping at norm 1.0); `batch` already on the model's device."""
    with autocast or contextlib.nullcontext():
        out = model(batch.images, batch.input_ids, batch.attention_mask)
    losses = loss_fn(
        box_regression=out.box_regression, centerness=out.centerness, dot_product_logits=out.dot_product_logits,
        anchors=out.anchors, targets=batch.targets, text_mask=batch.attention_mask,
    )
    loss = total_loss(losses)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    return float(loss.detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--min-size", type=int, nargs="+", default=[480, 560, 640, 720, 800])
    parser.add_argument("--max-size", type=int, default=1333)
    parser.add_argument("--loader-threads", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer()
    print(f"tiny variant, CPU, {args.threads} torch threads, {args.loader_threads} loader threads, "
          f"batch {args.batch_size}, short side {args.min_size}, max {args.max_size}")

    # 1. data path alone (after one warm-up batch).
    loader = make_loader(args, tokenizer)
    batches = []
    iterator = iter(loader)
    next(iterator)
    start = time.perf_counter()
    for loaded in itertools.islice(iterator, args.steps):
        batches.append(loaded.batch)
    data_rate = args.steps * args.batch_size / (time.perf_counter() - start)
    iterator.close()
    print(f"data path alone:      {data_rate:8.2f} samples/s")

    # 2. training step alone, on the batches above.
    model = build_student(StudentModel(variant="tiny", init_text="minilm"), seed=0)
    optimizer = make_optimizer(model, OptimizerConfig())
    scheduler = make_scheduler(optimizer, OptimizerConfig(), steps=1000)
    loss_fn = GLIPLoss()
    train_step(model, optimizer, scheduler, loss_fn, batches[0])  # warm-up
    start = time.perf_counter()
    for batch in batches:
        train_step(model, optimizer, scheduler, loss_fn, batch)
    step_rate = len(batches) * args.batch_size / (time.perf_counter() - start)
    print(f"training step alone:  {step_rate:8.2f} samples/s")

    # 3. both together, the loader prefetching on its threads.
    loader = make_loader(args, tokenizer)
    iterator = iter(loader)
    train_step(model, optimizer, scheduler, loss_fn, next(iterator).batch)
    start = time.perf_counter()
    for loaded in itertools.islice(iterator, args.steps):
        train_step(model, optimizer, scheduler, loss_fn, loaded.batch)
    joint_rate = args.steps * args.batch_size / (time.perf_counter() - start)
    iterator.close()
    print(f"training with loader: {joint_rate:8.2f} samples/s")
    print(f"ratio data path / training step: {data_rate / step_rate:.1f}x "
          f"({'data path is not' if data_rate > step_rate else 'DATA PATH IS'} the bottleneck); "
          f"end-to-end / step alone: {joint_rate / step_rate:.2f}")


if __name__ == "__main__":
    main()
