"""Test transform: the official resize rule, BGR x255 normalisation, and padding to 32."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from model.inputs.preprocess import PIXEL_MEAN, PIXEL_STD, batch_images, image_to_tensor, resized_size


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((640, 480), (1066, 800)),  # long side truncated: 800 * 640 / 480 = 1066.67
        ((480, 640), (800, 1066)),
        ((500, 500), (800, 800)),
        ((32, 24), (1066, 800)),  # small images are upscaled
        ((1000, 800), (1000, 800)),  # short side already 800: unchanged
        ((800, 800), (800, 800)),
        ((1920, 1080), (1333, 750)),  # max_size binds: short = round(1333 * 1080 / 1920) = 750
        ((2000, 100), (1340, 67)),  # very wide: short 67, long int(67 * 20) can pass 1333
        ((100, 2000), (67, 1340)),  # very tall
        ((2666, 5), (1066, 2)),  # round(2.5) = 2: Python's round-half-even, as the original
    ],
)
def test_resized_size_follows_the_official_rule(size, expected):
    assert resized_size(*size, min_size=800, max_size=1333) == expected


def test_resized_size_without_resize_or_cap():
    assert resized_size(640, 480, min_size=None) == (640, 480)
    assert resized_size(2000, 100, min_size=800, max_size=None) == (16000, 800)
    assert resized_size(640, 480, min_size=480, max_size=1333) == (640, 480)
    with pytest.raises(ValueError, match="positive"):
        resized_size(0, 10)


def test_reference_input_tensor_matches_the_stored_run(reference_dir):
    reference = np.load(reference_dir / "glip_t_c_reference.npz")
    image = Image.open(reference_dir / "input_480x640_rgb.png").convert("RGB")
    np.testing.assert_array_equal(np.asarray(image)[:, :, ::-1], reference["image_bgr_uint8"])
    tensor = image_to_tensor(image, min_size=None, max_size=None)
    assert tensor.shape == (3, 480, 640) and tensor.dtype == torch.float32
    np.testing.assert_array_equal(tensor[:, ::16, ::16].numpy(), reference["image_tensor_sample"])


def test_resize_uses_pil_bilinear_then_bgr255_normalisation(reference_dir):
    image = Image.open(reference_dir / "input_480x640_rgb.png").convert("RGB")
    tensor = image_to_tensor(image, min_size=800, max_size=1333)
    assert tensor.shape == (3, 800, 1066)
    resized = np.asarray(image.resize((1066, 800), Image.BILINEAR), dtype=np.float32)  # [h, w, RGB]
    bgr = resized[:, :, ::-1].transpose(2, 0, 1)
    expected = (bgr - np.array(PIXEL_MEAN, dtype=np.float32)[:, None, None]) / np.array(PIXEL_STD, dtype=np.float32)[
        :, None, None
    ]
    np.testing.assert_allclose(tensor.numpy(), expected, rtol=0, atol=1e-4)


def test_image_to_tensor_rejects_non_rgb():
    with pytest.raises(ValueError, match="mode 'L'"):
        image_to_tensor(Image.new("L", (8, 8)))
    with pytest.raises(TypeError, match="PIL image"):
        image_to_tensor(np.zeros((8, 8, 3), dtype=np.uint8))


def test_batch_images_pads_bottom_right_to_32():
    first = torch.randn(3, 100, 150)
    second = torch.randn(3, 90, 170)
    batch, sizes = batch_images([first, second], size_divisibility=32)
    assert batch.shape == (2, 3, 128, 192)
    assert sizes == [(100, 150), (90, 170)]
    assert torch.equal(batch[0, :, :100, :150], first) and torch.equal(batch[1, :, :90, :170], second)
    assert batch[0, :, 100:].abs().sum() == 0 and batch[0, :, :, 150:].abs().sum() == 0
    assert batch[1, :, 90:].abs().sum() == 0 and batch[1, :, :, 170:].abs().sum() == 0


def test_batch_images_edge_cases():
    exact = torch.ones(3, 480, 640)
    batch, sizes = batch_images([exact])
    assert batch.shape == (1, 3, 480, 640) and sizes == [(480, 640)] and torch.equal(batch[0], exact)
    batch, sizes = batch_images([torch.ones(3, 5, 7), torch.ones(3, 6, 4)], size_divisibility=0)
    assert batch.shape == (2, 3, 6, 7) and sizes == [(5, 7), (6, 4)]
    with pytest.raises(ValueError, match=r"image 1 must be \[3, h, w\]"):
        batch_images([torch.ones(3, 4, 4), torch.ones(4, 4)])
    with pytest.raises(ValueError, match="no images"):
        batch_images([])
