"""What a report shows of labels: for a pseudo-label or filter output, boxes per image, scores
of every detection against the kept ones, the phrases (most frequent, a sample of the rare
ones, boxes per frequency band), a grid of images with their boxes and the teacher; for a
parse-captions output, the phrases per caption and the most frequent phrases.

All of it comes from a bounded sample (`sample_shards`: at most `SAMPLE_SHARDS` shards, spread
over the shard ids, and at most `SAMPLE_ITEMS` samples from them), whatever the run's size."""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field

from pipeline.io import storage
from pipeline.io.labels_io import DETECTIONS, PSEUDO, detections_folder, iter_pseudo_samples, read_detections_metadata
from pipeline.report import figures
from pipeline.report.page import details, esc, image, table

SAMPLE_SHARDS = 6
SAMPLE_ITEMS = 3000
GRID_IMAGES = 12
GRID_REGIONS = 6  # boxes named under a grid image
TOP_PHRASES = 15
RARE_PHRASES = 15
SCORE_BINS = [i / 20 for i in range(21)]
FREQUENCY_BANDS = ((1, 1), (2, 4), (5, 19), (20, 99), (100, None))


def sample_shards(names: list[str], *, suffix: str, count: int = SAMPLE_SHARDS) -> list[str]:
    """Up to `count` shard ids of the files `names` ending in `suffix`, evenly spread in id order."""
    ids = sorted(n[: -len(suffix)] for n in names if n.endswith(suffix) and not storage.is_temporary_name(n))
    if len(ids) <= count:
        return ids
    return [ids[round(i * (len(ids) - 1) / (count - 1))] for i in range(count)]


@dataclass
class LabelSample:
    """What the sampled shards hold: per image, all detections' scores and the kept regions."""

    shards: list[str] = field(default_factory=list)
    boxes_all: list[int] = field(default_factory=list)  # per image of the detections files
    boxes_kept: list[int] = field(default_factory=list)  # per image of the same shards (0: none kept)
    scores_all: list[float] = field(default_factory=list)
    scores_kept: list[float] = field(default_factory=list)
    phrases: Counter = field(default_factory=Counter)  # kept boxes per phrase text
    phrase_scores: dict[str, float] = field(default_factory=dict)  # summed scores
    grid: list[tuple[str, str, str]] = field(default_factory=list)  # (image URI, key, regions)
    teacher: dict = field(default_factory=dict)


