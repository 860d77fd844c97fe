"""The reference runs' deterministic weights and inputs (shared/reference/glip/README.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn


@torch.no_grad()
def fill_reference_weights(model: nn.Module) -> int:
    """Fill every parameter by the README rule; buffers keep their constructed values.

    Parameters are numbered in plain string order of their names; parameter i of shape S
    gets z = randn(S) from a fresh CPU generator seeded i, then: >= 2 dims: 0.5 z / sqrt(fan_in)
    (fan_in = numel / S[0]); 1-D `.weight`: 1 + 0.1 z; 1-D `.bias`: 0.02 z; others: 0.2 z.
    Returns the number of parameters filled.
    """
    params = dict(model.named_parameters())
    for index, name in enumerate(sorted(params)):
        param = params[name]
        shape = tuple(param.shape)
        z = torch.randn(shape, generator=torch.Generator().manual_seed(index), dtype=torch.float32)
        if len(shape) >= 2:
            value = 0.5 * z / math.sqrt(param.numel() / shape[0])
        elif name.endswith(".weight"):
            value = 1 + 0.1 * z
        elif name.endswith(".bias"):
            value = 0.02 * z
        else:
            value = 0.2 * z
        param.copy_(value)
    return len(params)


def load_reference(reference_dir: Path, name: str):
    npz = np.load(reference_dir / f"glip_{name}_reference.npz")
    summary = json.loads((reference_dir / f"glip_{name}_reference_summary.json").read_text())
    return npz, summary
