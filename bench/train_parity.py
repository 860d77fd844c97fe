"""Whole-network training parity with the official GLIP code, per variant (minutes on a CPU).

For each variant: build the official-layout checkpoint the reference README describes (the
"fill": deterministic weights, no metadata, `module.`-prefixed keys as the released files), then
run `pipeline check-parity` on it against the training reference: one training step with every
regulariser off, comparing the loss terms, head and tower outputs, the gradients w.r.t. the head
outputs, the stored full gradients and the gradient norm of every parameter. Prints each
check's largest differences and its wall time (the full listing is written beside the
checkpoint); exits 1 when a variant fails.

    python bench/train_parity.py                      # T(C) and T(A), one torch thread
    python bench/train_parity.py --variant t_a --keep /tmp/parity   # keep the checkpoint
    python bench/train_parity.py --reference glip_l_reference.npz --variant l   # GLIP-L forward

Peak memory: about 6.5 GB for T(C), 3.5 GB for T(A) (one training step at 480x640, float32).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.reference_weights import fill_reference_weights  # noqa: E402
from model.config import get_config  # noqa: E402
from model.network.glip import GLIP  # noqa: E402

VARIANTS = {"t_c": "glip-t", "t_a": "glip-t-a", "l": "glip-l"}


def write_filled_checkpoint(variant: str, path: Path) -> int:
    """The README's fill in the released files' layout: {"model": {"module." + key: tensor}}."""
    model = GLIP(get_config(VARIANTS[variant]))
    filled = fill_reference_weights(model)
    torch.save({"model": {f"module.{key}": value for key, value in model.state_dict().items()}}, path)
    return filled


def worst(lines: list[str], count: int) -> list[str]:
    """The `count` compared tensors of a check-parity listing with the largest relative difference."""
    rows = []
    for line in lines:
        parts = line.split()
        if len(parts) == 2:
            try:
                rows.append((float(parts[1]), line))
            except ValueError:
                pass
    return [line for _, line in sorted(rows, reverse=True)[:count]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", choices=sorted(VARIANTS), help="t_c, t_a or l (repeatable; default t_c and t_a)")
    parser.add_argument("--reference", help="reference file name instead of glip_<variant>_train_reference.npz")
    parser.add_argument("--reference-dir", default=str(REPO.parent / "shared" / "reference" / "glip"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the check (the references used 1)")
    parser.add_argument("--keep", help="folder to keep the filled checkpoints in (default: a temporary one)")
    args = parser.parse_args()
    failed = []
    with tempfile.TemporaryDirectory(prefix="glip-parity-") as scratch:
        folder = Path(args.keep or scratch)
        folder.mkdir(parents=True, exist_ok=True)
        for variant in args.variant or ["t_c", "t_a"]:
            reference = Path(args.reference_dir) / (args.reference or f"glip_{variant}_train_reference.npz")
            checkpoint = folder / f"glip_{variant}_reference_fill.pth"
            start = time.perf_counter()
            filled = write_filled_checkpoint(variant, checkpoint)
            written = time.perf_counter() - start
            command = [
                sys.executable, "-m", "pipeline.cli", "check-parity", str(reference),
                "--checkpoint", str(checkpoint), "--threads", str(args.threads),
            ]
            start = time.perf_counter()
            run = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
            seconds = time.perf_counter() - start
            lines = (run.stdout + run.stderr).strip().splitlines()
            (folder / f"glip_{variant}_check_parity.txt").write_text("\n".join(lines) + "\n")
            print(f"== {variant}: {filled} parameters filled ({written:.0f} s); pipeline check-parity {reference.name}")
            print("\n".join(lines[:6] + ["... the 8 largest relative differences:"] + worst(lines, 8) + lines[-2:]))
            print(f"== {variant}: check took {seconds:.0f} s, exit status {run.returncode}")
            if run.returncode:
                failed.append(variant)
    print(f"train parity: {'FAILED ' + ', '.join(failed) if failed else 'passed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
