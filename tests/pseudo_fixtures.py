"""Real inputs for the pseudo-label tests: COCO images packed as img2dataset shards with their
human captions, the damaged and unusual images web shards carry, and a tiny teacher."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from bench.sample_shards import COCO_CAPTIONS, COCO_IMAGES, add_member, coco_samples, tiny_teacher, write_shard

__all__ = ["COCO_CAPTIONS", "COCO_IMAGES", "add_member", "coco_samples", "encoded", "odd_images", "tiny_teacher",
           "write_pseudo_shards", "write_shard"]


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def odd_images(base_jpeg: bytes) -> dict[str, tuple[str, bytes]]:
    """name -> (extension, bytes): every kind of image a web shard holds besides plain RGB JPEGs."""
    rgb = Image.open(io.BytesIO(base_jpeg)).convert("RGB").resize((160, 120))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    gray16 = Image.fromarray((np.linspace(0, 65535, 160 * 120).reshape(120, 160)).astype(np.uint16))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    return {
        "cmyk": ("jpg", encoded(rgb.convert("CMYK"), "JPEG")),
        "gray": ("jpg", encoded(rgb.convert("L"), "JPEG")),
        "gray16": ("png", encoded(gray16, "PNG")),
        "alpha": ("png", encoded(rgba, "PNG")),
        "palette": ("png", encoded(rgb.convert("P"), "PNG")),
        "exif_rotated": ("jpg", encoded(rgb, "JPEG", exif=exif.tobytes())),
        "truncated": ("jpg", base_jpeg[: len(base_jpeg) // 3]),
        "not_an_image": ("jpg", b"<html><body>404 Not Found</body></html>"),
        "tiny": ("png", encoded(rgb.resize((4, 4)), "PNG")),
        "bomb": ("png", encoded(Image.new("1", (9000, 9000)), "PNG")),
    }


def write_pseudo_shards(folder: Path, shared_data: Path, coco: dict, *, shards: int, per_shard: int) -> list[str]:
    """Pseudo tars in the DESIGN.md format with real COCO images and their gold boxes."""
    folder.mkdir(parents=True, exist_ok=True)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    images = sorted(coco["images"], key=lambda i: i["id"])
    keys = []
    for shard in range(shards):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for slot in range(per_shard):
                image = images[(shard * per_shard + slot) % len(images)]
                key = f"{shard:05d}{slot:04d}"
                anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]][:3]
                caption = ", ".join(f"the {names[a['category_id']]}" for a in anns) or "nothing here"
                regions, cursor = [], 0
                for ann in anns:
                    phrase = f"the {names[ann['category_id']]}"
                    start = caption.index(phrase, cursor)
                    cursor = start + len(phrase)
                    x, y, w, h = ann["bbox"]
                    regions.append({"bbox": [x, y, x + w, y + h], "phrase": phrase, "tokens_positive": [[start, cursor]], "score": 0.9})
                sample = {"key": key, "width": image["width"], "height": image["height"],
                          "grounding": {"caption": caption, "regions": regions},
                          "teacher": {"checkpoint": "teacher.pth", "sha256": "0" * 64}, "filter": {"min_score": 0.5}}
                add_member(tar, f"{key}.jpg", (shared_data / COCO_IMAGES / image["file_name"]).read_bytes())
                add_member(tar, f"{key}.json", json.dumps(sample).encode())
                keys.append(key)
    return keys
