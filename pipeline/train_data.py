"""Training data for the student: gold grounding/detection data mixed with pseudo shards.

Sources (each yields images with a caption and boxes grounded to caption spans):

* `pseudo`: the pseudo-label stage's WebDataset tars (`{key}.jpg` + `{key}.json`, DESIGN.md),
  streamed: a per-epoch shard order, several shards open at once, samples drawn at random
  among them and shuffled within each shard, so consecutive samples come from different shards;
* `coco`: COCO detection JSON + image folder, turned into grounding prompts of class names with
  random negative classes (GLIP's od_to_grounding, `model.train_targets.detection_caption`);
* `grounding`: MDETR/GoldG JSON (COCO layout; each image has a `caption`, each box
  `tokens_positive` spans into it);
* `odvg`: ODVG JSONL (MM-Grounding-DINO): lines with `grounding` (caption + regions) or
  `detection` (instances with a `category` name) records.

Sources are mixed with configurable weights. Every random decision of sample j on worker
`rank` derives from (seed, rank, j), so a stream is a pure function of its position: the
small `state_dict()` (per-source counters, open pseudo shards and their cursors, the recent
phrases used as negatives) lets `--resume` continue exactly where a run stopped.
Grounding captions get other samples' phrases appended as negatives (phrases without boxes),
within the 256-token budget. Decoding and augmentation run on a thread pool; planning,
tokenisation and collation stay on one thread (the fast tokenizer is not shared across threads).
"""

from __future__ import annotations

import io
import json
import os
import queue
import tarfile
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import fsspec
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from model.train_targets import (
    TRAIN_MAX_SIZE,
    TRAIN_MIN_SIZES,
    GroundingExample,
    TrainingBatch,
    append_negative_phrases,
    augment,
    collate,
    detection_caption,
    xywh_to_xyxy,
)

Span = tuple[int, int]
SOURCE_KINDS = ("pseudo", "coco", "grounding", "odvg")
_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")


class TrainDataError(ValueError):
    """A training data file that cannot be used (names the file, the record and the reason)."""


# -- records ------------------------------------------------------------------------------


@dataclass
class Record:
    """One annotated image before decoding.

    image: a path/URI of the image file or its encoded bytes. Grounding records carry
    `caption` and per-box `spans`; detection records carry per-box `box_names` and the dataset
    `vocabulary` instead (their prompt is drawn per sample). boxes: [N, 4] float32 xyxy
    pixels ("+1" convention); width/height: the annotated image size when known.
    """

    key: str
    image: str | bytes
    boxes: np.ndarray
    caption: str = ""
    spans: list[list[Span]] | None = None
    box_names: list[str] | None = None
    vocabulary: Sequence[str] | None = None
    width: int | None = None
    height: int | None = None
    scores: np.ndarray | None = None  # [N] teacher scores of pseudo boxes, None for gold

    @property
    def is_detection(self) -> bool:
        return self.box_names is not None

    def phrases(self) -> list[str]:
        """Distinct phrase texts of the boxes (for the negative-phrase pool)."""
        if self.spans is None:
            return []
        texts = (" ".join(self.caption[s:e] for s, e in entity).strip() for entity in self.spans)
        return list(dict.fromkeys(t for t in texts if t))


def _boxes(values: list, where: str) -> np.ndarray:
    try:
        boxes = np.asarray(values, dtype=np.float32).reshape(-1, 4)
    except (TypeError, ValueError):
        raise TrainDataError(f"{where}: boxes must be lists of 4 numbers, got {values!r:.80}") from None
    if not np.isfinite(boxes).all():
        raise TrainDataError(f"{where}: non-finite box coordinates")
    return boxes


def _spans(value: Any, caption: str, where: str) -> list[Span]:
    try:
        spans = [(int(s), int(e)) for s, e in value]
    except (TypeError, ValueError):
        raise TrainDataError(f"{where}: tokens_positive must be a list of [start, end] pairs, got {value!r:.80}") from None
    for start, end in spans:
        if not 0 <= start < end <= len(caption):
            raise TrainDataError(f"{where}: span [{start}, {end}) is outside the {len(caption)}-character caption")
    return spans


