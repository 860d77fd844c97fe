"""Training parity with the official GLIP code and the regulariser settings.

Loss only: the official T(C) and T(A) training references' stored head outputs go through our
`GLIPLoss` (shared/reference/glip/README.md, "Training-loss references"): the ATSS assignment
and token targets must match on every anchor, each loss term to 1e-6 relative and the gradients
w.r.t. the head outputs to 1e-5 of their max. The whole network in training mode is checked by
`bench/train_parity.py` / `pipeline check-parity` (minutes per variant on a CPU: not in CI).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from model.config import OFF, Regularisers, get_config, with_regularisers, without_regularisers
from model.network.fpn import DropBlock
from model.network.fusion import BertEncoderLayer, BiMultiHeadAttention
from model.network.glip import GLIP
from model.weights.parity import loss_comparisons
from model.network.swin import DropPath


def _train_reference(reference_dir, name: str):
    npz = np.load(reference_dir / f"glip_{name}_train_reference.npz")
    summary = json.loads((reference_dir / f"glip_{name}_train_reference_summary.json").read_text())
    return npz, summary


@pytest.mark.parametrize("name", ["t_c", "t_a"])
def test_loss_matches_official_training_reference(reference_dir, name):
    npz, summary = _train_reference(reference_dir, name)
    found = {c.name: c.difference for c in loss_comparisons(npz, summary)}
    print(
        f"\nGLIP-{name.upper()} loss only: " + ", ".join(f"{k} {v:.1e}" for k, v in found.items() if not k.startswith("grad"))
        + f", head-output gradients max {max(v for k, v in found.items() if k.startswith('grad')):.1e}"
    )
    assert found.pop("atss_assigned_gt") == 0 and found.pop("token_targets") == 0  # mismatching anchors
    terms = {k: found.pop(k) for k in ("loss_reg", "loss_centerness", "loss_dot_product_token", "total_loss")}
    assert max(terms.values()) <= 1e-6, terms
    assert len(found) == 15 and max(found.values()) <= 1e-5, found


def regularisers_of(model: nn.Module) -> dict[str, set[float]]:
    """Every stochastic module of a built GLIP by kind, as the probabilities it will use."""
    kinds: dict[str, set[float]] = {"drop_path": set(), "text": set(), "fusion": set(), "drop_block": set()}
    for name, module in model.named_modules():
        if isinstance(module, DropPath):
            kinds["drop_path"].add(round(module.drop_prob, 6))
        elif isinstance(module, nn.Dropout):
            assert name.startswith("language_backbone."), f"unexpected dropout {name}"
            kinds["text"].add(module.p)
        elif isinstance(module, BertEncoderLayer):
            layer = module
            kinds["text"] |= {layer.attention.self.dropout, layer.attention.output.dropout, layer.output.dropout}
        elif isinstance(module, BiMultiHeadAttention):
            kinds["fusion"].add(module.dropout)
        elif isinstance(module, DropBlock):
            kinds["drop_block"].add(module.prob)
    return kinds


@pytest.mark.parametrize(
    ("variant", "drop_path", "fusion"),
    # Official: MODEL.SWINT.DROP_PATH_RATE 0.2 (defaults.py), 0.4 (glip_Swin_L.yaml); VLFuse's
    # hard-coded 0.1; BERT's 0.1 (bert-base-uncased); MODEL.FPN.DROP_BLOCK on, DROP_PROB 0.3.
    [("glip-t-a", 0.2, set()), ("glip-t", 0.2, {0.1}), ("glip-l", 0.4, {0.1})],
)
def test_official_variants_build_the_official_regularisers(variant, drop_path, fusion):
    with torch.device("meta"):
        found = regularisers_of(GLIP(get_config(variant)))
        off = regularisers_of(GLIP(without_regularisers(get_config(variant))))
    assert max(found["drop_path"]) == drop_path and min(found["drop_path"]) == 0.0  # linear over the blocks
    assert found["text"] == {0.1} and found["fusion"] == fusion and found["drop_block"] == {0.3}
    assert off == {"drop_path": {0.0}, "text": {0.0}, "fusion": {0.0} if fusion else set(), "drop_block": {0.0}}


def test_one_regulariser_set_keeps_the_others():
    config = with_regularisers(get_config("glip-t"), Regularisers(fusion_dropout=0.25))
    assert config.head.fusion_dropout == 0.25
    assert (config.swin.drop_path_rate, config.language.hidden_dropout, config.drop_block.prob) == (0.2, 0.1, 0.3)
    with pytest.raises(ValueError, match="drop_block must be in"):
        Regularisers(drop_block=1.5)


def test_without_regularisers_training_computes_what_eval_does():
    # Tiny Swin variant (LayerNorm/GroupNorm only, a 2-layer BERT over a small vocabulary) with
    # drop path, DropBlock and the text and fusion dropouts on.
    tiny = get_config("tiny")
    tiny = dataclasses.replace(tiny, language=dataclasses.replace(tiny.language, num_hidden_layers=2, vocab_size=2000))
    config = with_regularisers(tiny, Regularisers(drop_path=0.3, drop_block=0.3))
    torch.manual_seed(0)
    images, ids = torch.randn(1, 3, 64, 96), torch.randint(1000, 2000, (1, 12))
    mask = torch.ones_like(ids)
    regularised = GLIP(config)
    plain = GLIP(with_regularisers(config, OFF))
    plain.load_state_dict(regularised.state_dict())  # no regulariser owns a weight
    with torch.no_grad():
        expected = plain.eval()(images, ids, mask).dot_product_logits[0]
        assert torch.equal(plain.train()(images, ids, mask).dot_product_logits[0], expected)
        assert not torch.equal(regularised.train()(images, ids, mask).dot_product_logits[0], expected)
        assert torch.equal(regularised.eval()(images, ids, mask).dot_product_logits[0], expected)


def test_check_parity_refuses_a_checkpoint_of_another_variant(reference_dir, tmp_path):
    from typer.testing import CliRunner

    from model.weights.checkpoint import save_glip
    from pipeline.cli import app

    tiny = tmp_path / "tiny.pth"
    save_glip(GLIP(get_config("tiny-mnv2-a")), tiny)
    reference = reference_dir / "glip_t_a_train_reference.npz"
    result = CliRunner().invoke(app, ["check-parity", str(reference), "--checkpoint", str(tiny)])
    assert result.exit_code == 2, result.output
    assert "the model's parameters are not the reference's" in result.output
    missing = CliRunner().invoke(app, ["check-parity", str(tmp_path / "none.npz"), "--checkpoint", str(tiny)])
    assert missing.exit_code == 2 and "reference file not found" in missing.output


def test_train_student_regulariser_settings_build_the_student():
    from pipeline.train.config import StudentModel, TrainConfig
    from pipeline.train.loop import build_student

    off = regularisers_of(build_student(StudentModel(variant="tiny", regularisers="off"), seed=0))
    assert off == {"drop_path": {0.0}, "text": {0.0}, "fusion": {0.0}, "drop_block": {0.0}}
    one = regularisers_of(build_student(StudentModel(variant="tiny", drop_block=0.2, fusion_dropout=0.0), seed=0))
    assert one["drop_block"] == {0.2} and one["fusion"] == {0.0} and one["text"] == {0.1}
    # --regularisers off with one kind back on.
    assert StudentModel(regularisers="off", drop_path=0.1).regulariser_settings() == Regularisers(
        drop_path=0.1, text_dropout=0.0, fusion_dropout=0.0, drop_block=0.0
    )
    with pytest.raises(ValueError, match="--regularisers 'none'"):
        StudentModel(regularisers="none")
    with pytest.raises(ValueError, match="drop_block must be in"):
        StudentModel(drop_block=1.0)
    # A run written before these settings existed still reads (and resumes) with the variant's.
    saved = TrainConfig(out="run", steps=3).to_dict()
    for key in ("regularisers", "drop_path", "text_dropout", "fusion_dropout", "drop_block"):
        del saved["model"][key]
    assert TrainConfig.from_dict(saved).model.regulariser_settings() == Regularisers()


def test_reference_image_formula_is_the_stored_image(reference_dir):
    # The training references hold no image: they use the README's formula, as the forward ones.
    from model.weights.parity import reference_bgr

    stored = np.load(reference_dir / "glip_t_c_reference.npz")["image_bgr_uint8"]
    assert np.array_equal(reference_bgr(), stored)
