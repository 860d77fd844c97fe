"""`pipeline check-parity`: compare a GLIP checkpoint with an official reference run.

For people who port a variant: REFERENCE is one of the `.npz` runs of the official code in
`shared/reference/glip/` (its `*_summary.json` beside it), CKPT weights in the official layout or
ours, filled the way that run's README says (official checkpoints are not available offline).
A training reference runs one training step on its sample with every regulariser off (what
the reference did): loss terms, head and tower outputs, gradients w.r.t. the head outputs, the
stored full gradients and every parameter's gradient norm. A forward reference runs the model
in eval mode: text features, Swin stages, FPN maps, every tower step, head outputs.

Each compared tensor's max |ours - reference| / max |reference| is printed; gradient norms
that are zero in exact arithmetic are compared absolutely (`model.weights.parity`). The last line is
`parity: max relative difference X over N tensors`; the exit status is 1 when a loss term or
tensor differs by more than --tolerance, a gradient norm by more than --norm-tolerance (float32
rounding alone moves the deepest norms by up to 4e-4), or a zero norm by more than --tolerance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.user_errors import user_errors


@user_errors(FileNotFoundError, ValueError)  # CheckpointError, a reference that does not fit
def check_parity_command(
    reference: Path = typer.Argument(..., help="Reference .npz of the official code (its _summary.json beside it)."),
    checkpoint: str = typer.Option(..., "--checkpoint", help="GLIP checkpoint (.pth or .safetensors) with the reference's weights."),
    config: str = typer.Option("auto", "--config", help="auto (from the file) or a variant: glip-t-a, glip-t, glip-l."),
    tolerance: float = typer.Option(
        1e-4, "--tolerance", help="Largest relative difference of a loss term or tensor (absolute, for zero norms) that passes."
    ),
    norm_tolerance: float = typer.Option(
        1e-3, "--norm-tolerance",
        help="Largest relative difference of a parameter's gradient norm that passes (float32 rounding alone moves the "
        "official code's own norms by up to 4e-4: the reference README).",
    ),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (the references used 1)."),
) -> None:
    """Compare CKPT with an official GLIP reference run, tensor by tensor."""
    import numpy as np
    import torch

    from model.weights.checkpoint import load_glip
    from model.config import OFF
    from model.weights.parity import NORM_PREFIX, forward_comparisons, load_summary, reference_kind, training_comparisons

    if not reference.is_file():
        raise FileNotFoundError(f"{reference}: reference file not found")
    if threads:
        torch.set_num_threads(threads)
    npz = np.load(reference)
    kind = reference_kind(npz)
    summary = load_summary(reference) if kind == "training" else None
    model, info = load_glip(checkpoint, config=config, regularisers=OFF)
    typer.echo(f"{reference.name}: {kind} reference; {info.name}: variant {info.variant}, every regulariser off")
    if kind == "training":
        comparisons = training_comparisons(model.train(), npz, summary)
    else:
        comparisons = forward_comparisons(model.eval(), npz)
    relative = [c for c in comparisons if not c.absolute]
    norms = [c for c in relative if c.name.startswith(NORM_PREFIX)]
    tensors = [c for c in relative if not c.name.startswith(NORM_PREFIX)]
    absolute = [c for c in comparisons if c.absolute]
    width = max(len(c.name) for c in comparisons)
    for c in comparisons:
        typer.echo(f"{c.name:<{width}}  {c.difference:.3e}{'  (absolute)' if c.absolute else ''}")
    worst = max(c.difference for c in relative)
    failed = max((c.difference for c in tensors), default=0.0) > tolerance
    if norms:
        worst_norm = max(c.difference for c in norms)
        failed = failed or worst_norm > norm_tolerance
        above = sum(c.difference > tolerance for c in norms)
        typer.echo(f"{len(norms)} gradient norms: max relative difference {worst_norm:.3e}, {above} above {tolerance:g}")
    if absolute:
        worst_absolute = max(c.difference for c in absolute)
        failed = failed or worst_absolute > tolerance
        typer.echo(f"{len(absolute)} gradient norms that are zero in exact arithmetic: max absolute difference {worst_absolute:.3e}")
    typer.echo(f"parity: max relative difference {worst:.3e} over {len(relative)} tensors")
    if failed:
        raise typer.Exit(1)
