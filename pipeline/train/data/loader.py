"""`TrainLoader`: batches of a sample stream (`MixedSampleStream` or `PairedSampleStream`),
decoded and augmented ahead on threads.

Decoding is `pipeline.io.images.decode_rgb`, the decoder of every stage (modes, EXIF, corrupt,
tiny and bomb images named by reason), so the student sees each pseudo image as the teacher did.
Planning, tokenisation and collation stay on one thread (the fast tokenizer is not shared
across threads).
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from model.training.augment import augment
from model.training.train_targets import GroundingExample, TrainingBatch, collate
from pipeline.io import storage
from pipeline.io.images import ImageDecodeError, decode_rgb
from pipeline.train.data.mixing import MixedSampleStream, PairedSampleStream, PlannedSample
from pipeline.train.data.records import Record
from pipeline.train.data.specs import AugmentSettings, TrainDataError


def decode_image(record: Record) -> Image.Image:
    """The record's image as RGB, EXIF-rotated only when that is its annotated size (when known)."""
    try:
        data = record.image if isinstance(record.image, bytes) else storage.read_bytes(record.image)
    except FileNotFoundError:
        raise TrainDataError(f"sample {record.key}: image file not found: {record.image}") from None
    except OSError as exc:
        raise TrainDataError(f"sample {record.key}: image cannot be read: {record.image}: {exc}") from None
    size = (record.width, record.height) if record.width and record.height else None
    try:
        return decode_rgb(data, annotated_size=size).image
    except ImageDecodeError as exc:
        raise TrainDataError(f"sample {record.key}: image cannot be decoded: {exc}") from None


def prepare_sample(planned: PlannedSample, settings: AugmentSettings):
    """Decode + augment one planned sample (runs on a pool thread)."""
    example = GroundingExample(
        image=decode_image(planned.record),
        caption=planned.caption,
        boxes=torch.from_numpy(np.ascontiguousarray(planned.boxes)),
        spans=planned.spans,
        key=planned.record.key,
        weights=None if planned.weights is None else torch.from_numpy(planned.weights),
        background_weight=planned.background_weight,
    )
    rng = np.random.default_rng(planned.augment_seed)
    return augment(
        example, rng, min_sizes=settings.min_sizes, max_size=settings.max_size,
        flip_probability=settings.flip_probability, crop_probability=settings.crop_probability,
        cutout_probability=settings.cutout_probability, scale_jitter=settings.scale_jitter,
    )


@dataclass
class LoadedBatch:
    """A collated batch and the stream state right after it (what a checkpoint stores)."""

    batch: TrainingBatch
    state: dict
    skipped: dict[str, str] = field(default_factory=dict)  # key -> reason


class TrainLoader:
    """Batches of a `MixedSampleStream`, prepared ahead on background threads.

    One producer thread plans samples and collates; `num_threads` pool threads decode and
    augment. Samples that fail (missing or broken image) are left out of their batch and
    reported in `LoadedBatch.skipped`; everything is deterministic given the stream position.
    """

    def __init__(
        self,
        *,
        stream: MixedSampleStream | PairedSampleStream,
        batch_size: int,
        settings: AugmentSettings = AugmentSettings(),
        num_threads: int = 2,
        prefetch: int = 2,
        max_query_len: int = 256,
        pad_to_max: bool = False,
        max_failed_batches: int = 100,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.stream = stream
        self.batch_size = batch_size
        self.settings = settings
        self.num_threads = max(1, num_threads)
        self.prefetch = max(1, prefetch)
        self.max_query_len = max_query_len
        self.pad_to_max = pad_to_max
        self.max_failed_batches = max_failed_batches

    def _next_batch(self, pool: ThreadPoolExecutor) -> LoadedBatch:
        """Plan, decode and collate one batch; a batch whose samples all fail is replaced by
        the next one, so every worker still makes one step per batch."""
        skipped: dict[str, str] = {}
        for _ in range(self.max_failed_batches):
            planned = self.stream.plan_batch(self.batch_size)
            state = self.stream.state_dict()
            futures = [pool.submit(prepare_sample, p, self.settings) for p in planned]
            samples = []
            for plan, future in zip(planned, futures):
                try:
                    samples.append(future.result())
                except TrainDataError as exc:
                    skipped[plan.record.key] = str(exc)
            if samples:
                batch = collate(samples, self.stream.tokenizer, max_query_len=self.max_query_len, pad_to_max=self.pad_to_max)
                return LoadedBatch(batch=batch, state=state, skipped=skipped)
        example = next(iter(skipped.items()))
        raise TrainDataError(
            f"{self.max_failed_batches} batches in a row had no readable sample (e.g. {example[0]}: {example[1]})"
        )

    def _produce(self, out: queue.Queue, stop: threading.Event) -> None:
        try:
            with ThreadPoolExecutor(self.num_threads, thread_name_prefix="train-data") as pool:
                while not stop.is_set():
                    loaded = self._next_batch(pool)
                    while not stop.is_set():
                        try:
                            out.put(loaded, timeout=0.2)
                            break
                        except queue.Full:
                            continue
        except BaseException as exc:  # surfaced in the consumer
            out.put(exc)

    def __iter__(self) -> Iterator[LoadedBatch]:
        out: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        producer = threading.Thread(target=self._produce, args=(out, stop), daemon=True, name="train-data-producer")
        producer.start()
        try:
            while True:
                item = out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while producer.is_alive():
                try:
                    out.get(timeout=0.1)
                except queue.Empty:
                    pass
                producer.join(timeout=0.1)