def _read_json(path: str) -> Any:
    try:
        with fsspec.open(path, "rb") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise TrainDataError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise TrainDataError(f"{path}: not valid JSON: {exc}") from None


def _join(folder: str, name: str) -> str:
    return name if "://" in name or os.path.isabs(name) else f"{folder.rstrip('/')}/{name}"


# -- indexable gold sources ---------------------------------------------------------------


class _InMemorySource:
    """A gold source read whole at construction: `records` indexed by position."""

    records: list[Record]

    def __len__(self) -> int:
        return len(self.records)

    def record(self, index: int) -> Record:
        return self.records[index]


class CocoDetectionSource(_InMemorySource):
    """COCO instances JSON + image folder as detection records (crowd boxes and images
    without boxes left out, as GLIP's COCO training set does)."""

    kind = "coco"

    def __init__(self, *, annotations: str, images: str) -> None:
        data = _read_json(annotations)
        if not isinstance(data, dict) or "images" not in data or "annotations" not in data or "categories" not in data:
            raise TrainDataError(f"{annotations}: not a COCO detection file (needs images, annotations, categories)")
        names = {int(c["id"]): str(c["name"]) for c in data["categories"]}
        self.vocabulary = [names[i] for i in sorted(names)]
        per_image: dict[int, list[dict]] = {}
        for ann in data["annotations"]:
            if ann.get("iscrowd", 0):
                continue
            per_image.setdefault(int(ann["image_id"]), []).append(ann)
        self.records: list[Record] = []
        for image in data["images"]:
            anns = per_image.get(int(image["id"]), [])
            if not anns:
                continue
            where = f"{annotations}: image {image['id']}"
            unknown = [a["category_id"] for a in anns if int(a["category_id"]) not in names]
            if unknown:
                raise TrainDataError(f"{where}: category ids {unknown} are not in 'categories'")
            boxes = xywh_to_xyxy(torch.from_numpy(_boxes([a["bbox"] for a in anns], where))).numpy()
            self.records.append(
                Record(
                    key=str(image["id"]),
                    image=_join(images, image["file_name"]),
                    boxes=boxes,
                    box_names=[names[int(a["category_id"])] for a in anns],
                    vocabulary=self.vocabulary,
                    width=image.get("width"),
                    height=image.get("height"),
                )
            )
        if not self.records:
            raise TrainDataError(f"{annotations}: no image with a non-crowd box")


class GroundingJsonSource(_InMemorySource):
    """MDETR/GoldG grounding JSON: COCO layout with `caption` per image and `tokens_positive`
    per box (boxes xywh)."""

    kind = "grounding"

    def __init__(self, *, annotations: str, images: str) -> None:
        data = _read_json(annotations)
        if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
            raise TrainDataError(f"{annotations}: not a grounding JSON (needs images and annotations)")
        per_image: dict[int, list[dict]] = {}
        for ann in data["annotations"]:
            per_image.setdefault(int(ann["image_id"]), []).append(ann)
        self.records = []
        for image in data["images"]:
            where = f"{annotations}: image {image.get('id')}"
            if "caption" not in image:
                raise TrainDataError(f"{where}: no 'caption' (MDETR/GoldG layout expected)")
            caption = str(image["caption"])
            anns = per_image.get(int(image["id"]), [])
            for ann in anns:
                if "tokens_positive" not in ann:
                    raise TrainDataError(f"{where}: annotation {ann.get('id')} has no 'tokens_positive'")
            boxes = xywh_to_xyxy(torch.from_numpy(_boxes([a["bbox"] for a in anns], where))).numpy()
            self.records.append(
                Record(
                    key=str(image["id"]),
                    image=_join(images, image["file_name"]),
                    boxes=boxes,
                    caption=caption,
                    spans=[_spans(a["tokens_positive"], caption, where) for a in anns],
                    width=image.get("width"),
                    height=image.get("height"),
                )
            )
        if not self.records:
            raise TrainDataError(f"{annotations}: no images")


