"""The pseudo-label stage's WebDataset tars (`{key}.{image}` + `{key}.json`, DESIGN.md), streamed.

A per-epoch shard order, several shards open at once, samples drawn at random among them and
shuffled within each shard, so consecutive samples come from different shards. Shards are read
with `labels_io.iter_pseudo_samples`, the reader of every stage: a broken or truncated tar is
an error naming the file and what broke (training never learns from part of a shard).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from pipeline.io import storage
from pipeline.io.labels_io import iter_pseudo_samples
from pipeline.io.shards import TAR_SUFFIXES, ShardReadError
from pipeline.train.data.records import Record, grounding_record
from pipeline.train.data.specs import TrainDataError

PseudoSample = tuple[str, bytes, dict]  # key, image bytes, sample JSON


def read_pseudo_shard(path: str) -> list[PseudoSample]:
    """(key, image bytes, sample JSON) of every sample of a pseudo tar, in tar order.

    Raises TrainDataError naming the file for a missing file, a broken or truncated tar and a
    sample whose JSON does not parse.
    """
    try:
        return [(key, image, sample) for key, _, image, sample in iter_pseudo_samples(path)]
    except ShardReadError as error:
        if isinstance(error.__cause__, FileNotFoundError):
            raise TrainDataError(f"{path}: pseudo shard not found") from None
        raise TrainDataError(f"{error}: training reads whole pseudo shards only (write it again with `pipeline filter`, or leave it out)") from None
    except ValueError as error:
        raise TrainDataError(str(error)) from None


def list_pseudo_shards(locations: Sequence[str]) -> list[str]:
    """The tar shards of each folder (or the tar files/globs given), sorted per location."""
    try:
        return storage.expand_inputs(locations, suffixes=TAR_SUFFIXES)
    except FileNotFoundError as error:
        raise TrainDataError(f"--pseudo: {error}") from None


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
        key, image, sample = slot["samples"][slot["order"][slot["cursor"]]]
        slot["cursor"] += 1
        if slot["cursor"] >= len(slot["order"]):
            self.active.remove(slot)
        where = f"{self.shards[slot['shard']]}: sample {key}"
        if not isinstance(sample, dict):
            raise TrainDataError(f"{where}: the sample JSON is not an object")
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
