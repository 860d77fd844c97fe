"""Robust decoding of web images for the teacher: bytes -> an RGB PIL image, or a skip reason.

Web shards hold every kind of file. `decode_rgb` turns what can be used into the RGB image the
teacher sees, in the orientation a viewer shows (EXIF applied), and names what cannot:

| reason          | what                                                              |
| --------------- | ----------------------------------------------------------------- |
| `not_an_image`  | bytes PIL does not recognise (HTML error pages, text, empty)      |
| `truncated`     | a recognised image whose data ends early or is corrupt            |
| `too_small`     | a side below `min_side` pixels (tracking pixels, icons)           |
| `too_large`     | more than `max_pixels` pixels: a decompression bomb, never decoded |

Modes: grayscale (L, 1, I, I;16, F) is scaled to 8 bits and repeated over three channels,
CMYK and YCbCr are converted, palette and alpha images are composited on white (a transparent
background is white on the web pages they come from). The sizes in the pseudo-label JSON are
those of the returned image, i.e. after EXIF rotation, and the source bytes are kept unchanged.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MIN_SIDE = 8
MAX_PIXELS = 64_000_000  # 8000 x 8000; PIL's own bomb guard is per-process global state
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


class ImageDecodeError(ValueError):
    """An image that cannot be used; `reason` is one of the table's names."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # RGB
    width: int
    height: int


def decode_rgb(
    data: bytes, *, min_side: int = MIN_SIDE, max_pixels: int = MAX_PIXELS, annotated_size: tuple[int, int] | None = None
) -> DecodedImage:
    """Decode `data` into an RGB image; raises ImageDecodeError with a reason.

    The image is EXIF-transposed (what a viewer shows), unless `annotated_size` (width,
    height) names the size its boxes were drawn on: then the EXIF rotation is applied only
    when the raw pixels do not have that size and the rotated ones do (COCO annotates the raw
    pixels of its EXIF-rotated images; the pseudo-label stage records the rotated size).
    """
    image = _open_checked(data, min_side=min_side, max_pixels=max_pixels)
    orient = ImageOps.exif_transpose if annotated_size is None else _orient_to(annotated_size)
    rgb = _loaded(image, to_rgb, orient=orient)
    return DecodedImage(image=rgb, width=rgb.width, height=rgb.height)


def _orient_to(size: tuple[int, int]):
    def orient(image: Image.Image) -> Image.Image:
        if image.size == size:
            return image
        rotated = ImageOps.exif_transpose(image)
        return rotated if rotated.size == size else image

    return orient


def decode_gray_small(data: bytes, *, side: int, min_side: int = MIN_SIDE, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """`decode_rgb` in grayscale at a reduced size, for perceptual hashing: a JPEG is decoded
    by libjpeg at the smallest 1/2, 1/4 or 1/8 scale that still has both sides >= `side` (DCT
    scaling, PIL's `draft`), several times faster than a full decode; other formats decode
    fully. Same orientation (EXIF) and skip reasons as `decode_rgb`."""
    image = _open_checked(data, min_side=min_side, max_pixels=max_pixels)
    if image.format == "JPEG":
        image.draft("L", (side, side))
    return _loaded(image, lambda loaded: loaded if loaded.mode == "L" else to_rgb(loaded).convert("L"))


def _open_checked(data: bytes, *, min_side: int, max_pixels: int) -> Image.Image:
    """The opened (not yet decoded) image, its size checked; ImageDecodeError otherwise."""
    if not data:
        raise ImageDecodeError("not_an_image", "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        if isinstance(error, UnidentifiedImageError):
            raise ImageDecodeError("not_an_image", "not a recognised image format") from None
        raise ImageDecodeError("too_large", str(error)) from None
    except (OSError, ValueError, SyntaxError) as error:
        raise ImageDecodeError("truncated", f"{type(error).__name__}: {error}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageDecodeError("too_large", f"{width}x{height} exceeds {max_pixels} pixels")
    if min(width, height) < min_side:
        raise ImageDecodeError("too_small", f"{width}x{height} has a side below {min_side} pixels")
    return image


def _loaded(image: Image.Image, convert, *, orient=ImageOps.exif_transpose) -> Image.Image:
    """Decode `image`, `orient` it (default: its EXIF orientation), then `convert` it;
    corrupt data -> `truncated`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Palette images with Transparency": handled in to_rgb
            image.load()
            return convert(orient(image))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ImageDecodeError("truncated", f"{type(error).__name__}: {error}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB (high bit depths scaled to 8 bits, alpha composited on white)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") else max(float(values.max()), 1.0)
        if mode in ("I", "F") and values.max() <= 255:
            top = 255.0
        gray = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "P" or mode == "PA":
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
