"""Training data for the student: gold grounding/detection data mixed with pseudo shards.

Read in data order (each module imports only those above it):

* `specs`: what a run asks for: `SourceSpec` (one source and its mixing weight),
  `AugmentSettings`, `PseudoWeighting`, `TrainDataError`. Plain data, no torch: the CLI and
  the training configuration build these;
* `records`: `Record`, one annotated image before decoding, and the parsing of boxes and
  character spans shared by every source;
* `sources`: the gold sources read whole: COCO detection JSON, MDETR/GoldG grounding JSON,
  ODVG JSONL;
* `pseudo_stream`: the pseudo-label stage's WebDataset tars, streamed shard by shard;
* `mixing`: `MixedSampleStream`, the deterministic per-worker sequence of planned samples of
  a source mixture (prompts, negative phrases, pseudo box weights), resumable from its
  `state_dict()`;
* `loader`: `TrainLoader`, decoding (`pipeline.io.images`) and augmentation on a thread pool and
  collation into `TrainingBatch`es.
"""

from pipeline.train.data.specs import (  # the plain-data names, importable without torch
    SOURCE_KINDS,
    AugmentSettings,
    PseudoWeighting,
    SourceSpec,
    TrainDataError,
)

__all__ = ["SOURCE_KINDS", "AugmentSettings", "PseudoWeighting", "SourceSpec", "TrainDataError"]
