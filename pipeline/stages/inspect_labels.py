"""Looking at pseudo-labels: `pipeline show` (a gallery), `pipeline export` (COCO / ODVG) and
`pipeline stats` (the `_stats.json` numbers as a table).

All three read a pseudo-label (or filter) output folder: `DIR/pseudo/*.tar` (or a folder of
tars, or tar files) and `DIR/_stats.json`.

- `show DIR --out GALLERY [--n 64]`: the first N samples drawn with their boxes, phrase and
  score, as PNGs, plus `index.html`, a grid with each image's caption and regions.
- `export DIR --format coco|odvg --out FILE [--images-out IMAGES]`: COCO detection JSON (one
  category per distinct phrase head, the phrase's last word, or per phrase with `--category
  phrase`; image ids by order; scores kept on annotations) or ODVG JSONL (one line per sample:
  filename, height, width, grounding {caption, regions with bbox xyxy, phrase,
  tokens_positive}, the fields MMDetection's `ODVGDataset` reads). The images the labels
  name are written, as the tars hold them, to IMAGES (default `{FILE's stem}_images/` beside
  FILE), and `file_name`/`filename` is their path relative to FILE's folder: point a COCO
  loader's image root, or MMDetection's `data_root` (with `data_prefix=dict(img='')`), at
  FILE's folder. `--no-images` writes the labels alone (`file_name` = `{key}.{ext}`).
- `stats DIR`: stage, shards, samples, written, skip reasons with example keys, throughput.
"""

from __future__ import annotations

import html
import io
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Iterator, Optional

import typer
from PIL import Image, ImageDraw

from pipeline.io import storage
from pipeline.io.labels_io import iter_pseudo_samples
from pipeline.user_errors import user_errors

PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230), (128, 128, 0))


def pseudo_tars(location: str) -> list[str]:
    """The pseudo tars of an output folder (`DIR/pseudo/*.tar`), of a folder of tars, or a tar."""
    if location.endswith(".tar"):
        if not storage.exists(location):
            raise FileNotFoundError(f"{location}: not found")
        return [location]
    for folder in (storage.join(location, "pseudo"), location):
        if storage.is_dir(folder):
            tars = [storage.join(folder, n) for n in sorted(storage.list_names(folder)) if n.endswith(".tar") and not storage.is_temporary_name(n)]
            if tars:
                return tars
    raise FileNotFoundError(f"{location}: no pseudo .tar shards (expected DIR/pseudo/*.tar)")


def iter_samples(location: str) -> Iterator[tuple[str, str, bytes, dict]]:
    for tar in pseudo_tars(location):
        yield from iter_pseudo_samples(tar)


def draw_sample(image_bytes: bytes, sample: dict) -> Image.Image:
    """The image (EXIF-rotated, as labelled) with each region's box, phrase and score."""
    from pipeline.io.images import decode_rgb

    image = decode_rgb(image_bytes).image.copy()
    draw = ImageDraw.Draw(image)
    phrases: dict[str, int] = {}
    for region in sample["grounding"]["regions"]:
        colour = PALETTE[phrases.setdefault(region["phrase"], len(phrases)) % len(PALETTE)]
        x0, y0, x1, y1 = region["bbox"]
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=2)
        label = f"{region['phrase']} {region['score']:.2f}"
        text_box = draw.textbbox((x0, y0), label)
        top = max(0, y0 - (text_box[3] - text_box[1]) - 2)
        draw.rectangle((x0, top, x0 + text_box[2] - text_box[0] + 4, top + text_box[3] - text_box[1] + 2), fill=colour)
        draw.text((x0 + 2, top), label, fill=(255, 255, 255))
    return image


def write_gallery(location: str, out: Path, *, n: int = 64, title: str = "pseudo-labels") -> Path:
    """PNGs of the first `n` samples and an index.html grid; returns the index path."""
    out.mkdir(parents=True, exist_ok=True)
    cards = []
    for count, (key, _, image_bytes, sample) in enumerate(iter_samples(location)):
        if count >= n:
            break
        name = f"{key}.png"
        draw_sample(image_bytes, sample).save(out / name)
        regions = "".join(
            f"<li>{html.escape(r['phrase'])} <b>{r['score']:.2f}</b></li>" for r in sample["grounding"]["regions"]
        )
        cards.append(
            f'<figure><img src="{html.escape(name)}" alt="{html.escape(key)}"><figcaption><code>{html.escape(key)}</code> '
            f"{html.escape(sample['grounding']['caption'])}<ul>{regions}</ul></figcaption></figure>"
        )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:16px}}main{{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:12px}}
