"""Deep vision-language fusion of GLIP's head (SPEC 1.4; `utils/fuse_helper.py`, `vldyhead.py`).

`VLFuse` is the X-MHA bi-attention between all visual tokens (five FPN levels at once) and the
text tokens; `BertEncoderLayer` is the extra BERT layer that follows each fusion step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CLAMP = 50000.0  # CLAMP_MIN_FOR_UNDERFLOW / CLAMP_MAX_FOR_OVERFLOW


class BiMultiHeadAttention(nn.Module):
    """Bi-directional attention: returns (delta_v [B, Nv, v_dim], delta_l [B, L, l_dim])."""

    def __init__(self, *, v_dim: int, l_dim: int, embed_dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scale = self.head_dim**-0.5
        self.dropout = dropout
        self.v_proj = nn.Linear(v_dim, embed_dim)
        self.l_proj = nn.Linear(l_dim, embed_dim)
        self.values_v_proj = nn.Linear(v_dim, embed_dim)
        self.values_l_proj = nn.Linear(l_dim, embed_dim)
        self.out_v_proj = nn.Linear(embed_dim, v_dim)
        self.out_l_proj = nn.Linear(embed_dim, l_dim)
        for linear in (self.v_proj, self.l_proj, self.values_v_proj, self.values_l_proj, self.out_v_proj, self.out_l_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape  # [B, N, E] -> [B*h, N, d]
        return x.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2).reshape(b * self.num_heads, n, self.head_dim)

    def forward(self, v: Tensor, l: Tensor, text_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        batch, n_visual, _ = v.shape
        n_text = l.shape[1]
        query = self._heads(self.v_proj(v) * self.scale)
        key = self._heads(self.l_proj(l))
        value_v = self._heads(self.values_v_proj(v))
        value_l = self._heads(self.values_l_proj(l))
        attn = torch.bmm(query, key.transpose(1, 2)).clamp(-CLAMP, CLAMP)  # [B*h, Nv, L]

        # Image -> text: softmax over ALL visual tokens (no mask), max-subtracted and clamped.
        attn_l = attn.transpose(1, 2)
        attn_l = (attn_l - attn_l.max(dim=-1, keepdim=True)[0]).clamp(-CLAMP, CLAMP).softmax(dim=-1)

        # Text -> image: padding tokens masked. The official code fills mask==0 with -9e15 and
        # leaves valid positions at 1 (a constant shift softmax ignores); kept for parity.
        if text_mask is not None:
            additive = text_mask.to(attn.dtype).masked_fill(text_mask == 0, -9e15)[:, None, None, :]
            attn = (attn.reshape(batch, self.num_heads, n_visual, n_text) + additive).reshape(-1, n_visual, n_text)
        attn_v = attn.softmax(dim=-1)

        attn_v = F.dropout(attn_v, p=self.dropout, training=self.training)
        attn_l = F.dropout(attn_l, p=self.dropout, training=self.training)
        out_v = torch.bmm(attn_v, value_l).reshape(batch, self.num_heads, n_visual, self.head_dim)
        out_l = torch.bmm(attn_l, value_v).reshape(batch, self.num_heads, n_text, self.head_dim)
        out_v = out_v.transpose(1, 2).reshape(batch, n_visual, -1)
        out_l = out_l.transpose(1, 2).reshape(batch, n_text, -1)
        return self.out_v_proj(out_v), self.out_l_proj(out_l)


class BiAttentionBlock(nn.Module):
    """Pre-norm bi-attention with layer scale; the residual is added to the NORMALISED inputs."""

    def __init__(self, *, v_dim: int, l_dim: int, embed_dim: int, num_heads: int, init_scale: float, dropout: float) -> None:
        super().__init__()
        self.layer_norm_v = nn.LayerNorm(v_dim)
        self.layer_norm_l = nn.LayerNorm(l_dim)
        self.attn = BiMultiHeadAttention(v_dim=v_dim, l_dim=l_dim, embed_dim=embed_dim, num_heads=num_heads, dropout=dropout)
        self.gamma_v = nn.Parameter(init_scale * torch.ones(v_dim))
        self.gamma_l = nn.Parameter(init_scale * torch.ones(l_dim))

    def forward(self, visual: list[Tensor], text: Tensor, text_mask: Tensor) -> tuple[list[Tensor], Tensor]:
        """visual: 5 maps [B, C, H_l, W_l]; text [B, L, D]. Returns the same shapes."""
        sizes = [feature.shape[-2:] for feature in visual]
        v = torch.cat([feature.flatten(2).transpose(1, 2) for feature in visual], dim=1)  # [B, sum HW, C]
        v = self.layer_norm_v(v)
        l = self.layer_norm_l(text)
        delta_v, delta_l = self.attn(v, l, text_mask)
        v = v + self.gamma_v * delta_v
        l = l + self.gamma_l * delta_l
        v = v.transpose(1, 2)  # [B, C, sum HW]
        out, start = [], 0
        for height, width in sizes:
            out.append(v[:, :, start : start + height * width].reshape(v.shape[0], -1, height, width))
            start += height * width
        return out, l


class VLFuse(nn.Module):
    """Tower step: fuse visual maps and text hidden states (dict in, dict out). `dropout`: on
    both attention maps (official: 0.1; the fusion's drop path is hard-coded 0 there, so none here)."""

    def __init__(self, *, v_dim: int, l_dim: int, embed_dim: int, num_heads: int, num_convs: int, dropout: float) -> None:
        super().__init__()
        self.use_checkpoint = False
        self.b_attn = BiAttentionBlock(v_dim=v_dim, l_dim=l_dim, embed_dim=embed_dim, num_heads=num_heads,
                                       init_scale=1.0 / num_convs, dropout=dropout)

    def forward(self, inputs: dict) -> dict:
        lang = dict(inputs["lang"])
        if self.use_checkpoint and self.training:
            from torch.utils.checkpoint import checkpoint

            visual, lang["hidden"] = checkpoint(self.b_attn, inputs["visual"], lang["hidden"], lang["masks"], use_reentrant=False)
        else:
            visual, lang["hidden"] = self.b_attn(inputs["visual"], lang["hidden"], lang["masks"])
        return {"visual": visual, "lang": lang}


class _SelfAttention(nn.Module):
    def __init__(self, *, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = hidden // heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.dropout = dropout

    def forward(self, x: Tensor, additive_mask: Tensor) -> Tensor:
        b, n, _ = x.shape

        def split(t: Tensor) -> Tensor:
            return t.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)  # [B, h, L, d]

        scores = split(self.query(x)) @ split(self.key(x)).transpose(-1, -2) / math.sqrt(self.head_dim)
        # GLIP's modeling_bert clamps the scores before adding the mask.
        scores = scores.clamp(-CLAMP, CLAMP) + additive_mask
        probs = F.dropout(scores.softmax(dim=-1), p=self.dropout, training=self.training)
        return (probs @ split(self.value(x))).transpose(1, 2).reshape(b, n, -1)


class _DenseNorm(nn.Module):
    def __init__(self, *, in_dim: int, out_dim: int, eps: float, dropout: float) -> None:
        super().__init__()
        self.dense = nn.Linear(in_dim, out_dim)
        self.LayerNorm = nn.LayerNorm(out_dim, eps=eps)
        self.dropout = dropout

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(F.dropout(self.dense(x), p=self.dropout, training=self.training) + residual)


class _Attention(nn.Module):
    def __init__(self, *, hidden: int, heads: int, eps: float, hidden_dropout: float, attention_dropout: float) -> None:
        super().__init__()
        self.self = _SelfAttention(hidden=hidden, heads=heads, dropout=attention_dropout)
        self.output = _DenseNorm(in_dim=hidden, out_dim=hidden, eps=eps, dropout=hidden_dropout)

    def forward(self, x: Tensor, additive_mask: Tensor) -> Tensor:
        return self.output(self.self(x, additive_mask), x)


class _Intermediate(nn.Module):
    def __init__(self, *, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, intermediate)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))