def grounding_record(sample: dict, *, key: str, image: str | bytes, where: str) -> Record:
    """A record from an ODVG/pseudo `grounding` dict: caption + regions(bbox xyxy,
    tokens_positive); regions without `tokens_positive` use the first occurrence of `phrase`."""
    grounding = sample.get("grounding")
    if not isinstance(grounding, dict) or "caption" not in grounding:
        raise TrainDataError(f"{where}: no 'grounding' with a 'caption'")
    caption = str(grounding["caption"])
    boxes, spans, scores = [], [], []
    for index, region in enumerate(grounding.get("regions", [])):
        scores.append(float(region.get("score", 1.0)))
        if "tokens_positive" in region:
            spans.append(_spans(region["tokens_positive"], caption, f"{where} region {index}"))
        else:
            phrase = str(region.get("phrase", ""))
            start = caption.find(phrase) if phrase else -1
            if start < 0:
                raise TrainDataError(f"{where} region {index}: no tokens_positive and phrase {phrase!r} not in caption")
            spans.append([(start, start + len(phrase))])
        boxes.append(region.get("bbox"))
    return Record(
        key=key,
        image=image,
        boxes=_boxes(boxes, where),
        caption=caption,
        spans=spans,
        width=sample.get("width"),
        height=sample.get("height"),
        scores=np.asarray(scores, dtype=np.float32),
    )


class OdvgSource(_InMemorySource):
    """ODVG JSONL (one JSON object per line: `filename`, `height`, `width`, and `grounding`
    {caption, regions[bbox xyxy, phrase, tokens_positive]} or `detection` {instances[bbox xyxy,
    label, category]}). Detection lines need a `category` per instance or a label map."""

    kind = "odvg"

    def __init__(self, *, annotations: str, images: str, label_map: dict[str, str] | None = None) -> None:
        self.records = []
        categories: dict[str, None] = {}
        try:
            with fsspec.open(annotations, "rt", encoding="utf-8") as handle:
                lines = handle.read().splitlines()
        except FileNotFoundError:
            raise TrainDataError(f"{annotations}: file not found") from None
        detection_records = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{annotations}: line {number}"
            try:
                sample = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TrainDataError(f"{where}: not valid JSON: {exc}") from None
            if "filename" not in sample:
                raise TrainDataError(f"{where}: no 'filename'")
            image = _join(images, sample["filename"])
            key = os.path.splitext(os.path.basename(sample["filename"]))[0]
            if "grounding" in sample:
                self.records.append(grounding_record(sample, key=key, image=image, where=where))
            elif "detection" in sample:
                instances = sample["detection"].get("instances", [])
                names = []
                for instance in instances:
                    name = instance.get("category")
                    if name is None and label_map is not None:
                        name = label_map.get(str(instance.get("label")))
                    if name is None:
                        raise TrainDataError(f"{where}: instance without 'category' and no label map for {instance.get('label')!r}")
                    names.append(str(name))
                    categories[str(name)] = None
                if not instances:
                    continue
                record = Record(
                    key=key,
                    image=image,
                    boxes=_boxes([i.get("bbox") for i in instances], where),
                    box_names=names,
                    width=sample.get("width"),
                    height=sample.get("height"),
                )
                detection_records.append(record)
                self.records.append(record)
            else:
                raise TrainDataError(f"{where}: neither 'grounding' nor 'detection'")
        vocabulary = list(label_map.values()) if label_map else list(categories)
        for record in detection_records:
            record.vocabulary = vocabulary
        if not self.records:
            raise TrainDataError(f"{annotations}: no usable lines")


# -- streamed pseudo shards ---------------------------------------------------------------


