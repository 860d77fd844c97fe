"""Robust image decoding: every odd or broken kind a web shard holds, on real COCO pixels."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.io.images import ImageDecodeError, decode_rgb
from tests.pseudo_fixtures import coco_samples, odd_images


@pytest.fixture(scope="module")
def odd(shared_data):
    return odd_images(coco_samples(shared_data, 1)[0][1])


@pytest.mark.parametrize("name", ["cmyk", "gray", "gray16", "alpha", "palette", "exif_rotated"])
def test_usable_kinds_become_rgb(odd, name):
    decoded = decode_rgb(odd[name][1])
    assert decoded.image.mode == "RGB"
    expected = (120, 160) if name == "exif_rotated" else (160, 120)
    assert decoded.image.size == (decoded.width, decoded.height) == expected


def test_pixel_values_survive_conversion(odd):
    gray16 = np.asarray(decode_rgb(odd["gray16"][1]).image)
    assert gray16[0, 0, 0] == 0 and gray16[-1, -1, 0] == 255  # 16-bit ramp scaled to 8 bits
    alpha = np.asarray(decode_rgb(odd["alpha"][1]).image).astype(int)
    # Half-transparent pixels over white come out lighter than the opaque source.
    opaque = np.asarray(decode_rgb(odd["cmyk"][1]).image).astype(int)
    assert alpha.mean() > opaque.mean() + 30


@pytest.mark.parametrize(
    "name, reason", [("truncated", "truncated"), ("not_an_image", "not_an_image"), ("tiny", "too_small"), ("bomb", "too_large")]
)
def test_broken_kinds_name_their_reason(odd, name, reason):
    with pytest.raises(ImageDecodeError) as raised:
        decode_rgb(odd[name][1])
    assert raised.value.reason == reason and str(raised.value).startswith(reason)


def test_empty_bytes():
    with pytest.raises(ImageDecodeError, match="not_an_image"):
        decode_rgb(b"")
