"""Real inputs for the pseudo-label benchmarks and tests: COCO images of ../shared/data packed as
img2dataset shards with their first human caption, and a tiny teacher with random weights.

Used by `bench/pseudo_label.py` and, through `tests/pseudo_fixtures.py`, by the tests (a bench
never imports the test package).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

COCO_IMAGES = "coco_mini/train2017"
COCO_CAPTIONS = "coco_mini/annotations/captions_train2017_subset.json"


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def coco_samples(shared: Path, count: int, *, offset: int = 0) -> list[tuple[str, bytes, str]]:
    """(key, jpeg bytes, first human caption) of `count` coco_mini images, by image id."""
    captions = json.loads((shared / COCO_CAPTIONS).read_text())
    first: dict[int, str] = {}
    for ann in sorted(captions["annotations"], key=lambda a: a["id"]):
        first.setdefault(int(ann["image_id"]), ann["caption"].strip())
    files = sorted((shared / COCO_IMAGES).glob("*.jpg"))[offset : offset + count]
    return [(f.stem, f.read_bytes(), first[int(f.stem)]) for f in files]


def write_shard(path: Path, samples: list[tuple[str, str, bytes, str]]) -> None:
    """img2dataset layout: {key}.{ext} image, {key}.txt caption, {key}.json metadata."""
    with tarfile.open(path, "w") as tar:
        for key, ext, data, caption in samples:
            add_member(tar, f"{key}.{ext}", data)
            add_member(tar, f"{key}.txt", caption.encode("utf-8"))
            add_member(tar, f"{key}.json", json.dumps({"key": key, "caption": caption}).encode())


def tiny_teacher(path: Path, seed: int = 0, token_bias: float = 4.0) -> Path:
    """A tiny GLIP with seeded random weights, saved in the official layout.

    Random weights score every box near the prior (~0.1); `token_bias` raises the head's
    token-logit bias (`bias0`) so the untrained teacher is confident and its boxes pass the
    filter presets, which is all the plumbing tests need.
    """
    import torch

    from model.weights.checkpoint import save_glip
    from model.config import get_config
    from model.network.glip import GLIP

    torch.manual_seed(seed)
    model = GLIP(get_config("tiny"))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias0"):
                parameter.fill_(token_bias)
    return Path(save_glip(model, path, provenance={"note": "random tiny teacher for tests"}))