def read_pseudo_shard(path: str) -> list[tuple[str, bytes, bytes]]:
    """(key, image bytes, json bytes) of every complete sample of a pseudo tar, in tar order.

    Members are grouped by key the WebDataset way (basename up to the first dot). A truncated
    tar yields the samples before the damage; a missing file raises TrainDataError.
    """
    groups: dict[str, dict[str, bytes]] = {}
    try:
        with fsspec.open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name.rsplit("/", 1)[-1]
                if "." not in name or name.startswith("."):
                    continue
                key, extension = name.split(".", 1)
                handle = tar.extractfile(member)
                if handle is not None:
                    groups.setdefault(key, {})[extension.lower()] = handle.read()
    except FileNotFoundError:
        raise TrainDataError(f"{path}: pseudo shard not found") from None
    except (tarfile.TarError, EOFError, OSError):
        pass  # truncated shard: keep what was read completely
    samples = []
    for key, parts in groups.items():
        image = next((parts[e] for e in _IMAGE_EXTENSIONS if e in parts), None)
        if image is not None and "json" in parts:
            samples.append((key, image, parts["json"]))
    return samples


def list_pseudo_shards(locations: Sequence[str]) -> list[str]:
    """Tar shards under each folder (or the tar files/globs given), sorted."""
    shards: list[str] = []
    for location in locations:
        fs, _, paths = fsspec.get_fs_token_paths(location)
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        prefix = "" if protocol in ("file", "local") else f"{protocol}://"
        found = []
        for path in paths:
            if fs.isdir(path):
                found += [p for p in fs.ls(path, detail=False) if p.endswith(".tar")]
            elif fs.exists(path):
                found.append(path)
        if not found:
            raise TrainDataError(f"{location}: no pseudo .tar shards found")
        shards += [prefix + p if prefix and not p.startswith(prefix) else p for p in sorted(found)]
    return shards


class PseudoShardStream:
    """Endless stream of pseudo records for one worker.

    Each epoch visits this worker's shards (all shards split round-robin across workers, or,
    with fewer shards than workers, every shard with samples split by position) in an order
    drawn from (seed, rank, epoch). Filtering leaves shards uneven, some empty: a worker whose
    share holds no sample for a whole epoch widens it (round-robin shards -> every shard with
    samples split by position -> every sample), so a pseudo set with any sample in it trains on
    any number of workers. `open_shards` shards are read at a time; each sample is
    drawn from a random open shard and shards are consumed in a per-shard random order.
    """

    kind = "pseudo"

    def __init__(
        self, *, shards: Sequence[str], seed: int, rank: int = 0, world_size: int = 1, open_shards: int = 4
    ) -> None:
        if not shards:
            raise TrainDataError("pseudo: no shards given")
        self.all_shards = list(shards)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        # This worker's share: 0 = its round-robin shards, 1 = every shard, samples split by
        # position, 2 = every sample (only when the narrower shares hold none).
        self.share = 0 if world_size == 1 or len(self.all_shards) >= world_size else 1
        self.open_shards = max(1, open_shards)
        self.epoch = 0
        self.next_shard = 0  # position in this epoch's shard order
        self.draws = 0
        self.active: list[dict] = []  # {"shard": index, "cursor": int, "order": [...] , "samples": [...]}
        self.empty_epochs = 0

    @property
    def shards(self) -> list[str]:
        return self.all_shards[self.rank :: self.world_size] if self.share == 0 else self.all_shards

    @property
    def split_samples(self) -> bool:
        return self.share == 1

    def _order(self, epoch: int) -> list[int]:
        rng = np.random.default_rng([self.seed, self.rank, 101, epoch])
        return rng.permutation(len(self.shards)).tolist()

    def _load(self, shard_index: int, cursor: int = 0) -> dict:
        samples = read_pseudo_shard(self.shards[shard_index])
        if self.split_samples:
            samples = samples[self.rank :: self.world_size]
        rng = np.random.default_rng([self.seed, self.rank, 102, self.epoch, shard_index])
        return {"shard": shard_index, "cursor": cursor, "order": rng.permutation(len(samples)).tolist(), "samples": samples}

    def _fill(self) -> None:
        while len(self.active) < self.open_shards:
            if self.next_shard >= len(self.shards):
                if self.active:
                    return
                self.epoch += 1
                self.next_shard = 0
                self.empty_epochs += 1
                if self.empty_epochs > 1:  # a whole pass over the share loaded nothing
                    if self.share < 2 and self.world_size > 1:
                        self.share += 1  # this worker's share is empty: widen it
                        self.epoch, self.empty_epochs = 0, 0
                        continue
                    raise TrainDataError(f"pseudo: shards {self.all_shards[:3]}... hold no complete sample")
            shard_index = self._order(self.epoch)[self.next_shard]
            self.next_shard += 1
            loaded = self._load(shard_index)
            if loaded["samples"]:
                self.active.append(loaded)
                self.empty_epochs = 0

    def next_record(self) -> Record:
        self._fill()
        rng = np.random.default_rng([self.seed, self.rank, 103, self.draws])
        self.draws += 1
        slot = self.active[int(rng.integers(len(self.active)))]
        key, image, raw_json = slot["samples"][slot["order"][slot["cursor"]]]
        slot["cursor"] += 1
        if slot["cursor"] >= len(slot["order"]):
            self.active.remove(slot)
        where = f"{self.shards[slot['shard']]}: sample {key}"
        try:
            sample = json.loads(raw_json)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TrainDataError(f"{where}: JSON is not valid: {exc}") from None
        return grounding_record(sample, key=str(sample.get("key", key)), image=image, where=where)

    def state_dict(self) -> dict:
        return {
            "share": self.share,
            "epoch": self.epoch,
            "next_shard": self.next_shard,
            "draws": self.draws,
            "active": [{"shard": s["shard"], "cursor": s["cursor"]} for s in self.active],
        }

    def load_state_dict(self, state: dict) -> None:
        self.share = int(state.get("share", self.share))
        self.epoch, self.next_shard, self.draws = int(state["epoch"]), int(state["next_shard"]), int(state["draws"])
        self.active = [self._load(int(s["shard"]), int(s["cursor"])) for s in state["active"]]

    def count_samples(self) -> int:
        """Samples this worker sees per epoch: it reads its own shards, and every shard only
        when those hold none (then it counts the share it would widen to)."""
        if self.share == 0:  # only this worker's shards, unless they are all empty
            own = sum(len(read_pseudo_shard(shard)) for shard in self.shards)
            if own or self.world_size == 1:
                return own
        counts = [len(read_pseudo_shard(shard)) for shard in self.all_shards]
        split = sum(len(range(self.rank, count, self.world_size)) for count in counts)
        return split if split and self.share <= 1 else sum(counts)


