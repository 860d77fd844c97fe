"""Training-time augmentation of grounding examples, with box/text consistency.

`augment`: random short side (`RandomResize`) and horizontal flip (`RandomHorizontalFlip`,
legacy "+1" box flip). The flip also swaps the words "left" and "right" in the caption, as
MDETR/GLIP do, but re-bases every span so it still covers the same phrase. Optional strong
augmentation for students (Noisy Student): scale jitter, a random crop that keeps every box
whole (MDETR's `RandomSizeCrop(respect_boxes=True)`, so no phrase loses its box) and cutout
patches that hide at most half of any box; no colour jitter, since colour words are labels.
It takes a `model.training.train_targets.GroundingExample` and returns a `TrainingSample` for `collate`.

Boxes are xyxy absolute pixels with the legacy "+1" convention of maskrcnn_benchmark
(a box [x0, x1] covers x1 - x0 + 1 pixels), like every box of the official code.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from model.config import TRAIN_MAX_SIZE, TRAIN_MIN_SIZES
from model.inputs.preprocess import PIXEL_MEAN, PIXEL_STD, image_to_tensor, resized_size
from model.training.train_targets import GroundingExample, Span, TrainingSample

# -- boxes --------------------------------------------------------------------------------


def clip_boxes_to_image(boxes: Tensor, width: int, height: int) -> tuple[Tensor, Tensor]:
    """`BoxList.clip_to_image(remove_empty=True)`: clamp to [0, w-1] x [0, h-1] and keep boxes
    with x1 > x0 and y1 > y0. Returns (clipped boxes [K, 4], keep mask [N])."""
    clipped = boxes.clone()
    clipped[:, 0::2] = clipped[:, 0::2].clamp(min=0, max=width - 1)
    clipped[:, 1::2] = clipped[:, 1::2].clamp(min=0, max=height - 1)
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    return clipped[keep], keep


def flip_boxes(boxes: Tensor, width: int) -> Tensor:
    """Horizontal flip with the legacy convention: x' = width - x - 1 (`BoxList.transpose`)."""
    flipped = boxes.clone()
    flipped[:, 0] = width - boxes[:, 2] - 1
    flipped[:, 2] = width - boxes[:, 0] - 1
    return flipped


# -- caption flip -------------------------------------------------------------------------

_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def _swap_word(word: str) -> str:
    swapped = "right" if word.lower() == "left" else "left"
    if word.isupper():
        return swapped.upper()
    if word[0].isupper():
        return swapped.capitalize()
    return swapped


def swap_left_right(caption: str, spans: Sequence[Sequence[Span]]) -> tuple[str, list[list[Span]]]:
    """Swap the words "left" and "right" (whole words, case kept) and re-base the spans.

    The words have different lengths, so every offset after a swapped word moves; a span
    boundary inside a swapped word snaps to that word's new boundary. (MDETR/GLIP replace the
    strings without fixing `tokens_positive`, which shifts the spans of later phrases.)
    """
    pieces: list[str] = []
    # (old_start, old_end, new_start, new_end) of each swapped word, in order.
    moves: list[tuple[int, int, int, int]] = []
    cursor = 0
    new_length = 0
    for match in _LEFT_RIGHT.finditer(caption):
        pieces.append(caption[cursor : match.start()])
        new_length += match.start() - cursor
        word = _swap_word(match.group(0))
        moves.append((match.start(), match.end(), new_length, new_length + len(word)))
        pieces.append(word)
        new_length += len(word)
        cursor = match.end()
    if not moves:
        return caption, [list(entity) for entity in spans]
    pieces.append(caption[cursor:])

    def remap(position: int, *, is_end: bool) -> int:
        shift = 0
        for old_start, old_end, new_start, new_end in moves:
            if position <= old_start:
                break
            if position < old_end:  # inside a swapped word
                return new_end if is_end else new_start
            shift = new_end - old_end
        return position + shift

    new_spans = [[(remap(s, is_end=False), remap(e, is_end=True)) for s, e in entity] for entity in spans]
    return "".join(pieces), new_spans


# -- augmentation -------------------------------------------------------------------------


