"""GLIP's VLDyHead: the fusion + DyHead tower and the dot-product grounding head (SPEC 1.4).

Tower (`dyhead_tower`, an nn.Sequential over a dict {"visual": [P3..P7], "lang": {...}}):
per step, [VLFuse, BertEncoderLayer] when deep fusion is on, then DyConv. Prediction layers are
shared across levels with one anchor per location.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import deform_conv2d

from model.config import GLIPConfig
from model.network.fusion import CLAMP, BertEncoderLayer, VLFuse


def h_sigmoid(x: Tensor) -> Tensor:
    return F.relu6(x + 3.0) / 6.0


class ModulatedDeformConv(nn.Module):
    """DCNv2 3x3 conv through torchvision (`layers/deform_conv.py` ModulatedDeformConv)."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        bound = 1.0 / math.sqrt(in_channels * 9)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor) -> Tensor:
        height = (x.shape[2] + 2 - 3) // self.stride + 1
        width = (x.shape[3] + 2 - 3) // self.stride + 1
        if offset.shape[-2:] != (height, width):
            # The official CUDA kernel does not check shapes: it reads each image's first
            # 18*H'*W' offsets (9*H'*W' mask values) of the contiguous per-image block as if
            # shaped [18, H', W'] at the OUTPUT size. DyConv relies on this when it reuses a
            # finer level's offsets for the coarser level's branch; reproduce it exactly.
            b = x.shape[0]
            offset = offset.reshape(b, -1)[:, : 18 * height * width].reshape(b, 18, height, width)
            mask = mask.reshape(b, -1)[:, : 9 * height * width].reshape(b, 9, height, width)
        return deform_conv2d(x, offset, self.weight, self.bias, stride=self.stride, padding=1, mask=mask)