class BertEncoderLayer(nn.Module):
    """Post-LN BERT layer on lang["hidden"] with clamped scores (tower step after VLFuse).
    Dropouts as BERT's: `attention_dropout` on the attention probabilities, `hidden_dropout`
    on each dense output before its residual (the official layer reuses the text BertConfig)."""

    def __init__(
        self, *, hidden: int, heads: int, intermediate: int, eps: float = 1e-12, hidden_dropout: float,
        attention_dropout: float,
    ) -> None:
        super().__init__()
        self.attention = _Attention(hidden=hidden, heads=heads, eps=eps, hidden_dropout=hidden_dropout,
                                    attention_dropout=attention_dropout)
        self.intermediate = _Intermediate(hidden=hidden, intermediate=intermediate)
        self.output = _DenseNorm(in_dim=intermediate, out_dim=hidden, eps=eps, dropout=hidden_dropout)
        for module in self.modules():  # BERT init
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, inputs: dict) -> dict:
        lang = dict(inputs["lang"])
        hidden = lang["hidden"]
        # HF extended mask: (1 - mask) * finfo.min, broadcast over heads and queries.
        additive = (1.0 - lang["masks"][:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        attended = self.attention(hidden, additive)
        lang["hidden"] = self.output(self.intermediate(attended), attended)
        return {"visual": inputs["visual"], "lang": lang}
