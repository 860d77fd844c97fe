"""GLIP's test-time image transform and batching (SPEC section 3).

Official order (maskrcnn_benchmark `data/transforms`): PIL RGB image -> Resize(800, 1333) ->
ToTensor (0..1) -> channels to BGR, x255 -> (x - mean) / std with the Detectron BGR
statistics; then `to_image_list` zero-pads the batch bottom/right to a multiple of 32 and keeps
the un-padded sizes for anchors and clipping.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import functional as F

# Detectron's BGR pixel statistics in 0..255 units (INPUT.PIXEL_MEAN / PIXEL_STD, TO_BGR255).
PIXEL_MEAN = (103.530, 116.280, 123.675)
PIXEL_STD = (57.375, 57.120, 58.395)


def resized_size(
    width: int, height: int, *, min_size: int | None = 800, max_size: int | None = 1333
) -> tuple[int, int]:
    """(new_w, new_h) of the official `Resize.get_size` rule.

    The short side becomes `min_size` unless the long side would then exceed `max_size`, in
    which case the short side becomes round(max_size * short / long) (Python rounding); the
    long side is truncated, int(S * long / short). An image whose short side already equals the
    target keeps its size. `min_size=None` means no resize; `max_size=None` no cap.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"resized_size: image size must be positive, got {width}x{height}")
    if min_size is None:
        return width, height
    size = min_size
    if max_size is not None:
        short, long = float(min(width, height)), float(max(width, height))
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    if (width <= height and width == size) or (height <= width and height == size):
        return width, height
    if width < height:
        return size, int(size * height / width)
    return int(size * width / height), size


def image_to_tensor(
    image: Image.Image,
    *,
    min_size: int | None = 800,
    max_size: int | None = 1333,
    pixel_mean: Sequence[float] = PIXEL_MEAN,
    pixel_std: Sequence[float] = PIXEL_STD,
) -> Tensor:
    """Normalised network input [3, h, w] float32 (BGR, x255, mean/std) from a PIL RGB image.

    Resizing uses torchvision `F.resize` on the PIL image (PIL bilinear), as the official
    transform; `min_size=None` skips it (the stored reference runs fed 480x640 directly).
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"image_to_tensor: expected a PIL image, got {type(image).__name__}")
    if image.mode != "RGB":
        raise ValueError(f"image_to_tensor: expected an RGB image, got mode {image.mode!r}")
    width, height = image.size
    new_width, new_height = resized_size(width, height, min_size=min_size, max_size=max_size)
    if (new_width, new_height) != (width, height):
        image = F.resize(image, [new_height, new_width])
    tensor = F.to_tensor(image)  # [3, h, w] RGB in 0..1
    tensor = tensor[[2, 1, 0]] * 255  # BGR in 0..255 (TO_BGR255)
    return F.normalize(tensor, mean=list(pixel_mean), std=list(pixel_std))


def batch_images(tensors: Sequence[Tensor], *, size_divisibility: int = 32) -> tuple[Tensor, list[tuple[int, int]]]:
    """Stack images [3, h_i, w_i] into [B, 3, H, W], zero-padded bottom/right.

    H and W are the largest h and w rounded up to a multiple of `size_divisibility` (0: no
    rounding). Returns the batch and the un-padded `image_sizes` as (h, w) per image.
    """
    if not tensors:
        raise ValueError("batch_images: no images")
    for index, tensor in enumerate(tensors):
        if tensor.dim() != 3 or tensor.shape[0] != 3:
            raise ValueError(f"batch_images: image {index} must be [3, h, w], got {tuple(tensor.shape)}")
    height = max(int(t.shape[1]) for t in tensors)
    width = max(int(t.shape[2]) for t in tensors)
    if size_divisibility > 0:
        height = int(math.ceil(height / size_divisibility) * size_divisibility)
        width = int(math.ceil(width / size_divisibility) * size_divisibility)
    batch = tensors[0].new_zeros((len(tensors), 3, height, width))
    for slot, tensor in zip(batch, tensors):
        slot[:, : tensor.shape[1], : tensor.shape[2]].copy_(tensor)
    return batch, [(int(t.shape[1]), int(t.shape[2])) for t in tensors]
