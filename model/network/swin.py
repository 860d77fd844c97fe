"""Swin Transformer v1 backbone as GLIP uses it (SPEC 1.1; `modeling/backbone/swint.py`).

Returns the four stage outputs as NCHW maps at strides 4, 8, 16, 32, each through its output
norm (`norm0` is Identity for GLIP's RETINANET arch, so stage 2 has no norm and no keys).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


class DropPath(nn.Module):
    """Stochastic depth per sample (train only)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x / keep * mask


class Mlp(nn.Module):
    def __init__(self, *, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def relative_position_index(window: int) -> Tensor:
    """[w*w, w*w] int64 index into the [(2w-1)^2, heads] bias table (Swin v1)."""
    grid = torch.arange(window, device="cpu")
    coords = torch.stack(torch.meshgrid(grid, grid, indexing="ij")).flatten(1)  # [2, w*w]
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)  # [w*w, w*w, 2]
    return relative[..., 0] * (2 * window - 1) + relative[..., 1]


class WindowAttention(nn.Module):
    def __init__(self, *, dim: int, window_size: int, num_heads: int) -> None:
        super().__init__()
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """x: [B*nW, N, C] tokens of each window; mask: [nW, N, N] (0 or -100) or None."""
        windows, tokens, channels = x.shape
        qkv = self.qkv(x).reshape(windows, tokens, 3, self.num_heads, channels // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B*nW, heads, N, d]
        attn = (q * self.scale) @ k.transpose(-2, -1)  # [B*nW, heads, N, N]
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        attn = attn + bias.reshape(tokens, tokens, -1).permute(2, 0, 1)[None]
        if mask is not None:
            n_windows = mask.shape[0]
            attn = attn.reshape(windows // n_windows, n_windows, self.num_heads, tokens, tokens) + mask[None, :, None]
            attn = attn.reshape(windows, self.num_heads, tokens, tokens)
        attn = attn.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(windows, tokens, channels)
        return self.proj(out)


def window_partition(x: Tensor, window: int) -> Tensor:
    """[B, H, W, C] -> [B*nW, w*w, C] (H, W multiples of w)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def window_reverse(windows: Tensor, window: int, height: int, width: int) -> Tensor:
    """[B*nW, w*w, C] -> [B, H, W, C]."""
    c = windows.shape[-1]
    b = windows.shape[0] // ((height // window) * (width // window))
    x = windows.reshape(b, height // window, width // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, height, width, c)


class SwinBlock(nn.Module):
    def __init__(self, *, dim: int, num_heads: int, window_size: int, shift: int, mlp_ratio: float, drop_path: float) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim=dim, window_size=window_size, num_heads=num_heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim=dim, hidden=int(dim * mlp_ratio))

    def forward(self, x: Tensor, height: int, width: int, attn_mask: Tensor | None) -> Tensor:
        """x: [B, H*W, C]."""
        b, _, c = x.shape
        w = self.window_size
        shortcut = x
        x = self.norm1(x).reshape(b, height, width, c)
        # Pad right/bottom to window multiples (after the norm, as the official block).
        pad_r, pad_b = (w - width % w) % w, (w - height % w) % w
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = height + pad_b, width + pad_r
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        x = window_reverse(self.attn(window_partition(x, w), attn_mask if self.shift else None), w, hp, wp)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x[:, :height, :width].reshape(b, height * width, c)
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    def __init__(self, *, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        """[B, H*W, C] -> [B, ceil(H/2)*ceil(W/2), 2C]; sub-grids in Swin order (0,0),(1,0),(0,1),(1,1)."""
        b, _, c = x.shape
        x = x.reshape(b, height, width, c)
        x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.reshape(b, -1, 4 * c)))


class SwinStage(nn.Module):
    def __init__(
        self, *, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float,
        drop_path: Sequence[float], downsample: bool,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift = window_size // 2
        self.use_checkpoint = False
        self.blocks = nn.ModuleList(
            SwinBlock(dim=dim, num_heads=num_heads, window_size=window_size, shift=0 if i % 2 == 0 else self.shift,
                      mlp_ratio=mlp_ratio, drop_path=drop_path[i])
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim=dim) if downsample else None

    def shift_mask(self, height: int, width: int, device: torch.device) -> Tensor:
        """[nW, w*w, w*w]: -100 between tokens from different regions of the rolled map."""
        w, s = self.window_size, self.shift
        hp, wp = -(-height // w) * w, -(-width // w) * w
        regions = torch.zeros((1, hp, wp, 1), device=device)
        label = 0
        for hs in (slice(0, -w), slice(-w, -s), slice(-s, None)):
            for ws in (slice(0, -w), slice(-w, -s), slice(-s, None)):
                regions[:, hs, ws, :] = label
                label += 1
        windows = window_partition(regions, w).squeeze(-1)  # [nW, w*w]
        diff = windows[:, None, :] - windows[:, :, None]
        return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)

    def forward(self, x: Tensor, height: int, width: int) -> tuple[Tensor, Tensor, int, int]:
        """Returns (stage output [B, H*W, C], next input, next H, next W)."""
        mask = self.shift_mask(height, width, x.device).to(x.dtype)
        for block in self.blocks:
            if self.use_checkpoint and self.training:
                x = checkpoint(block, x, height, width, mask, use_reentrant=False)
            else:
                x = block(x, height, width, mask)
        if self.downsample is None:
            return x, x, height, width
        return x, self.downsample(x, height, width), (height + 1) // 2, (width + 1) // 2


class PatchEmbed(nn.Module):
    def __init__(self, *, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        """[B, 3, H, W] -> [B, C, H/4, W/4] (input zero-padded right/bottom to a multiple of 4)."""
        p = self.patch_size
        x = F.pad(x, (0, (p - x.shape[3] % p) % p, 0, (p - x.shape[2] % p) % p))
        x = self.proj(x)
        b, c, h, w = x.shape
        return self.norm(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, c, h, w)


class SwinTransformer(nn.Module):
    """Swin v1 body. forward([B,3,H,W]) -> 4 maps [B, C_i, H/2^(i+2), W/2^(i+2)] (stage2..stage5)."""

    def __init__(
        self, *, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7, mlp_ratio: float = 4.0, drop_path_rate: float = 0.2, patch_size: int = 4,
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(patch_size=patch_size, embed_dim=embed_dim)
        total = max(sum(depths) - 1, 1)
        rates = [drop_path_rate * i / total for i in range(sum(depths))]  # linspace(0, rate, n)
        self.layers = nn.ModuleList()
        self.num_features = [embed_dim * 2**i for i in range(len(depths))]
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            self.layers.append(
                SwinStage(dim=self.num_features[i], depth=depth, num_heads=num_heads[i], window_size=window_size,
                          mlp_ratio=mlp_ratio, drop_path=rates[start : start + depth], downsample=i < len(depths) - 1)
            )
        # Output norms: norm0 is Identity in GLIP's RETINANET arch (no parameters, no keys).
        self.norm0 = nn.Identity()
        for i in range(1, len(depths)):
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))
        self.apply(_init_weights)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        for stage in self.layers:
            stage.use_checkpoint = enabled

    def forward(self, images: Tensor) -> list[Tensor]:
        x = self.patch_embed(images)
        height, width = x.shape[2:]
        x = x.flatten(2).transpose(1, 2)  # [B, H*W, C]
        outputs = []
        for i, stage in enumerate(self.layers):
            out, x, next_h, next_w = stage(x, height, width)
            out = getattr(self, f"norm{i}")(out)
            outputs.append(out.reshape(out.shape[0], height, width, -1).permute(0, 3, 1, 2).contiguous())
            height, width = next_h, next_w
        return outputs


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