# -- mixing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceSpec:
    """One data source of a training run.

    kind: pseudo | coco | grounding | odvg; paths: pseudo shard folders/tars, or the one
    annotation file; images: image folder (gold sources); weight: mixing weight.
    """

    kind: str
    paths: tuple[str, ...]
    images: str = ""
    weight: float = 1.0
    label_map: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise TrainDataError(f"unknown source kind {self.kind!r}; expected one of {SOURCE_KINDS}")
        if self.weight <= 0:
            raise TrainDataError(f"{self.kind} source: mixing weight must be > 0, got {self.weight}")
        if self.kind != "pseudo" and not self.images:
            raise TrainDataError(f"{self.kind} source {self.paths}: needs an image folder (--images)")

    @property
    def name(self) -> str:
        return f"{self.kind}:{','.join(self.paths)}"


def build_source(spec: SourceSpec, *, seed: int, rank: int, world_size: int):
    if spec.kind == "pseudo":
        return PseudoShardStream(shards=list_pseudo_shards(spec.paths), seed=seed, rank=rank, world_size=world_size)
    (path,) = spec.paths
    if spec.kind == "coco":
        return CocoDetectionSource(annotations=path, images=spec.images)
    if spec.kind == "grounding":
        return GroundingJsonSource(annotations=path, images=spec.images)
    label_map = _read_json(spec.label_map) if spec.label_map else None
    return OdvgSource(annotations=path, images=spec.images, label_map=label_map)


