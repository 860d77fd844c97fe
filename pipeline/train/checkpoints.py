"""A training checkpoint: what one step of a run needs to continue exactly.

Each checkpoint folder (reported through `ray.train.report`) holds `model.pth` (the official
GLIP layout + metadata, `model.weights.checkpoint.save_glip`), the optimizer and schedule in
`train_state.pt`, and per worker `rank_{r}.pt` with its RNG state and its data-stream
position. Everything is written with `torch.save` of tensors and plain data and read back with
`weights_only=True`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.train.config import TrainConfig

MODEL_FILE = "model.pth"
STATE_FILE = "train_state.pt"


def rank_file(rank: int) -> str:
    return f"rank_{rank}.pt"


def save_training_checkpoint(
    directory: Path, *, model, optimizer, scheduler, step: int, data_state: dict, rank: int, config: TrainConfig
) -> None:
    """Write this worker's part of a checkpoint into `directory` (merged by Ray Train)."""
    from model.weights.checkpoint import save_glip

    torch.save(
        {
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "data": data_state,
            "step": step,
        },
        directory / rank_file(rank),
    )
    if rank == 0:
        provenance = {
            "trainer": "pipeline train-student",
            "step": step,
            "steps": config.steps,
            "init": config.model.init,
            "sources": [s.name for s in config.data.sources],
            "seed": config.seed,
        }
        save_glip(model, directory / MODEL_FILE, provenance=provenance)
        torch.save(
            {
                "step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "workers": config.resources.workers,
            },
            directory / STATE_FILE,
        )


def restore_training_checkpoint(directory: Path, *, model, optimizer, scheduler, stream, rank: int) -> int:
    """Load a checkpoint written by `save_training_checkpoint`; returns its step."""
    from model.weights.checkpoint import drop_ignored_keys, read_checkpoint

    for name in (MODEL_FILE, STATE_FILE, rank_file(rank)):
        if not (directory / name).is_file():
            raise FileNotFoundError(
                f"{directory}: checkpoint has no {name} (written by a run with a different number of workers?)"
            )
    state, _, _ = read_checkpoint(directory / MODEL_FILE)
    model.load_state_dict(drop_ignored_keys(state), strict=True)
    train_state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(train_state["optimizer"])
    scheduler.load_state_dict(train_state["scheduler"])
    worker_state = torch.load(directory / rank_file(rank), map_location="cpu", weights_only=True)
    stream.load_state_dict(worker_state["data"])
    torch.set_rng_state(worker_state["torch_rng"])
    if worker_state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(worker_state["cuda_rng"])
    return int(train_state["step"])
