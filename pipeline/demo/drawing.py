"""The demo world's pixels (`world.render_image` composes them): a shape's mask, a texture's
fill and a background canvas, each deterministic given its `rng`."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw


def shape_mask(kind: str, size: tuple[int, int], cx: float, cy: float, r: float, angle: float) -> Image.Image:
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)

    def polygon(points: int, radius_fn) -> list[tuple[float, float]]:
        return [
            (cx + radius_fn(i) * math.cos(angle + 2 * math.pi * i / points), cy + radius_fn(i) * math.sin(angle + 2 * math.pi * i / points))
            for i in range(points)
        ]

    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif kind == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        draw.ellipse((cx - r * 0.55, cy - r * 0.55, cx + r * 0.55, cy + r * 0.55), fill=0)
    elif kind == "square":
        draw.polygon(polygon(4, lambda i: r * 1.2), fill=255)
    elif kind == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.65, cy), (cx, cy + r), (cx - r * 0.65, cy)], fill=255)
    elif kind == "triangle":
        draw.polygon(polygon(3, lambda i: r * 1.15), fill=255)
    elif kind == "hexagon":
        draw.polygon(polygon(6, lambda i: r), fill=255)
    elif kind == "star":
        draw.polygon(polygon(10, lambda i: r * 1.1 if i % 2 == 0 else r * 0.45), fill=255)
    elif kind == "cross":
        w = r * 0.35
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=255)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=255)
    return mask


def texture_fill(texture: str, colour: tuple[int, int, int], size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    width, height = size
    fill = np.empty((height, width, 3), dtype=np.uint8)
    fill[:] = colour
    if texture == "striped":
        period = int(rng.integers(6, 10))
        ys, xs = np.mgrid[0:height, 0:width]
        light = ((xs + ys) // (period // 2)) % 2 == 0
        fill[light] = np.clip(np.asarray(colour) * 0.45 + 140, 0, 255).astype(np.uint8)
    elif texture == "dotted":
        period = int(rng.integers(6, 9))
        ys, xs = np.mgrid[0:height, 0:width]
        dots = ((xs % period) - period / 2) ** 2 + ((ys % period) - period / 2) ** 2 < (period / 4) ** 2
        fill[dots] = 255
    return fill


def background_canvas(kind: str, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    width, height = size
    base = rng.integers(150, 235, size=3)
    if kind == "plain":
        canvas = np.broadcast_to(base, (height, width, 3)).astype(np.float64)
    elif kind == "gradient":
        other = rng.integers(150, 235, size=3)
        t = np.linspace(0, 1, width)[None, :, None]
        canvas = np.broadcast_to(base * (1 - t) + other * t, (height, width, 3)).astype(np.float64)
    elif kind == "noisy":
        canvas = base + rng.normal(0, 18, size=(height, width, 3))
    else:
        period = int(rng.integers(10, 24))
        ys = np.arange(height)[:, None, None]
        canvas = np.where((ys // period) % 2 == 0, base, base - 35) * np.ones((1, width, 1))
    return np.clip(canvas, 0, 255)