figure{{margin:0;border:1px solid #ddd;padding:6px}}img{{max-width:100%}}figcaption{{font-size:12px}}ul{{margin:4px 0;padding-left:16px}}</style>
</head><body><h1>{html.escape(title)}</h1><p>{len(cards)} samples from {html.escape(location)}</p><main>{''.join(cards)}</main></body></html>"""
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return index


def phrase_head(phrase: str) -> str:
    """The phrase's head for category names: its last word, lower-cased ("two blue rings" -> "rings")."""
    words = re.findall(r"[A-Za-z0-9]+", phrase.lower())
    return words[-1] if words else phrase.lower()


ImageSink = Callable[[str, str, bytes], str]  # (key, ext, bytes) -> the file name the labels give


def label_names_only(key: str, ext: str, _: bytes) -> str:
    """`{key}.{ext}` as in the tars, with no image written."""
    return f"{key}.{ext}"


def image_writer(images_out: Path, *, relative_to: Path) -> ImageSink:
    """Writes each image (the tar's bytes) to `images_out/{key}.{ext}`; returns its path relative
    to `relative_to` (the labels file's folder) with "/" separators."""
    prefix = Path(os.path.relpath(images_out.absolute(), relative_to.absolute())).as_posix()

    def write(key: str, ext: str, data: bytes) -> str:
        name = f"{key}.{ext}"
        storage.write_atomic(str(images_out / name), data)
        return name if prefix == "." else f"{prefix}/{name}"

    return write


def to_coco(location: str, *, category: str = "head", images_sink: ImageSink = label_names_only) -> dict:
    images, annotations, categories = [], [], {}
    for image_id, (key, ext, data, sample) in enumerate(iter_samples(location), start=1):
        file_name = images_sink(key, ext, data)
        images.append({"id": image_id, "file_name": file_name, "width": sample["width"], "height": sample["height"], "key": key})
        for region in sample["grounding"]["regions"]:
            name = phrase_head(region["phrase"]) if category == "head" else region["phrase"]
            category_id = categories.setdefault(name, len(categories) + 1)
            x0, y0, x1, y1 = region["bbox"]
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "category_id": category_id, "bbox": [x0, y0, x1 - x0, y1 - y0],
                 "area": (x1 - x0) * (y1 - y0), "iscrowd": 0, "score": region["score"], "phrase": region["phrase"]}
            )
    return {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": name} for name, i in categories.items()],
    }


def to_odvg(location: str, *, images_sink: ImageSink = label_names_only) -> Iterator[dict]:
    for key, ext, data, sample in iter_samples(location):
        filename = images_sink(key, ext, data)
        yield {"filename": filename, "height": sample["height"], "width": sample["width"], "grounding": sample["grounding"]}


def stats_table(stats: dict) -> str:
    shards = stats.get("shards", {})
    rows = [
        ("stage", stats.get("stage")),
        ("shards", f"{shards.get('total')} total, {shards.get('written')} written now, {shards.get('already_done')} already done, {shards.get('failed')} failed"),
        ("samples", stats.get("samples")),
        ("written", stats.get("written")),
    ]
    skip_keys = {"stage", "inputs", "out", "started_at", "finished_at", "shards", "samples", "written", "skipped", "throughput", "settings", "versions"}
    rows += [(name, value) for name, value in stats.items() if name not in skip_keys]
    for reason, entry in stats.get("skipped", {}).items():
        rows.append((f"skipped: {reason}", f"{entry['count']} (e.g. {', '.join(entry['examples'][:3])})"))
    for name, value in stats.get("throughput", {}).items():
        rows.append((f"throughput: {name}", value))
    for shard, reason in shards.get("failed_shards", {}).items():
        rows.append((f"failed shard {shard}", reason))
    width = max(len(str(name)) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


@user_errors(FileNotFoundError)
def show_command(
    location: str = typer.Argument(..., help="pseudo-label/filter output folder (or its pseudo/ folder, or a tar)."),
    out: Path = typer.Option(..., "--out", help="Gallery folder: PNGs and index.html."),
    n: int = typer.Option(64, "--n", min=1, help="Samples to draw."),
) -> None:
    """Draw pseudo-labelled images with their boxes and phrases, and an index.html grid."""
    index = write_gallery(location, out, n=n)
    print(f"show: {index}")


@user_errors(FileNotFoundError, storage.UnwritableOutput)
def export_command(
    location: str = typer.Argument(..., help="pseudo-label/filter output folder (or its pseudo/ folder, or a tar)."),
    format: str = typer.Option(..., "--format", help="coco or odvg."),
    out: Path = typer.Option(..., "--out", help="Output file (.json for coco, .jsonl for odvg)."),
    category: str = typer.Option("head", "--category", help="coco: one category per phrase 'head' or per 'phrase'."),
    images_out: Optional[Path] = typer.Option(
        None, "--images-out", help="Folder for the labelled images (default: {out stem}_images/ beside --out)."
    ),
    images: bool = typer.Option(True, "--images/--no-images", help="Write the images (--no-images: labels only)."),
) -> None:
    """Export pseudo-labels as COCO detection JSON or ODVG JSONL, with the images they name."""
    if format not in ("coco", "odvg") or category not in ("head", "phrase"):
        raise typer.BadParameter("--format must be coco or odvg, --category head or phrase")
    storage.ensure_writable_folder(str(out.absolute().parent))
    sink = label_names_only
    if images:
        images_out = images_out or out.with_name(f"{out.stem}_images")
        storage.ensure_writable_folder(str(images_out.absolute()), option="--images-out")
        sink = image_writer(images_out, relative_to=out.absolute().parent)
    buffer = io.StringIO()
    if format == "coco":
        data = to_coco(location, category=category, images_sink=sink)
        json.dump(data, buffer)
        count = len(data["images"])
    else:
        count = 0
        for line in to_odvg(location, images_sink=sink):
            buffer.write(json.dumps(line) + "\n")
            count += 1
    storage.write_atomic(str(out), buffer.getvalue().encode("utf-8"))
    print(f"export: {count} samples -> {out}" + (f", images in {images_out}" if images else ""))


@user_errors(FileNotFoundError)
def stats_command(location: str = typer.Argument(..., help="A stage output folder (with _stats.json).")) -> None:
    """Print a stage's _stats.json as a readable table."""
    uri = storage.join(location, "_stats.json") if not location.endswith(".json") else location
    if not storage.exists(uri):
        raise FileNotFoundError(f"{uri}: not found (the stage writes it when it finishes)")
    print(stats_table(json.loads(storage.read_bytes(uri))))

