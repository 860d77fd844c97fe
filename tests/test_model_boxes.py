"""Anchors and the ATSS box coder against the official reference and the legacy conventions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model.network.anchors import AnchorGenerator
from model.network.box_coder import BoxCoder

REFERENCE_LEVELS = [(60, 80), (30, 40), (15, 20), (8, 10), (4, 5)]  # P3..P7 of a 480x640 input


@pytest.fixture(scope="module")
def reference(reference_dir):
    return np.load(reference_dir / "glip_t_c_reference.npz")


def test_cell_anchors_equal_reference_and_spec(reference):
    generator = AnchorGenerator()
    cells = torch.stack([generator.cell_anchors[k] for k in range(5)]).numpy()
    assert cells.dtype == np.float32
    np.testing.assert_array_equal(cells, reference["anchors_cell"])
    spec = [[-28, -28, 35, 35], [-56, -56, 71, 71], [-112, -112, 143, 143], [-224, -224, 287, 287]]
    spec.append([-448, -448, 575, 575])
    np.testing.assert_array_equal(cells[:, 0], np.array(spec, dtype=np.float32))


def test_cell_anchors_are_persistent_state_dict_buffers():
    generator = AnchorGenerator()
    state = generator.state_dict()
    assert list(state) == [f"cell_anchors.{k}" for k in range(5)]
    assert all(tensor.shape == (1, 4) and tensor.dtype == torch.float32 for tensor in state.values())
    holder = torch.nn.Module()
    holder.anchor_generator = generator
    assert "anchor_generator.cell_anchors.3" in holder.state_dict()


def test_grid_anchors_are_row_major_shifts_of_the_cell():
    anchors = AnchorGenerator()(REFERENCE_LEVELS)
    assert [a.shape for a in anchors] == [(h * w, 4) for h, w in REFERENCE_LEVELS]
    p3 = anchors[0]
    # anchor y * W + x is the cell shifted by (8x, 8y): y outer, x inner.
    np.testing.assert_array_equal(p3[0].numpy(), [-28, -28, 35, 35])
    np.testing.assert_array_equal(p3[1].numpy(), [-20, -28, 43, 35])
    np.testing.assert_array_equal(p3[80].numpy(), [-28, -20, 35, 43])
    np.testing.assert_array_equal(p3[80 * 59 + 79].numpy(), [79 * 8 - 28, 59 * 8 - 28, 79 * 8 + 35, 59 * 8 + 35])
    p7 = anchors[4]
    np.testing.assert_array_equal(p7[5 * 3 + 4].numpy(), [4 * 128 - 448, 3 * 128 - 448, 4 * 128 + 575, 3 * 128 + 575])


def test_anchors_follow_the_buffers_device_and_reject_wrong_level_count():
    generator = AnchorGenerator().to(torch.float64)  # buffers move; grids stay float32
    anchors = generator([(2, 3)] * 5)
    assert all(a.dtype == torch.float32 and a.device == generator.cell_anchors[0].device for a in anchors)
    with pytest.raises(ValueError, match="expected 5"):
        generator([(2, 3)] * 4)
    with pytest.raises(ValueError, match="sizes"):
        AnchorGenerator(sizes=(32, 64), strides=(8,))


def test_decode_matches_legacy_plus_one_formulas():
    coder = BoxCoder()
    anchors = torch.tensor([[-28.0, -28.0, 35.0, 35.0], [10.0, 20.0, 29.0, 59.0]])
    # zero deltas return the anchor itself ("+1" widths, centre (x1+x2)/2)
    np.testing.assert_array_equal(coder.decode(torch.zeros(2, 4), anchors).numpy(), anchors.numpy())
    deltas = torch.tensor([[10.0, -5.0, 5.0 * math.log(2.0), 0.0]])
    box = coder.decode(deltas, anchors[:1])[0]
    # w = h = 64, centre 3.5: dx=1 -> centre x 67.5, dy=-0.5 -> centre y -28.5, width 128
    np.testing.assert_allclose(box.numpy(), [67.5 - 63.5, -28.5 - 31.5, 67.5 + 63.5, -28.5 + 31.5], rtol=0, atol=1e-4)


def test_encode_decode_round_trip():
    generator = torch.Generator().manual_seed(0)
    anchors = AnchorGenerator()(REFERENCE_LEVELS)[1]
    x1y1 = torch.rand(anchors.shape[0], 2, generator=generator) * 600
    wh = torch.rand(anchors.shape[0], 2, generator=generator) * 300 + 2
    boxes = torch.cat([x1y1, x1y1 + wh], dim=1)
    coder = BoxCoder()
    deltas = coder.encode(boxes, anchors)
    np.testing.assert_allclose(coder.decode(deltas, anchors).numpy(), boxes.numpy(), rtol=0, atol=2e-3)
    np.testing.assert_allclose(coder.encode(anchors, anchors).numpy(), 0.0, atol=0)


def test_decode_clips_log_size_deltas():
    coder = BoxCoder()
    anchor = torch.tensor([[0.0, 0.0, 15.0, 15.0]])  # 16 x 16
    huge = coder.decode(torch.tensor([[0.0, 0.0, 1e4, 1e4]]), anchor)[0]
    # exp(min(dw / 5, log(1000/16))) * 16 = 1000 wide at most
    width = float(huge[2] - huge[0] + 1)
    assert math.isfinite(width) and width == pytest.approx(1000.0, rel=1e-5)
    # the clip is one-sided: shrinking is never clipped
    small = coder.decode(torch.tensor([[0.0, 0.0, -50.0, -50.0]]), anchor)[0]
    assert float(small[2] - small[0] + 1) == pytest.approx(16 * math.exp(-10), rel=1e-2)


def test_box_coder_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        BoxCoder().decode(torch.zeros(3, 5), torch.zeros(3, 4))
