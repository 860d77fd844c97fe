"""Near-duplicates of evaluation images among web images, by perceptual hashes (imagehash).

Two 64-bit hashes per image, both from the `imagehash` library on the grayscale image:
`phash` (the signs of the 8x8 lowest DCT frequencies of a 32x32 thumbnail against their
median) and `dhash` (the signs of horizontal gradients of a 9x8 thumbnail). Both survive
resizing and JPEG recompression almost unchanged (a few bits); they fail differently, so a
match needs both: a web image matches an evaluation image when the Hamming distances of both
hashes to one of its variants are at most `max_distance`.

Crops and flips move every pixel, so they are handled by hashing variants of each evaluation
image (there are few of them, web images are many, and each is hashed once): the image, its
9 crops to 90% of the width and height at offsets 0, 5 and 10% in x and y, and the mirror
image of each of these 10, so a web copy cropped by up to 10% at any position is within 2.5%
of a variant. Images are decoded by `images.decode_gray_small` (JPEG DCT scaling to >= 64
px, e.g. 160x107 for a 640x427 COCO image): the hashes use 32x32 and 9x8 thumbnails, so
full-size pixels add nothing but time (bench/decontaminate.py: hashing this way runs at
about the speed of a full decode alone; from a full decode it takes twice to three times as long).

On 40 coco_mini images (tests/test_decontaminate.py) resized, recompressed, 10%-cropped and
flipped copies land at most 12 bits from a variant on both hashes, and 640 other real images
at least 16 bits: `DEFAULT_MAX_DISTANCE` is 14.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
from PIL import Image, ImageOps

HASHES = ("phash", "dhash")
DEFAULT_MAX_DISTANCE = 14
DECODE_SIDE = 64
CROP_SIZE = 0.9
CROP_OFFSETS = (0.0, 0.05, 0.1)


def image_hashes(gray: Image.Image) -> np.ndarray:
    """uint64 [2]: pHash and dHash of a grayscale image (imagehash, 64 bits each)."""
    import imagehash

    return np.asarray([_as_int(imagehash.phash(gray)), _as_int(imagehash.dhash(gray))], dtype=np.uint64)


def _as_int(value) -> int:
    """An `imagehash.ImageHash` (8x8 bools, row-major) as the 64-bit int of its hex form."""
    return int.from_bytes(np.packbits(value.hash.flatten()).tobytes(), "big")


def variants(gray: Image.Image) -> list[tuple[str, Image.Image]]:
    """(label, image) of the variants an evaluation image is hashed as (see the module doc)."""
    width, height = gray.size
    crop_w, crop_h = round(width * CROP_SIZE), round(height * CROP_SIZE)
    found = [("full", gray)]
    for fx in CROP_OFFSETS:
        for fy in CROP_OFFSETS:
            x, y = round(width * fx), round(height * fy)
            found.append((f"crop{int(fx * 100):02d}x{int(fy * 100):02d}", gray.crop((x, y, x + crop_w, y + crop_h))))
    return found + [(f"{label}+flip", ImageOps.mirror(image)) for label, image in found]


@dataclass(frozen=True)
class EvalHashes:
    """The hashes of every variant of every evaluation image; broadcast to the hashing actors."""

    names: list[str]  # evaluation image names (file path, or "shard:key")
    image: np.ndarray  # int32 [M]: index into `names` of each variant
    variant: list[str]  # [M] variant labels
    hashes: np.ndarray  # uint64 [M, 2]


def eval_hashes(images: Iterable[tuple[str, Image.Image]]) -> EvalHashes:
    """Hash every variant of every (name, grayscale image)."""
    names: list[str] = []
    index: list[int] = []
    labels: list[str] = []
    rows: list[np.ndarray] = []
    for name, gray in images:
        names.append(name)
        for label, image in variants(gray):
            index.append(len(names) - 1)
            labels.append(label)
            rows.append(image_hashes(image))
    hashes = np.stack(rows) if rows else np.zeros((0, len(HASHES)), dtype=np.uint64)
    return EvalHashes(names=names, image=np.asarray(index, dtype=np.int32), variant=labels, hashes=hashes)


@dataclass(frozen=True)
class Match:
    eval_image: str
    eval_variant: str
    distances: tuple[int, int]  # pHash, dHash Hamming distances


def nearest_match(hashes: np.ndarray, index: EvalHashes, *, max_distance: int) -> Match | None:
    """The closest variant (smallest distance sum) within `max_distance` on both hashes, or None."""
    if not len(index.hashes):
        return None
    distances = np.bitwise_count(index.hashes ^ hashes[None, :]).astype(np.int32)  # [M, 2]
    within = (distances <= max_distance).all(axis=1)
    if not within.any():
        return None
    candidates = np.flatnonzero(within)
    best = int(candidates[distances[candidates].sum(axis=1).argmin()])
    return Match(
        eval_image=index.names[int(index.image[best])], eval_variant=index.variant[best],
        distances=(int(distances[best, 0]), int(distances[best, 1])),
    )
