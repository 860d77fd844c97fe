"""GLIP (Li et al., CVPR 2022) as the official `GeneralizedVLRCNN` with a VLDyHead RPN.

forward goes through the paper's stages in order: visual backbone (Swin + FPN), language
backbone (BERT), deep fusion + DyHead tower and the dot-product grounding head. Post-processing
is separate (`model.inference.postprocess`), composed by `model.inference.predict.GLIPPredictor`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from model.network.anchors import AnchorGenerator
from model.config import GLIPConfig
from model.network.dyhead import VLDyHead
from model.network.fpn import FPN
from model.network.language import LanguageBackbone
from model.network.mobilenet import MobileNetV2Body
from model.network.swin import SwinTransformer


@dataclass
class GLIPOutputs:
    """Raw outputs of one forward, per level P3..P7 (strides 8..128).

    features: [B, C, H, W] FPN maps; box_regression: [B, 4, H, W] deltas (dx, dy, dw, dh,
    weights 10, 10, 5, 5) after the per-level Scale; centerness: [B, 1, H, W] logits;
    dot_product_logits: [B, H*W, L] token logits clamped to +-50000; anchors: [H*W, 4] xyxy
    in the padded input frame; lang: the text features after the tower (hidden [B, L, D],
    masks [B, L]).
    """

    features: list[Tensor]
    box_regression: list[Tensor]
    centerness: list[Tensor]
    dot_product_logits: list[Tensor]
    anchors: list[Tensor]
    lang: dict[str, Tensor]


class VisionBackbone(nn.Module):
    def __init__(self, config: GLIPConfig) -> None:
        super().__init__()
        swin = config.swin
        if config.backbone == "mobilenet_v2":
            self.body = MobileNetV2Body()
        elif config.backbone == "swin":
            self.body = SwinTransformer(
                embed_dim=swin.embed_dim, depths=swin.depths, num_heads=swin.num_heads, window_size=swin.window_size,
                mlp_ratio=swin.mlp_ratio, drop_path_rate=swin.drop_path_rate, patch_size=swin.patch_size,
            )
        else:
            raise ValueError(f"unknown visual backbone {config.backbone!r}; expected swin or mobilenet_v2")
        self.fpn = FPN(
            in_channels=self.body.num_features[1:], channels=config.fpn_channels,
            drop_block_prob=config.drop_block.prob, drop_block_size=config.drop_block.size,
        )

    def forward(self, images: Tensor) -> list[Tensor]:
        return self.fpn(self.body(images))


class RPN(nn.Module):
    def __init__(self, config: GLIPConfig) -> None:
        super().__init__()
        self.head = VLDyHead(config)
        self.anchor_generator = AnchorGenerator(sizes=config.anchors.sizes, strides=config.anchors.strides)


class GLIP(nn.Module):
    """GLIP detector. `GLIP(get_config("glip-t"))`; state-dict keys equal the official ones."""

    def __init__(self, config: GLIPConfig) -> None:
        super().__init__()
        if config.fpn_channels != config.head.channels:
            raise ValueError(f"fpn_channels ({config.fpn_channels}) must equal head.channels ({config.head.channels})")
        self.config = config
        self.backbone = VisionBackbone(config)
        self.language_backbone = LanguageBackbone(config.language)
        self.rpn = RPN(config)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute activations in the backward pass (Swin-L at 1333 px does not fit
        otherwise): the Swin stages, BERT and the fusion modules of the DyHead tower."""
        self.backbone.body.set_gradient_checkpointing(enabled)
        self.language_backbone.set_gradient_checkpointing(enabled)
        self.rpn.head.set_gradient_checkpointing(enabled)

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> GLIPOutputs:
        """images: [B, 3, H, W] normalised (BGR x255, mean/std), zero-padded to a multiple of 32;
        input_ids, attention_mask: [B, L] int64."""
        features = self.backbone(images)  # P3..P7
        lang = self.language_backbone(input_ids, attention_mask)
        head = self.rpn.head(features, lang)
        anchors = self.rpn.anchor_generator([f.shape[-2:] for f in features])
        return GLIPOutputs(
            features=features,
            box_regression=head["box_regression"],
            centerness=head["centerness"],
            dot_product_logits=head["dot_product_logits"],
            anchors=anchors,
            lang=head["lang"],
        )
