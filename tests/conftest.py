"""Shared test setup: offline hub access, loopback-only Ray, paths to ../shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing may reach a model hub; Ray must stay on 127.0.0.1 with no token auth.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GLIP_SHARED_DIR", REPO.parent / "shared"))
DATA = SHARED / "data"
REFERENCE = SHARED / "reference" / "glip"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not DATA.is_dir():
        raise FileNotFoundError(f"shared data folder not found: {DATA} (set GLIP_SHARED_DIR)")
    return DATA


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE.is_dir():
        raise FileNotFoundError(f"GLIP reference folder not found: {REFERENCE} (set GLIP_SHARED_DIR)")
    return REFERENCE


@pytest.fixture(scope="session")
def hf_teachers(tmp_path_factory) -> dict[str, Path]:
    """kind -> folder of a tiny random Grounding DINO / OWLv2 saved with `save_pretrained`."""
    from tests.hf_fixtures import save_tiny_grounding_dino, save_tiny_owlv2

    root = tmp_path_factory.mktemp("hf_teachers")
    return {
        "grounding-dino": save_tiny_grounding_dino(root / "tiny-grounding-dino"),
        "owlv2": save_tiny_owlv2(root / "tiny-owlv2"),
    }
