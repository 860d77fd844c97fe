"""Training examples -> GLIP inputs and loss targets, with box/text consistency.

An example is an image, a caption and boxes, each box grounded to character spans of the
caption (GLIP's `tokens_positive`). This module holds the parts of the official training data
path that do not depend on where the data comes from:

* `detection_caption`: detection labels -> a grounding prompt of class names with random
  negative classes (`od_to_grounding.py`, `convert_object_detection_to_grounding_optimized_for_od`
  with the default control probabilities: half of the time every sampled negative, otherwise
  a random number of them, all under the 256-token budget);
* the augmentations (resize, flip with the caption, strong options) are in `model.training.augment`;
* `collate`: tokenisation (at most 256 tokens), positive maps, dropping boxes whose spans fall
  past the token limit, and padding the images into one batch.

Boxes are xyxy absolute pixels with the legacy "+1" convention of maskrcnn_benchmark
(a box [x0, x1] covers x1 - x0 + 1 pixels), like every box of the official code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from model.inputs.preprocess import batch_images
from model.inputs.text import clean_name, positive_map_from_spans, tokenize

Span = tuple[int, int]

# od_to_grounding defaults of the GLIP pretrain configs (RANDOM_SAMPLE_NEG, CONTROL_PROB[2]).
MAX_NEGATIVE_CLASSES = 85
FULL_NEGATIVES_PROBABILITY = 0.5


@dataclass
class GroundingExample:
    """One decoded training example.

    image: PIL RGB; caption: str; boxes: [N, 4] float32 xyxy pixels of `image`;
    spans: per box, the `[start, end)` character spans of its phrase in `caption`.
    """

    image: Image.Image
    caption: str
    boxes: Tensor
    spans: list[list[Span]]
    key: str = ""
    weights: Tensor | None = None  # [N] per-box loss weights (pseudo boxes), None = all 1
    background_weight: float | None = None

    def __post_init__(self) -> None:
        self.boxes = torch.as_tensor(self.boxes, dtype=torch.float32).reshape(-1, 4)
        if len(self.spans) != self.boxes.shape[0]:
            raise ValueError(f"example {self.key!r}: {self.boxes.shape[0]} boxes but {len(self.spans)} span lists")
        if self.weights is not None and self.weights.shape != (self.boxes.shape[0],):
            raise ValueError(f"example {self.key!r}: {self.boxes.shape[0]} boxes but weights {tuple(self.weights.shape)}")


@dataclass
class TrainingSample:
    """An augmented example: image [3, h, w] normalised (BGR x255, mean/std), boxes [N, 4] xyxy
    in that tensor's pixel frame, caption and per-box spans into it."""

    image: Tensor
    caption: str
    boxes: Tensor
    spans: list[list[Span]]
    key: str = ""
    weights: Tensor | None = None
    background_weight: float | None = None


@dataclass
class TrainingBatch:
    """Model inputs and loss targets of a batch.

    images: [B, 3, H, W] zero-padded to a multiple of 32; image_sizes: un-padded (h, w);
    input_ids, attention_mask: [B, L] int64 (L <= 256); targets: per image dict(boxes [G, 4]
    xyxy in the padded-input frame, positive_map [G, L] float 0/1, and for weighted pseudo
    samples `weights` [G] and `background_weight`, see `model.training.loss`); dropped_boxes: boxes whose
    phrase fell past the token limit (or mapped to no token) and were left out.
    """

    images: Tensor
    image_sizes: list[tuple[int, int]]
    input_ids: Tensor
    attention_mask: Tensor
    targets: list[dict[str, Tensor]]
    captions: list[str]
    keys: list[str] = field(default_factory=list)
    dropped_boxes: int = 0

    def __len__(self) -> int:
        return len(self.captions)


# -- boxes --------------------------------------------------------------------------------


def xywh_to_xyxy(boxes: Tensor) -> Tensor:
    """COCO [x, y, w, h] -> legacy xyxy [x, y, x + w - 1, y + h - 1] (`BoxList.convert`)."""
    x, y, w, h = boxes.unbind(-1)
    return torch.stack((x, y, x + (w - 1).clamp(min=0), y + (h - 1).clamp(min=0)), dim=-1)


# -- prompts ------------------------------------------------------------------------------