def random_crop_keeping_boxes(
    image: Image.Image, boxes: Tensor, rng: np.random.Generator, *, min_fraction: float = 0.6
) -> tuple[Image.Image, Tensor]:
    """A random crop of at least `min_fraction` of each side that contains every box whole
    (legacy "+1" boxes: a box [x0, x1] needs columns x0..x1); boxes shift into the crop."""
    width, height = image.size
    if boxes.shape[0]:
        lo = boxes[:, :2].amin(0).floor().clamp(min=0)
        hi = (boxes[:, 2:].amax(0).floor() + 1).clamp(max=torch.tensor([width, height], dtype=boxes.dtype))
    else:
        lo, hi = torch.zeros(2), torch.tensor([float(width), float(height)])
    origin = []
    sizes = []
    for axis, side in enumerate((width, height)):
        first, last = int(lo[axis]), int(hi[axis])  # the boxes need [first, last)
        smallest = max(int(np.ceil(min_fraction * side)), last - first, 1)
        size = int(rng.integers(smallest, side + 1))
        start = int(rng.integers(max(0, last - size), min(first, side - size) + 1))
        origin.append(start)
        sizes.append(size)
    cropped = image.crop((origin[0], origin[1], origin[0] + sizes[0], origin[1] + sizes[1]))
    shift = torch.tensor([origin[0], origin[1]] * 2, dtype=boxes.dtype)
    return cropped, boxes - shift


def cutout(
    tensor: Tensor, boxes: Tensor, rng: np.random.Generator, *, patches: int = 2, max_fraction: float = 0.2,
    max_hidden: float = 0.5, tries: int = 10,
) -> Tensor:
    """Zero (the mean colour after normalisation) up to `patches` rectangles of at most
    `max_fraction` of each side; a patch that would hide more than `max_hidden` of a box's area
    is drawn again (up to `tries` times), so no box loses its object."""
    _, height, width = tensor.shape
    tensor = tensor.clone()
    areas = ((boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)).clamp(min=1)
    hidden = torch.zeros(boxes.shape[0])
    for _ in range(patches):
        for _ in range(tries):
            h = int(rng.integers(1, max(2, int(max_fraction * height)) + 1))
            w = int(rng.integers(1, max(2, int(max_fraction * width)) + 1))
            y, x = int(rng.integers(0, max(1, height - h + 1))), int(rng.integers(0, max(1, width - w + 1)))
            overlap_w = ((boxes[:, 2] + 1).clamp(max=x + w) - boxes[:, 0].clamp(min=x)).clamp(min=0)
            overlap_h = ((boxes[:, 3] + 1).clamp(max=y + h) - boxes[:, 1].clamp(min=y)).clamp(min=0)
            covered = hidden + overlap_w * overlap_h / areas
            if not bool((covered > max_hidden).any()):
                tensor[:, y : y + h, x : x + w] = 0.0
                hidden = covered
                break
    return tensor


def augment(
    example: GroundingExample,
    rng: np.random.Generator,
    *,
    min_sizes: Sequence[int] = TRAIN_MIN_SIZES,
    max_size: int = TRAIN_MAX_SIZE,
    flip_probability: float = 0.5,
    crop_probability: float = 0.0,
    cutout_probability: float = 0.0,
    scale_jitter: float = 0.0,
    pixel_mean: Sequence[float] = PIXEL_MEAN,
    pixel_std: Sequence[float] = PIXEL_STD,
) -> TrainingSample:
    """Random short side from `min_sizes` (times 1 +- `scale_jitter`, long side capped at
    `max_size`), then a horizontal flip with probability `flip_probability`; boxes and caption
    follow the image. Strong options: a box-keeping random crop (before resizing) with
    probability `crop_probability`, cutout patches with probability `cutout_probability`.
    With every strong option at 0 the random draws are those of the weak transform."""
    image = example.image if example.image.mode == "RGB" else example.image.convert("RGB")
    width, height = image.size
    boxes, keep = clip_boxes_to_image(example.boxes, width, height)
    spans = [list(s) for s, k in zip(example.spans, keep.tolist()) if k]
    weights = None if example.weights is None else example.weights[keep]
    caption = example.caption
    if crop_probability and float(rng.random()) < crop_probability:
        image, boxes = random_crop_keeping_boxes(image, boxes, rng)
        width, height = image.size

    short_side = int(min_sizes[int(rng.integers(len(min_sizes)))])
    if scale_jitter:
        short_side = max(32, int(round(short_side * float(rng.uniform(1 - scale_jitter, 1 + scale_jitter)))))
    new_width, new_height = resized_size(width, height, min_size=short_side, max_size=max_size)
    # BoxList.resize: plain ratios of the new to the old size, per axis.
    scale = torch.tensor([new_width / width, new_height / height] * 2, dtype=torch.float32)
    boxes = boxes * scale
    tensor = image_to_tensor(image, min_size=short_side, max_size=max_size, pixel_mean=pixel_mean, pixel_std=pixel_std)

    if float(rng.random()) < flip_probability:
        tensor = tensor.flip(-1)
        boxes = flip_boxes(boxes, new_width)
        caption, spans = swap_left_right(caption, spans)
    if cutout_probability and float(rng.random()) < cutout_probability:
        tensor = cutout(tensor, boxes, rng)
    return TrainingSample(
        image=tensor, caption=caption, boxes=boxes, spans=spans, key=example.key, weights=weights,
        background_weight=example.background_weight,
    )
