"""The precision/recall plot of a `pipeline calibrate` policy file (`calibrate --plot`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

import numpy as np

from pipeline.io import storage


def plot_curves(result: dict, path: str, *, stream: TextIO | None = None) -> bool:
    """Precision/recall curves (one colour per NMS setting; class-agnostic solid, phrase-aware
    dashed) with the chosen policy and the target; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"warning: matplotlib is not installed: no plot written to {path}", file=stream or sys.stderr)
        return False
    import io

    calibration = result["calibration"]
    figure, axes = plt.subplots(figsize=(6, 4.5), dpi=110)
    target = calibration["target"]
    units = "boxes" if target["scope"] == "box" else "images"
    for number, curve in enumerate(calibration["curves"]):
        colour = f"C{number}"
        some = np.asarray(curve[f"kept_{units}"]) > 0  # precision is undefined where nothing is kept
        for match, style in (("agnostic", "-"), ("phrase", "--")):
            recall, precision = np.asarray(curve[f"{match}_recall"])[some], np.asarray(curve[f"{match}_precision"])[some]
            axes.plot(recall, precision, color=colour, linestyle=style, linewidth=1.5 if style == "-" else 0.8,
                      label=f"NMS {curve['nms']}" if match == "agnostic" else None)
    if target["metric"] == "precision":
        axes.axhline(target["value"], color="grey", linewidth=0.8, linestyle=":")
    else:
        axes.axvline(target["value"], color="grey", linewidth=0.8, linestyle=":")
    p_low, p_high = calibration["precision_interval"]
    r_low, r_high = calibration["recall_interval"]
    axes.errorbar(
        [calibration["recall"]], [calibration["precision"]], xerr=[[calibration["recall"] - r_low], [r_high - calibration["recall"]]],
        yerr=[[calibration["precision"] - p_low], [p_high - calibration["precision"]]], fmt="o", color="black",
        label=f"chosen: min_score {result['policy']['min_score']}",
    )
    axes.set_xlabel(f"recall ({target['scope']})")
    axes.set_ylabel(f"precision ({target['scope']})")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.02)
    axes.set_title(f"{calibration['sample']['images']} images; solid class-agnostic, dashed phrase-aware", fontsize=9)
    axes.legend(fontsize=8, loc="lower left")
    buffer = io.BytesIO()
    figure.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png", bbox_inches="tight")
    plt.close(figure)
    storage.write_atomic(path, buffer.getvalue())
    return True