def detection_caption(
    box_names: Sequence[str],
    vocabulary: Sequence[str],
    rng: np.random.Generator,
    *,
    count_tokens: Callable[[str], int],
    max_query_len: int = 256,
    max_negatives: int = MAX_NEGATIVE_CLASSES,
    full_negatives_probability: float = FULL_NEGATIVES_PROBABILITY,
    separator: str = ". ",
) -> tuple[str, list[list[Span]], list[bool]]:
    """A grounding prompt for detection labels, as GLIP's od_to_grounding builds it.

    box_names: the class name of each box; vocabulary: every class name of the dataset;
    count_tokens: WordPiece token count of a string (no special tokens).
    Positive classes are shuffled and kept while their tokens fit `max_query_len` (boxes of
    classes that do not fit are dropped, `check_for_positive_overflow`); negatives are drawn
    without replacement from the vocabulary (positives among them are discarded), their
    number being all of them (up to `max_negatives`) with probability
    `full_negatives_probability` and otherwise uniform in 1..that, and kept while the budget
    lasts. All names are shuffled together and joined with ". ".
    Returns (caption, per kept box its spans, keep mask over `box_names`).
    """
    positives = list(dict.fromkeys(box_names))  # unique, first-seen order
    rng.shuffle(positives)
    kept_positives: list[str] = []
    length = 0
    for name in positives:
        length += count_tokens(clean_name(name) + separator)
        if length > max_query_len:
            break
        kept_positives.append(name)
    positive_set = set(kept_positives)

    full_negative = min(max_negatives, len(vocabulary))
    if float(rng.random()) < full_negatives_probability:
        num_negatives = full_negative
    else:
        num_negatives = int(rng.integers(max(1, full_negative))) + 1
    num_negatives = min(num_negatives, len(vocabulary))
    drawn = rng.choice(len(vocabulary), size=num_negatives, replace=False) if num_negatives else []
    negatives = [vocabulary[int(i)] for i in drawn if vocabulary[int(i)] not in set(box_names)]
    negatives = list(dict.fromkeys(negatives))
    rng.shuffle(negatives)
    budget = max_query_len - length
    kept_negatives = []
    for name in negatives:
        budget -= count_tokens(clean_name(name) + separator)
        if budget <= 0:
            break
        kept_negatives.append(name)

    names = kept_negatives + kept_positives
    rng.shuffle(names)
    caption = ""
    name_span: dict[str, Span] = {}
    for index, name in enumerate(names):
        start = len(caption)
        caption += clean_name(name)
        name_span[name] = (start, len(caption))
        if index != len(names) - 1:
            caption += separator
    keep = [name in positive_set for name in box_names]
    spans = [[name_span[name]] for name in box_names if name in positive_set]
    return caption, spans, keep


def append_negative_phrases(
    caption: str,
    phrases: Sequence[str],
    *,
    count_tokens: Callable[[str], int],
    max_query_len: int = 256,
    separator: str = ". ",
) -> str:
    """The caption followed by other samples' phrases as negatives ("caption. a cat. a kite").

    Phrases are appended in order while the whole prompt ([CLS] and [SEP] included) stays
    within `max_query_len` tokens, so appended negatives never push the caption's own phrases
    past the limit. Spans into the caption are unchanged (text is only added at the end).
    """
    used = count_tokens(caption) + 2
    for phrase in phrases:
        cost = count_tokens(separator + phrase)
        if used + cost > max_query_len:
            break
        caption = caption.rstrip() + separator + phrase if caption.strip() else phrase
        used += cost
    return caption


# -- batching -----------------------------------------------------------------------------


def capped_positive_map(tokenizer, caption: str, spans: Sequence[Sequence[Span]], *, max_query_len: int) -> Tensor:
    """Positive map [N, max_query_len] 0/1 of each box's spans, empty rows for spans past the cut.

    A caption longer than `max_query_len` tokens is truncated with [SEP] at the last position,
    so a span that reaches that position or beyond has "fallen off" and its row is cleared.
    """
    positive_map = (positive_map_from_spans(tokenizer, caption, spans, max_length=max_query_len) > 0).float()
    num_tokens = len(tokenizer(caption)["input_ids"])
    if num_tokens > max_query_len and positive_map.shape[0]:
        fell_off = positive_map[:, max_query_len - 1 :].any(dim=1)
        positive_map[fell_off] = 0.0
    return positive_map


def collate(
    samples: Sequence[TrainingSample],
    tokenizer,
    *,
    max_query_len: int = 256,
    pad_to_max: bool = False,
    size_divisibility: int = 32,
) -> TrainingBatch:
    """Batch augmented samples: pad images, tokenise prompts, build positive maps.

    `pad_to_max=True` pads every prompt to `max_query_len` (the official PAD_MAX, which makes
    the no-object slot 255 of the loss a padding position); False pads to the longest prompt.
    Boxes whose spans map to no token inside the limit are dropped with their rows.
    """
    if not samples:
        raise ValueError("collate: empty batch")
    images, image_sizes = batch_images([s.image for s in samples], size_divisibility=size_divisibility)
    text = tokenize(tokenizer, [s.caption for s in samples], max_length=max_query_len, pad_to_max=pad_to_max)
    width = text["input_ids"].shape[1]
    targets = []
    dropped = 0
    for sample in samples:
        positive_map = capped_positive_map(tokenizer, sample.caption, sample.spans, max_query_len=max_query_len)
        keep = positive_map.any(dim=1)
        dropped += int((~keep).sum())
        target = {"boxes": sample.boxes[keep].float(), "positive_map": positive_map[keep, :width].contiguous()}
        if sample.weights is not None:
            target["weights"] = sample.weights[keep].float()
        if sample.background_weight is not None:
            target["background_weight"] = float(sample.background_weight)
        targets.append(target)
    return TrainingBatch(
        images=images,
        image_sizes=image_sizes,
        input_ids=text["input_ids"],
        attention_mask=text["attention_mask"],
        targets=targets,
        captions=[s.caption for s in samples],
        keys=[s.key for s in samples],
        dropped_boxes=dropped,
    )
