"""`MixedSampleStream`: the deterministic per-worker sequence of planned samples of a mixture.

Sources are mixed with their `SourceSpec.weight`. Every random decision of sample j on worker
`rank` derives from (seed, rank, j), so a stream is a pure function of its position: the small
`state_dict()` (per-source counters, open pseudo shards and their cursors, the recent phrases
used as negatives) lets `--resume` continue exactly where a run stopped. Grounding captions get
other samples' phrases appended as negatives (phrases without boxes), within the 256-token
budget; detection records get a prompt of class names drawn per sample. With
`PseudoWeighting.prompt == "names"` a pseudo record is prompted like a detection record: each
box's phrase becomes its head noun (`nlp.vocabulary.phrase_name`), and negative names come from
the recent pseudo samples' names (a pool kept in the state like the phrase pool).

`PairedSampleStream` composes each step's batch the semi-supervised way (Unbiased Teacher,
Soft Teacher): `batch_size` samples of the gold sources, drawn exactly as a run on the gold
sources alone draws them, plus `per_step` samples of the pseudo sources from a stream of their
own. A gold-only control arm with the same seed then sees the very same gold samples, with the
same prompts and augmentation, step for step; the student sees the pseudo samples on top.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from model.training.train_targets import append_negative_phrases, detection_caption
from nlp.vocabulary import phrase_name
from pipeline.train.data.pseudo_stream import PseudoShardStream, list_pseudo_shards
from pipeline.train.data.records import Record, Span, read_json
from pipeline.train.data.sources import CocoDetectionSource, GroundingJsonSource, InMemorySource, OdvgSource
from pipeline.train.data.specs import PseudoWeighting, SourceSpec, TrainDataError, paired_sources


def _gold_names(sources) -> frozenset[str]:
    """The class names the gold (non-pseudo) sources teach: detection category names and the
    head nouns of grounding phrases, as `phrase_name` gives them."""
    names = set()
    for source in sources:
        if isinstance(source, PseudoShardStream):
            continue
        for index in range(len(source)):
            record = source.record(index)
            texts = (record.vocabulary or record.box_names or []) if record.is_detection else record.phrases()
            names.update(phrase_name(text) for text in texts)
    names.discard("")
    return frozenset(names)


def build_source(spec: SourceSpec, *, seed: int, rank: int, world_size: int) -> InMemorySource | PseudoShardStream:
    if spec.kind == "pseudo":
        return PseudoShardStream(shards=list_pseudo_shards(spec.paths), seed=seed, rank=rank, world_size=world_size)
    (path,) = spec.paths
    if spec.kind == "coco":
        return CocoDetectionSource(annotations=path, images=spec.images)
    if spec.kind == "grounding":
        return GroundingJsonSource(annotations=path, images=spec.images)
    label_map = read_json(spec.label_map) if spec.label_map else None
    return OdvgSource(annotations=path, images=spec.images, label_map=label_map)


def count_samples(spec: SourceSpec) -> int:
    """Samples per epoch of one source (all workers together). A pseudo folder that a
    pseudo-label or filter run wrote whole is counted from that run's `_stats.json` (one
    listing and one read, instead of reading 10^4 tars)."""
    if spec.kind == "pseudo":
        counted = [counted_by_stage(path) for path in spec.paths]
        if all(count is not None for count in counted):
            return sum(counted)  # type: ignore[arg-type]
    source = build_source(spec, seed=0, rank=0, world_size=1)
    return source.count_samples() if isinstance(source, PseudoShardStream) else len(source)


def counted_by_stage(path: str) -> int | None:
    """The samples in `path`, a stage's `pseudo/` folder, as its `_stats.json` beside it
    counts them (`written` over every finished shard), when that record covers exactly the
    folder's tars: the stage finished every shard (none failed) and the folder holds as many
    tars as it has shards. None: count by reading."""
    import json

    from pipeline.io import storage

    if path.rstrip("/").rsplit("/", 1)[-1] != "pseudo" or not storage.is_dir(path):
        return None
    stats_path = storage.join(path.rstrip("/").rsplit("/", 1)[0] if "/" in path.rstrip("/") else ".", "_stats.json")
    try:
        stats = json.loads(storage.read_bytes(stats_path))
        shards = stats["shards"]
        finished = shards["written"] + shards["already_done"]
        if stats.get("stage") not in ("pseudo-label", "filter") or shards["failed"] or finished != shards["total"]:
            return None
        tars = [name for name in storage.list_names(path) if name.endswith(".tar")]
        return int(stats["written"]) if len(tars) == shards["total"] else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


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
        salt: int | None = None,
        gold_names: frozenset[str] | None = None,
    ) -> None:
        if not specs:
            raise TrainDataError("no training data: give --pseudo, --coco, --grounding or --odvg")
        self.specs = list(specs)
        self.sources = [build_source(s, seed=seed, rank=rank, world_size=world_size) for s in self.specs]
        weights = np.asarray([s.weight for s in self.specs], dtype=np.float64)
        self.probabilities = weights / weights.sum()
        self.tokenizer = tokenizer
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.salt = salt  # a second stream of the same run and seed draws apart from the first
        self.max_query_len = max_query_len
        self.max_negative_phrases = max_negative_phrases
        self.pseudo_weighting = pseudo_weighting
        self.position = 0
        self.source_counts = [0] * len(self.sources)
        self.phrase_pool: deque[str] = deque(maxlen=phrase_pool_size)
        self.name_pool: deque[str] = deque(maxlen=phrase_pool_size)  # pseudo class names (prompt "names")
        # the class names the gold sources teach (PseudoWeighting.known_weight); given when the
        # gold sources are another stream's
        if gold_names is None:
            gold_names = _gold_names(self.sources) if pseudo_weighting.known_weight != 1.0 else frozenset()
        self.gold_names = gold_names
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
        return sum(
            s.count_samples() if isinstance(s, PseudoShardStream) else len(range(self.rank, len(s), self.world_size))
            for s in self.sources
        )

    def _indexed(self, source_index: int) -> Record:
        source = self.sources[source_index]
        count = self.source_counts[source_index]
        size = len(source)
        local = len(range(self.rank, size, self.world_size)) or size
        epoch, offset = divmod(count, local)
        permutation = np.random.default_rng([self.seed, 7, source_index, epoch]).permutation(size)
        own = permutation[self.rank :: self.world_size] if size >= self.world_size else permutation
        return source.record(int(own[offset]))

    def _with_negatives(self, record: Record, rng: np.random.Generator) -> str:
        """The record's caption with up to `max_negative_phrases` recent other-sample phrases
        appended (none of its own), then its phrases join the pool."""
        caption = record.caption
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
        return caption

    def plan_batch(self, batch_size: int) -> list[PlannedSample]:
        """The next `batch_size` planned samples (one worker's share of a step)."""
        return [self.next_sample() for _ in range(batch_size)]

    def next_sample(self) -> PlannedSample:
        key = [self.seed, self.rank, 11, self.position]
        rng = np.random.default_rng(key if self.salt is None else [*key, self.salt])
        self.position += 1
        source_index = int(rng.choice(len(self.sources), p=self.probabilities))
        source = self.sources[source_index]
        is_pseudo = isinstance(source, PseudoShardStream)
        record = source.next_record() if is_pseudo else self._indexed(source_index)
        self.source_counts[source_index] += 1

        boxes, scores, names = record.boxes, record.scores, None
        if is_pseudo and self.pseudo_weighting.prompt == "names":
            caption, spans, boxes, scores, names = self._as_names(record, rng)
        elif record.is_detection:
            caption, spans, keep = detection_caption(
                record.box_names, record.vocabulary or record.box_names, rng,
                count_tokens=self.count_tokens, max_query_len=self.max_query_len,
            )
            boxes = boxes[np.asarray(keep, dtype=bool)] if len(keep) else boxes
        else:
            spans = [list(s) for s in record.spans or []]
            caption = self._with_negatives(record, rng)
        weights, background = None, None
        if is_pseudo and self.pseudo_weighting.active and scores is not None:
            known = None
            if self.gold_names:
                if names is None:
                    names = [phrase_name(text) for text in record.box_phrases()]
                known = np.asarray([name in self.gold_names for name in names], dtype=bool)
            weights = self.pseudo_weighting.box_weights(scores, known)
            background = self.pseudo_weighting.background_weight
        return PlannedSample(
            record=record, caption=caption, spans=spans, boxes=boxes, augment_seed=int(rng.integers(2**62)),
            source=source.kind, weights=weights, background_weight=background,
        )

    def _as_names(self, record: Record, rng: np.random.Generator):
        """A pseudo record as a detection prompt: (caption, spans, boxes, scores, names). Each box is
        named by its phrase's head noun; boxes whose phrase has none are dropped; negatives are
        drawn from the names of recent pseudo samples (`detection_caption`, as for gold
        detection data)."""
        names = [phrase_name(text) for text in record.box_phrases()]
        named = np.asarray([bool(n) for n in names], dtype=bool)
        names = [n for n in names if n]
        vocabulary = list(dict.fromkeys([*names, *self.name_pool]))
        if not vocabulary:  # no name yet at all: the caption alone, every anchor background
            return record.caption, [], np.zeros((0, 4), dtype=np.float32), record.scores[:0] if record.scores is not None else None, []
        caption, spans, keep = detection_caption(
            names, vocabulary, rng, count_tokens=self.count_tokens, max_query_len=self.max_query_len
        )
        self.name_pool.extend(dict.fromkeys(names))
        chosen = np.flatnonzero(named)[np.asarray(keep, dtype=bool)] if names else np.zeros(0, dtype=np.int64)
        scores = record.scores[chosen] if record.scores is not None else None
        kept_names = [name for name, kept in zip(names, keep) if kept]
        return caption, spans, record.boxes[chosen].reshape(-1, 4), scores, kept_names

    def state_dict(self) -> dict:
        return {
            "position": self.position,
            "source_counts": list(self.source_counts),
            "phrase_pool": list(self.phrase_pool),
            "name_pool": list(self.name_pool),
            "pseudo": {str(i): s.state_dict() for i, s in enumerate(self.sources) if isinstance(s, PseudoShardStream)},
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
        self.name_pool.clear()
        self.name_pool.extend(state.get("name_pool", []))  # absent in checkpoints of older runs
        for index, source_state in state["pseudo"].items():
            self.sources[int(index)].load_state_dict(source_state)


class PairedSampleStream:
    """Each step's planned batch: `batch_size` samples of the gold sources, then `per_step`
    samples of the pseudo sources (see the module doc).

    The gold part is a `MixedSampleStream` over the gold specs with the run's seed, so it is
    the sequence a gold-only run draws; the pseudo part is a second stream (salted seed, its
    own negative pools) that knows the gold names for `PseudoWeighting.known_weight`.
    `pseudo_weighting` touches pseudo samples only, as in a mixture.
    """

    PSEUDO_SALT = 97

    def __init__(self, *, specs: Sequence[SourceSpec], per_step: int, tokenizer, **options) -> None:
        if per_step < 1:
            raise TrainDataError(f"--pseudo-per-step must be >= 1 to pair batches, got {per_step}")
        gold, pseudo = paired_sources(specs)
        self.specs = list(specs)
        self.per_step = per_step
        self.tokenizer = tokenizer
        self.gold = MixedSampleStream(specs=gold, tokenizer=tokenizer, **options)
        # the gold stream has read the gold names already (when known_weight asks for them)
        self.pseudo = MixedSampleStream(
            specs=pseudo, tokenizer=tokenizer, salt=self.PSEUDO_SALT, gold_names=self.gold.gold_names, **options
        )

    def plan_batch(self, batch_size: int) -> list[PlannedSample]:
        return self.gold.plan_batch(batch_size) + self.pseudo.plan_batch(self.per_step)

    def state_dict(self) -> dict:
        return {"per_step": self.per_step, "gold": self.gold.state_dict(), "pseudo": self.pseudo.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("per_step") != self.per_step:
            raise TrainDataError(
                f"cannot resume the data stream: the checkpoint drew {state.get('per_step', 'no')} paired pseudo "
                f"samples per step, this run {self.per_step}"
            )
        self.gold.load_state_dict(state["gold"])
        self.pseudo.load_state_dict(state["pseudo"])


def make_stream(*, specs: Sequence[SourceSpec], pseudo_per_step: int = 0, **options) -> MixedSampleStream | PairedSampleStream:
    """The run's sample stream: a mixture by weight, or paired gold + pseudo batches when
    `pseudo_per_step` > 0."""
    if pseudo_per_step > 0:
        return PairedSampleStream(specs=specs, per_step=pseudo_per_step, **options)
    return MixedSampleStream(specs=specs, **options)
