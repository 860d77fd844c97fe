"""`pipeline report RUN_DIR [--out FILE]`: one self-contained `report.html` for any folder that
holds stage outputs: a parse-captions, pseudo-label, filter or decontaminate output, a
`train-student` OUT, or a folder of them (the demo's run folder, a project's `web/`).

`find_stage_folders` looks for `_stats.json` (a finished stage) or `metrics.jsonl` (a training
run still going) in RUN_DIR and its subfolders, a few levels down; it never descends into a
stage's own data folders (`pseudo/`, `detections/`, `ray/`, `tensorboard/`). Each stage folder
becomes a section (`section_html`): the counts and throughput of every shard stage
(`shard_stage`), the labels of a pseudo-label or filter output (`labels`), the curves of a
training run (`training`). What a section reads is bounded (the stats, the shard log, a
sample of shards), so a run of 10^4 shards reports in seconds.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from pipeline.io import storage
from pipeline.user_errors import user_errors

MAX_DEPTH = 4
DATA_FOLDERS = {"pseudo", "detections", "ray", "tensorboard", "gallery", "_shards.parts", "images", "shards"}
REPORT_FILE = "report.html"
STAGE_ORDER = ("decontaminate", "parse-captions", "pseudo-label", "filter", "train-student")  # sections in the loop's order


def find_stage_folders(root: str, *, depth: int = MAX_DEPTH) -> list[str]:
    """Stage output folders in `root` (itself included), in path order."""
    names = storage.list_names(root)
    if "_stats.json" in names or "metrics.jsonl" in names:
        return [root]
    if depth == 0:
        return []
    found = []
    for name in storage.list_folders(root):
        if name not in DATA_FOLDERS and not name.startswith("_"):
            found += find_stage_folders(storage.join(root, name), depth=depth - 1)
    return found


def read_stats(folder: str) -> dict:
    path = storage.join(folder, "_stats.json")
    if storage.exists(path):
        return json.loads(storage.read_bytes(path))
    return {"stage": "train-student", "running": True}  # a training run with metrics.jsonl and no stats yet


def section_html(folder: str, stats: dict) -> str:
    from pipeline.report.labels import labels_html, phrases_html
    from pipeline.report.shard_stage import shard_stage_html
    from pipeline.report.training import training_html

    stage = stats.get("stage", "?")
    if stage == "train-student":
        return training_html(stats, folder)
    body = shard_stage_html(stats, folder)
    if stage in ("pseudo-label", "filter"):
        body += labels_html(folder, stats)
    elif stage == "parse-captions":
        body += phrases_html(folder)
    return body


def render_report(root: str, *, progress=None) -> tuple[str, list[tuple[str, str]]]:
    """The page for `root`, and (stage, folder) of each section."""
    from pipeline.report.page import GENERATOR, document, esc, section

    folders = find_stage_folders(root)
    if not folders:
        raise FileNotFoundError(f"{root}: no stage output in it or its subfolders (no _stats.json or metrics.jsonl)")
    stages = {folder: read_stats(folder) for folder in folders}
    folders.sort(key=lambda f: (STAGE_ORDER.index(stages[f].get("stage")) if stages[f].get("stage") in STAGE_ORDER else len(STAGE_ORDER), f))
    sections, toc, found = [], [], []
    for index, folder in enumerate(folders):
        stats = stages[folder]
        stage = str(stats.get("stage", "?"))
        relative = folder[len(root):].strip("/") or storage.basename(root.rstrip("/")) or root
        if progress:
            progress(f"report [{index + 1}/{len(folders)}] {stage}: {relative}")
        anchor = f"s{index}"
        title = f"{stage}: {relative}" + (" (running)" if stats.get("running") else "")
        sections.append(section(anchor, title, section_html(folder, stats)))
        toc.append(f'<li><a href="#{anchor}">{esc(title)}</a></li>')
        found.append((stage, folder))
    body = (f"<h1>Run report: {esc(root)}</h1><p>{len(folders)} stage outputs, reported "
            f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}.</p><nav><ul>{''.join(toc)}</ul></nav>" + "".join(sections))
    return document(f"report: {root}", body, generator=GENERATOR), found


def _output_path(root: str, out: Optional[str]) -> str:
    from pipeline.report.page import GENERATOR

    if out:
        return out
    path = storage.join(root, REPORT_FILE)
    if storage.exists(path) and f'content="{GENERATOR}"'.encode() not in storage.read_bytes(path)[:400]:
        raise FileExistsError(f"{path} exists and is not a `pipeline report` page (the demo's own report?): give --out")
    return path


@user_errors(FileNotFoundError, FileExistsError, ValueError, storage.UnwritableOutput)
def report_command(
    run_dir: str = typer.Argument(..., help="A stage output folder, a train-student OUT, or a folder of them (local or s3://, gs://)."),
    out: Optional[str] = typer.Option(None, "--out", help=f"The HTML file (default: RUN_DIR/{REPORT_FILE})."),
) -> None:
    """One self-contained report.html of the stage outputs in RUN_DIR: counts, skips, failures,
    throughput, label statistics with sample images, training curves."""
    root = run_dir.rstrip("/") if "://" in run_dir else str(Path(run_dir))
    if not storage.is_dir(root):
        raise FileNotFoundError(f"{run_dir}: not a folder")
    target = _output_path(root, out)
    started = time.perf_counter()
    page, found = render_report(root, progress=lambda line: print(line, file=sys.stderr, flush=True))
    storage.write_atomic(target, page.encode("utf-8"))
    print(f"report: {target} ({len(found)} stage outputs, {len(page) / 1e6:.2f} MB, {time.perf_counter() - started:.1f} s)")
