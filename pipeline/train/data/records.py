"""`Record`: one annotated image before decoding, and the parsing every source shares.

Boxes are [N, 4] float32 xyxy pixels ("+1" convention); spans are GLIP's `tokens_positive`,
`[start, end)` character offsets into the caption. Every parse error is a `TrainDataError`
naming the file, the record and the reason.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from pipeline.io import storage
from pipeline.train.data.specs import TrainDataError

Span = tuple[int, int]


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

    def box_phrases(self) -> list[str]:
        """The phrase text of each box (its spans joined), in box order; [] without spans."""
        return [" ".join(self.caption[s:e] for s, e in entity).strip() for entity in self.spans or []]

    def phrases(self) -> list[str]:
        """Distinct phrase texts of the boxes (for the negative-phrase pool)."""
        return list(dict.fromkeys(t for t in self.box_phrases() if t))


def parse_boxes(values: list, where: str) -> np.ndarray:
    """[N, 4] float32 of a list of 4-number boxes; TrainDataError otherwise."""
    try:
        boxes = np.asarray(values, dtype=np.float32).reshape(-1, 4)
    except (TypeError, ValueError):
        raise TrainDataError(f"{where}: boxes must be lists of 4 numbers, got {values!r:.80}") from None
    if not np.isfinite(boxes).all():
        raise TrainDataError(f"{where}: non-finite box coordinates")
    return boxes


def parse_spans(value: Any, caption: str, where: str) -> list[Span]:
    """`tokens_positive` as (start, end) pairs inside `caption`; TrainDataError otherwise."""
    try:
        spans = [(int(s), int(e)) for s, e in value]
    except (TypeError, ValueError):
        raise TrainDataError(f"{where}: tokens_positive must be a list of [start, end] pairs, got {value!r:.80}") from None
    for start, end in spans:
        if not 0 <= start < end <= len(caption):
            raise TrainDataError(f"{where}: span [{start}, {end}) is outside the {len(caption)}-character caption")
    return spans


def read_text(path: str) -> str:
    """A UTF-8 annotation file (local or object store); TrainDataError when it is missing."""
    try:
        return storage.read_bytes(path).decode("utf-8")
    except FileNotFoundError:
        raise TrainDataError(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise TrainDataError(f"{path}: not UTF-8 text: {exc}") from None


def read_json(path: str) -> Any:
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise TrainDataError(f"{path}: not valid JSON: {exc}") from None


def image_location(folder: str, name: str) -> str:
    """An annotation's image file name resolved against the image folder (absolute names and
    URIs as they are)."""
    return name if "://" in name or os.path.isabs(name) else storage.join(folder, name)


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
            spans.append(parse_spans(region["tokens_positive"], caption, f"{where} region {index}"))
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
        boxes=parse_boxes(boxes, where),
        caption=caption,
        spans=spans,
        width=sample.get("width"),
        height=sample.get("height"),
        scores=np.asarray(scores, dtype=np.float32),
    )