def count_samples(spec: SourceSpec) -> int:
    """Samples per epoch of one source (all workers together)."""
    source = build_source(spec, seed=0, rank=0, world_size=1)
    return source.count_samples() if spec.kind == "pseudo" else len(source)


@dataclass
class PlannedSample:
    """A record with its final caption/spans and the seed of its augmentation."""

    record: Record
    caption: str
    spans: list[list[Span]]
    boxes: np.ndarray
    augment_seed: int
    source: str
    weights: np.ndarray | None = None  # [N] loss weight per box (pseudo weighting), None = gold
    background_weight: float | None = None


@dataclass(frozen=True)
class PseudoWeighting:
    """How the student's loss treats pseudo boxes (gold boxes always weigh 1).

    score_weight: a pseudo box's classification loss is scaled by its teacher score (Soft
    Teacher); ignore_below: boxes scoring under it are ignored, their anchors neither positive
    nor negative (Unbiased Teacher's band: shards filtered at a low floor keep them);
    background_weight: the negative loss of a pseudo image's unassigned anchors (the objects the
    teacher missed are background there), 1 as for gold.
    """

    score_weight: bool = False
    ignore_below: float = 0.0
    background_weight: float = 1.0

    @property
    def active(self) -> bool:
        return self.score_weight or self.ignore_below > 0 or self.background_weight != 1.0

    def box_weights(self, scores: np.ndarray) -> np.ndarray:
        weights = scores.astype(np.float32) if self.score_weight else np.ones(len(scores), dtype=np.float32)
        return np.where(scores < self.ignore_below, np.float32(0), weights)


