"""DropBlock as the official FPN applies it (MODEL.FPN.DROP_BLOCK, `layers/dropblock.py`)."""

from __future__ import annotations

import torch

from model.config import get_config
from model.network.fpn import FPN, DropBlock


def expected_kept_fraction(height: int, width: int, prob: float, size: int = 3) -> float:
    """Official semantics: centres at every position with rate prob / size^2; a position is kept
    when no centre lies in its size x size window clipped by the map (fewer at the border)."""
    gamma = prob / size**2
    half = size // 2

    def reach(n: int, i: int) -> int:  # rows (columns) of the clipped window around i
        return min(i + half, n - 1) - max(i - half, 0) + 1

    total = sum((1 - gamma) ** (reach(height, y) * reach(width, x)) for y in range(height) for x in range(width))
    return total / (height * width)


def test_dropblock_keeps_the_official_fraction_with_one_mask_per_image():
    torch.manual_seed(0)
    block = DropBlock(prob=0.3, size=3).train()
    x = torch.ones((64, 4, 40, 50))
    out = block(x)
    kept = out != 0
    # The same spatial mask for every channel of an image.
    assert torch.equal(kept, kept[:, :1].expand_as(kept))
    fraction = kept[:, 0].float().mean().item()
    expected = expected_kept_fraction(40, 50, 0.3)
    # 0.3 / 9 per position over a 3x3 window: 26% dropped inside the map, not 30% (no
    # correction as in torchvision's DropBlock2d, whose masks are per channel).
    assert abs(fraction - expected) < 0.01, (fraction, expected)
    assert 0.73 < expected < 0.76
    # Kept activations are scaled by mask size / kept count over the batch: the mean survives.
    scale = kept[:, 0].numel() / kept[:, 0].sum()
    assert torch.allclose(out[kept], torch.full_like(out[kept], float(scale)))
    assert abs(out.mean().item() - 1.0) < 1e-5


def test_dropblock_drops_whole_squares():
    torch.manual_seed(1)
    out = DropBlock(prob=0.05, size=3).train()(torch.ones((1, 1, 30, 30)))
    dropped = (out[0, 0] == 0).float()
    # Every dropped pixel belongs to a dropped 3x3 square (clipped at the border): eroding
    # the dropped set with a 3x3 window and dilating it back gives it again.
    padded = torch.nn.functional.pad(dropped[None, None], (1, 1, 1, 1), value=1.0)
    eroded = -torch.nn.functional.max_pool2d(-padded, 3, stride=1)  # border counts as dropped
    reopened = torch.nn.functional.max_pool2d(eroded, 3, stride=1, padding=1)[0, 0]
    assert dropped.sum() > 0 and torch.equal(reopened, dropped)


def test_dropblock_is_identity_in_eval_and_at_zero():
    x = torch.randn(2, 3, 9, 11)
    assert DropBlock(prob=0.3, size=3).eval()(x) is x
    assert DropBlock(prob=0.0, size=3).train()(x) is x


def test_fpn_drops_blocks_before_the_p3_and_p4_convs_in_training_only():
    torch.manual_seed(0)
    fpn = FPN(in_channels=(8, 16, 32), channels=16, drop_block_prob=0.3, drop_block_size=3)
    plain = FPN(in_channels=(8, 16, 32), channels=16)
    plain.load_state_dict(fpn.state_dict())  # DropBlock has no parameters: same keys
    stages = [torch.randn(2, 4, 64, 64), torch.randn(2, 8, 32, 32), torch.randn(2, 16, 16, 16), torch.randn(2, 32, 8, 8)]
    with torch.no_grad():
        reference = plain.eval()(stages)
        evaluated = fpn.eval()(stages)
        trained = fpn.train()(stages)
    assert all(torch.equal(a, b) for a, b in zip(evaluated, reference))
    # P3 and P4 come from masked merged maps; P5 (no merge) and P6/P7 (from P5) never do.
    assert not torch.equal(trained[0], reference[0]) and not torch.equal(trained[1], reference[1])
    assert all(torch.equal(trained[i], reference[i]) for i in (2, 3, 4))


def test_glip_variants_train_with_dropblock_and_the_tiny_ones_without():
    for name in ("glip-t-a", "glip-t", "glip-l"):
        block = get_config(name).drop_block
        assert (block.prob, block.size) == (0.3, 3), name
    for name in ("tiny", "tiny-cpu", "tiny-mnv2", "tiny-mnv2-a"):
        assert get_config(name).drop_block.prob == 0.0, name