def read_label_sample(folder: str, stats: dict) -> LabelSample:
    """The bounded sample of a pseudo-label or filter output `folder`."""
    import pyarrow.parquet as pq

    from pipeline.stages.inspect_labels import draw_sample

    sample = LabelSample(teacher=dict((stats.get("versions") or {}).get("teacher") or {}))
    pseudo = storage.join(folder, PSEUDO)
    sample.shards = sample_shards(storage.list_names(pseudo), suffix=".tar")
    detections = storage.join(folder, DETECTIONS)
    if not storage.is_dir(detections) and (stats.get("settings") or {}).get("detections"):
        detections = detections_folder(stats["settings"]["detections"])  # a filter run reads another folder's
    per_shard = max(1, SAMPLE_ITEMS // max(len(sample.shards), 1))
    for shard in sample.shards:
        kept: dict[str, int] = {}
        cut = False
        for key, _, image_bytes, record in iter_pseudo_samples(storage.join(pseudo, f"{shard}.tar")):
            if len(kept) >= per_shard:
                cut = True
                break
            regions = record["grounding"]["regions"]
            kept[key] = len(regions)
            for region in regions:
                sample.scores_kept.append(float(region["score"]))
                sample.phrases[region["phrase"]] += 1
                sample.phrase_scores[region["phrase"]] = sample.phrase_scores.get(region["phrase"], 0.0) + float(region["score"])
            if len(sample.grid) < GRID_IMAGES:
                listed = "; ".join(f"{r['phrase']} {r['score']:.2f}" for r in regions[:GRID_REGIONS])
                listed += f" ... and {len(regions) - GRID_REGIONS} more boxes" if len(regions) > GRID_REGIONS else ""
                sample.grid.append((figures.jpeg(draw_sample(image_bytes, record)), key, listed))
        parquet = storage.join(detections, f"{shard}.parquet")
        if not storage.exists(parquet):
            sample.boxes_kept.extend(kept.values())
            continue
        with storage.open_read(parquet) as handle:
            rows = pq.read_table(handle, columns=["key", "boxes", "error"]).to_pylist()
        if not sample.teacher:
            sample.teacher = json.loads(read_detections_metadata(parquet).get("teacher", "{}"))
        if cut:  # the tar keeps the detections' order: the images up to the last one read
            last = next((i for i, row in enumerate(rows) if row["key"] == key), len(rows))
            rows = rows[:last]
        for row in rows[: 4 * per_shard]:
            if row["error"]:
                continue
            boxes = row["boxes"] or []
            sample.boxes_all.append(len(boxes))
            sample.scores_all.extend(float(b["score"]) for b in boxes)
            sample.boxes_kept.append(kept.get(row["key"], 0))
    return sample


def _bands(sample: LabelSample) -> list[tuple[str, int, int, str]]:
    rows = []
    for low, high in FREQUENCY_BANDS:
        chosen = [p for p, n in sample.phrases.items() if n >= low and (high is None or n <= high)]
        boxes = sum(sample.phrases[p] for p in chosen)
        score = sum(sample.phrase_scores[p] for p in chosen) / boxes if boxes else 0.0
        rows.append((f"{low}+" if high is None else (f"{low}" if low == high else f"{low}-{high}"), len(chosen), boxes, f"{score:.3f}"))
    return rows


def labels_html(folder: str, stats: dict) -> str:
    sample = read_label_sample(folder, stats)
    if not sample.shards:
        return "<p>No pseudo shard to sample (no pseudo/*.tar).</p>"
    images = len(sample.boxes_kept)
    head = (f"<h3>Labels in a sample</h3><p>{len(sample.shards)} shards sampled ({esc(', '.join(sample.shards))}), "
            f"{images:,} images, {len(sample.scores_kept):,} kept boxes, {len(sample.scores_all):,} detections above the floor.</p>")
    most = max(sample.boxes_all + sample.boxes_kept + [1])
    # one bar per count up to 60 boxes; wider bars past that (a teacher at a low floor gives hundreds)
    bins = [edge - 0.5 for edge in range(0, most + 2)] if most <= 60 else [most * i / 40 for i in range(41)]
    per_image = figures.histograms({"all detections": sample.boxes_all, "kept": sample.boxes_kept}, bins=bins, xlabel="boxes per image")
    scores = figures.histograms({"all detections": sample.scores_all, "kept": sample.scores_kept}, bins=SCORE_BINS,
                                xlabel="teacher score", log=True)
    charts = f'<div class="charts">{image(per_image, "boxes per image")}{image(scores, "score histograms")}</div>'
    top = [(phrase, n, f"{sample.phrase_scores[phrase] / n:.3f}") for phrase, n in sample.phrases.most_common(TOP_PHRASES)]
    rare_pool = sorted(p for p, n in sample.phrases.items() if n == 1)
    rare = sorted(random.Random(0).sample(rare_pool, min(RARE_PHRASES, len(rare_pool))))
    phrases = (
        f"<h3>Phrases of the kept boxes ({len(sample.phrases):,} distinct)</h3>"
        + table(["most frequent phrase", "boxes", "mean score"], top, text_columns=(0,))
        + (f"<p>A sample of the {len(rare_pool):,} phrases seen once: {esc('; '.join(rare))}</p>" if rare else "")
        + "<h3>Boxes per phrase frequency band</h3>"
        + table(["boxes of the phrase in the sample", "phrases", "boxes", "mean score"], _bands(sample))
    )
    cards = "".join(f'<figure><img alt="{esc(key)}" src="{uri}"><figcaption><code>{esc(key)}</code> {esc(regions)}</figcaption></figure>'
                    for uri, key, regions in sample.grid)
    grid = f"<h3>Sample images with their kept boxes</h3><div class=\"grid\">{cards}</div>" if cards else ""
    teacher = details(f"teacher: {sample.teacher.get('checkpoint', sample.teacher.get('name', '?'))} "
                      f"({sample.teacher.get('kind', '?')}, {sample.teacher.get('variant', '?')})", json.dumps(sample.teacher, indent=2)) \
        if sample.teacher else ""
    return head + teacher + charts + phrases + grid


def phrases_html(folder: str) -> str:
    """A parse-captions output: phrases per caption and the most frequent phrases, sampled."""
    import pyarrow.parquet as pq

    shards = sample_shards(storage.list_names(folder), suffix=".parquet")
    counts: list[int] = []
    phrases: Counter = Counter()
    for shard in shards:
        with storage.open_read(storage.join(folder, f"{shard}.parquet")) as handle:
            rows = pq.read_table(handle, columns=["phrases", "error"]).to_pylist()[:SAMPLE_ITEMS]
        for row in rows:
            if row["error"] is None:
                counts.append(len(row["phrases"] or []))
                phrases.update(p["text"].lower() for p in row["phrases"] or [])
        if len(counts) >= SAMPLE_ITEMS:
            break
    if not counts:
        return ""
    most = max(counts)
    bins = [edge - 0.5 for edge in range(0, most + 2)] if most <= 40 else [most * i / 40 for i in range(41)]
    chart = figures.histograms({"captions": counts}, bins=bins, xlabel="phrases per caption")
    top = [(phrase, n) for phrase, n in phrases.most_common(TOP_PHRASES)]
    return (f"<h3>Phrases in a sample</h3><p>{len(shards)} shards sampled, {len(counts):,} parsed captions, "
            f"{len(phrases):,} distinct phrases.</p><div class=\"charts\">{image(chart, 'phrases per caption')}</div>"
            + table(["most frequent phrase", "count"], top, text_columns=(0,)))