class MixedSampleStream:
    """The deterministic per-worker sequence of planned samples of a source mixture.

    Indexable sources are read in a per-epoch permutation (seed, source, epoch) split across
    workers (this worker takes positions rank, rank + world, ...); pseudo sources stream.
    `max_negative_phrases` bounds how many recent other-sample phrases are appended to a
    grounding caption as negatives.
    """

    def __init__(
        self,
        *,
        specs: Sequence[SourceSpec],
        tokenizer,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        max_query_len: int = 256,
        max_negative_phrases: int = 8,
        phrase_pool_size: int = 256,
        pseudo_weighting: PseudoWeighting = PseudoWeighting(),
    ) -> None:
        if not specs:
            raise TrainDataError("no training data: give --pseudo, --coco, --grounding or --odvg")
        self.specs = list(specs)
        self.sources = [build_source(s, seed=seed, rank=rank, world_size=world_size) for s in self.specs]
        weights = np.asarray([s.weight for s in self.specs], dtype=np.float64)
        self.probabilities = weights / weights.sum()
        self.tokenizer = tokenizer
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.max_query_len = max_query_len
        self.max_negative_phrases = max_negative_phrases
        self.pseudo_weighting = pseudo_weighting
        self.position = 0
        self.source_counts = [0] * len(self.sources)
        self.phrase_pool: deque[str] = deque(maxlen=phrase_pool_size)
        self._token_cache: dict[str, int] = {}

    def count_tokens(self, text: str) -> int:
        count = self._token_cache.get(text)
        if count is None:
            count = len(self.tokenizer.tokenize(text))
            if len(self._token_cache) < 100_000:
                self._token_cache[text] = count
        return count

    def epoch_size(self) -> int:
        """Samples per epoch on this worker: the sum over sources."""
        return sum(s.count_samples() if s.kind == "pseudo" else len(range(self.rank, len(s), self.world_size)) for s in self.sources)

    def _indexed(self, source_index: int) -> Record:
        source = self.sources[source_index]
        count = self.source_counts[source_index]
        size = len(source)
        local = len(range(self.rank, size, self.world_size)) or size
        epoch, offset = divmod(count, local)
        permutation = np.random.default_rng([self.seed, 7, source_index, epoch]).permutation(size)
        own = permutation[self.rank :: self.world_size] if size >= self.world_size else permutation
        return source.record(int(own[offset]))

    def next_sample(self) -> PlannedSample:
        rng = np.random.default_rng([self.seed, self.rank, 11, self.position])
        self.position += 1
        source_index = int(rng.choice(len(self.sources), p=self.probabilities))
        source = self.sources[source_index]
        record = source.next_record() if source.kind == "pseudo" else self._indexed(source_index)
        self.source_counts[source_index] += 1

        boxes = record.boxes
        if record.is_detection:
            caption, spans, keep = detection_caption(
                record.box_names, record.vocabulary or record.box_names, rng,
                count_tokens=self.count_tokens, max_query_len=self.max_query_len,
            )
            boxes = boxes[np.asarray(keep, dtype=bool)] if len(keep) else boxes
        else:
            caption, spans = record.caption, [list(s) for s in record.spans or []]
            own = {p.lower() for p in record.phrases()}
            candidates = list(dict.fromkeys(p for p in self.phrase_pool if p.lower() not in own))
            wanted = int(rng.integers(self.max_negative_phrases + 1)) if self.max_negative_phrases else 0
            if wanted and candidates:
                chosen = rng.choice(len(candidates), size=min(wanted, len(candidates)), replace=False)
                caption = append_negative_phrases(
                    caption, [candidates[int(i)] for i in chosen],
                    count_tokens=self.count_tokens, max_query_len=self.max_query_len,
                )
            self.phrase_pool.extend(record.phrases())
        weights, background = None, None
        if source.kind == "pseudo" and self.pseudo_weighting.active and record.scores is not None:
            weights = self.pseudo_weighting.box_weights(record.scores)
            background = self.pseudo_weighting.background_weight
        return PlannedSample(
            record=record,
            caption=caption,
            spans=spans,
            boxes=boxes,
            augment_seed=int(rng.integers(2**62)),
            source=source.kind,
            weights=weights,
            background_weight=background,
        )

    def state_dict(self) -> dict:
        return {
            "position": self.position,
            "source_counts": list(self.source_counts),
            "phrase_pool": list(self.phrase_pool),
            "pseudo": {str(i): s.state_dict() for i, s in enumerate(self.sources) if s.kind == "pseudo"},
            "sources": [s.name for s in self.specs],
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("sources") != [s.name for s in self.specs]:
            raise TrainDataError(
                f"cannot resume the data stream: the checkpoint was trained on {state.get('sources')}, "
                f"this run gives {[s.name for s in self.specs]}"
            )
        self.position = int(state["position"])
        self.source_counts = [int(c) for c in state["source_counts"]]
        self.phrase_pool.clear()
        self.phrase_pool.extend(state["phrase_pool"])
        for index, source_state in state["pseudo"].items():
            self.sources[int(index)].load_state_dict(source_state)


# -- decoding and loading -----------------------------------------------------------------


def decode_image(record: Record) -> Image.Image:
    """The record's image as RGB, EXIF-rotated only when that is the annotated size."""
    try:
        if isinstance(record.image, bytes):
            image = Image.open(io.BytesIO(record.image))
        else:
            with fsspec.open(record.image, "rb") as handle:
                image = Image.open(io.BytesIO(handle.read()))
        image.load()
    except FileNotFoundError:
        raise TrainDataError(f"sample {record.key}: image file not found: {record.image}") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise TrainDataError(f"sample {record.key}: image cannot be decoded: {exc}") from None
    if record.width and record.height and image.size != (record.width, record.height):
        rotated = ImageOps.exif_transpose(image)
        if rotated.size == (record.width, record.height):
            image = rotated
    return image.convert("RGB")


@dataclass(frozen=True)
class AugmentSettings:
    """Training transform: random short side from `min_sizes`, long side <= `max_size`, and
    the strong augmentation of `model.train_targets.augment` (off by default)."""

    min_sizes: tuple[int, ...] = TRAIN_MIN_SIZES
    max_size: int = TRAIN_MAX_SIZE
    flip_probability: float = 0.5
    crop_probability: float = 0.0
    cutout_probability: float = 0.0
    scale_jitter: float = 0.0


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
        stream: MixedSampleStream,
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
            planned = [self.stream.next_sample() for _ in range(self.batch_size)]
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