class Conv3x3Norm(nn.Module):
    """3x3 conv + GroupNorm: modulated deformable (the official models) or a plain conv
    (`MODEL.DYHEAD.USE_DFCONV: False`; same state-dict keys)."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: int, groups: int, deformable: bool = True) -> None:
        super().__init__()
        if deformable:
            self.conv = ModulatedDeformConv(in_channels, out_channels, stride=stride)
        else:
            self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1)
        self.deformable = deformable
        self.bn = nn.GroupNorm(groups, out_channels)

    def forward(self, x: Tensor, offset: Tensor | None, mask: Tensor | None) -> Tensor:
        return self.bn(self.conv(x, offset, mask) if self.deformable else self.conv(x))


class DYReLU(nn.Module):
    """Dynamic ReLU-B (K=2, with bias): out = max(x*a1 + b1, x*a2 + b2), coefficients from GAP."""

    def __init__(self, channels: int, *, reduction: int = 4) -> None:
        super().__init__()
        self.channels = channels
        self.fc = nn.Sequential(
            nn.Linear(channels, channels // reduction), nn.ReLU(inplace=True), nn.Linear(channels // reduction, channels * 4)
        )

    def forward(self, x: Tensor) -> Tensor:
        coeffs = h_sigmoid(self.fc(x.mean(dim=(2, 3))))[:, :, None, None]  # [B, 4C, 1, 1]
        a1, b1, a2, b2 = torch.split(coeffs, self.channels, dim=1)
        # lambda_a = 2, init_a = (1, 0), init_b = (0, 0) of the official DYReLU.
        a1 = (a1 - 0.5) * 2.0 + 1.0
        a2 = (a2 - 0.5) * 2.0
        return torch.maximum(x * a1 + (b1 - 0.5), x * a2 + (b2 - 0.5))


class DyConv(nn.Module):
    """Scale-aware DyHead step over the five levels with (deformable) convs and DyReLU."""

    def __init__(self, channels: int, *, groups: int, deformable: bool = True) -> None:
        super().__init__()
        self.DyConv = nn.ModuleList(
            [Conv3x3Norm(channels, channels, stride=s, groups=groups, deformable=deformable) for s in (1, 1, 2)]
        )
        self.AttnConv = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, 1, kernel_size=1), nn.ReLU(inplace=True))
        self.relu = DYReLU(channels)
        # Offsets and modulation masks of the deformable convs, shared by the three branches.
        self.offset = nn.Conv2d(channels, 27, kernel_size=3, padding=1) if deformable else None
        nn.init.normal_(self.AttnConv[1].weight, std=0.01)
        nn.init.zeros_(self.AttnConv[1].bias)

    def forward(self, inputs: dict) -> dict:
        visual = inputs["visual"]
        out = []
        for level, feature in enumerate(visual):
            offset = mask = None
            if self.offset is not None:
                offset_mask = self.offset(feature)
                offset, mask = offset_mask[:, :18], offset_mask[:, 18:].sigmoid()
            branches = [self.DyConv[1](feature, offset, mask)]
            if level > 0:
                branches.append(self.DyConv[2](visual[level - 1], offset, mask))
            if level < len(visual) - 1:
                coarser = self.DyConv[0](visual[level + 1], offset, mask)
                # F.upsample_bilinear == interpolate(bilinear, align_corners=True).
                branches.append(F.interpolate(coarser, size=feature.shape[-2:], mode="bilinear", align_corners=True))
            stacked = torch.stack(branches)  # [n_branches, B, C, H, W]
            attention = h_sigmoid(torch.stack([self.AttnConv(b) for b in branches]))  # [n, B, 1, 1, 1]
            out.append(self.relu((stacked * attention).mean(dim=0)))
        return {"visual": out, "lang": inputs["lang"]}


class Scale(nn.Module):
    def __init__(self, init_value: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([init_value]))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class VLDyHead(nn.Module):
    """forward(P3..P7 maps, lang dict) -> dict of per-level raw outputs:
    box_regression [B,4,H,W] (after Scale), centerness [B,1,H,W], cls_logits [B,80,H,W],
    dot_product_logits [B, H*W, L] (clamped to +-50000), plus the final "lang" dict."""

    def __init__(self, config: GLIPConfig) -> None:
        super().__init__()
        head = config.head
        channels, lang_dim = head.channels, config.language.hidden_size
        self.early_fuse = head.early_fuse
        tower: list[nn.Module] = []
        for _ in range(head.num_convs):
            if head.early_fuse:
                tower.append(VLFuse(v_dim=channels, l_dim=lang_dim, embed_dim=head.fusion_embed_dim,
                                    num_heads=head.fusion_heads, num_convs=head.num_convs, dropout=head.fusion_dropout))
                tower.append(BertEncoderLayer(hidden=lang_dim, heads=config.language.num_attention_heads,
                                              intermediate=config.language.intermediate_size,
                                              eps=config.language.layer_norm_eps,
                                              hidden_dropout=config.language.hidden_dropout,
                                              attention_dropout=config.language.attention_dropout))
            tower.append(DyConv(channels, groups=head.group_norm_groups, deformable=head.deformable))
        self.dyhead_tower = nn.Sequential(*tower)

        bias_value = -math.log((1 - head.prior_prob) / head.prior_prob)
        self.cls_logits = nn.Conv2d(channels, head.num_classes - 1, kernel_size=1)
        self.bbox_pred = nn.Conv2d(channels, 4, kernel_size=1)
        self.centerness = nn.Conv2d(channels, 1, kernel_size=1)
        for conv in (self.cls_logits, self.bbox_pred, self.centerness):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.constant_(self.cls_logits.bias, bias_value)
        # cls_logits is never trained in GLIP (it only sizes the official score tensor).
        self.cls_logits.requires_grad_(False)
        self.dot_product_projection_text = nn.Linear(lang_dim, channels)
        self.log_scale = nn.Parameter(torch.tensor([head.log_scale]))
        self.bias_lang = nn.Parameter(torch.zeros(lang_dim))
        self.bias0 = nn.Parameter(torch.tensor([bias_value]))
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(5))

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        for module in self.dyhead_tower:
            if isinstance(module, VLFuse):
                module.use_checkpoint = enabled

    def forward(self, features: list[Tensor], lang: dict[str, Tensor]) -> dict:
        tower = self.dyhead_tower({"visual": list(features), "lang": lang})
        # Deep-fusion models ground with the fused text; T(A) with the masked BERT output.
        embedding = tower["lang"]["hidden"] if self.early_fuse else lang["embedded"]
        embedding = F.normalize(embedding, p=2, dim=-1)
        tokens = self.dot_product_projection_text(embedding / 2.0)  # [B, L, C]
        token_bias = torch.matmul(embedding, self.bias_lang) + self.bias0  # [B, L]
        out = {"box_regression": [], "centerness": [], "cls_logits": [], "dot_product_logits": [], "lang": tower["lang"],
               "tower_visual": tower["visual"]}
        for level, feature in enumerate(tower["visual"]):
            out["cls_logits"].append(self.cls_logits(feature))
            out["box_regression"].append(self.scales[level](self.bbox_pred(feature)))
            out["centerness"].append(self.centerness(feature))
            queries = feature.flatten(2).transpose(1, 2)  # [B, H*W, C]
            logits = torch.matmul(queries, tokens.transpose(-1, -2)) / self.log_scale.exp() + token_bias[:, None, :]
            out["dot_product_logits"].append(logits.clamp(-CLAMP, CLAMP))  # [B, H*W, L]
        return out
