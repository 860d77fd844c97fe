"""`pipeline ground`: try a teacher (GLIP checkpoint, or hf:FOLDER of Grounding DINO / OWLv2) on one
image and one caption.

Phrases come from `nlp/` (the same extractor parse-captions uses) or from `--span START:END`
given by hand. Detections are printed as a table, or as JSON with `--json`: boxes xyxy in the
original image's pixels, the official score, the phrase text and its character span.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from pipeline.user_errors import user_errors


def parse_span(text: str, caption: str) -> tuple[int, int]:
    try:
        start_text, end_text = text.split(":")
        start, end = int(start_text), int(end_text)
    except ValueError:
        raise typer.BadParameter(f"--span {text!r}: expected START:END, e.g. 0:5") from None
    if not 0 <= start < end <= len(caption):
        raise typer.BadParameter(
            f"--span {text!r}: must satisfy 0 <= START < END <= {len(caption)} (caption length)"
        )
    return start, end


@user_errors(FileNotFoundError, ValueError)  # CheckpointError, a missing or wrong teacher
def ground(
    image: Path = typer.Argument(..., help="Image file (any format PIL reads)."),
    caption: str = typer.Argument(..., help="Caption whose phrases to ground."),
    teacher: str = typer.Option(
        ..., "--teacher", help="GLIP checkpoint (.pth or .safetensors), or hf:FOLDER of a saved Grounding DINO / OWLv2."
    ),
    config: str = typer.Option("auto", help="GLIP: auto (from the file) or glip-t-a, glip-t, glip-l, tiny."),
    span: list[str] = typer.Option([], "--span", help="Phrase span START:END (repeatable); default: nlp phrases."),
    mode: str = typer.Option("noun-chunks", help="Phrase extractor mode when no --span is given."),
    min_size: Optional[int] = typer.Option(None, help="Test-time short side (default: the checkpoint's, 800)."),
    max_size: Optional[int] = typer.Option(None, help="Test-time long-side cap (default 1333)."),
    threshold: float = typer.Option(0.5, help="Print detections scoring above this."),
    phrase_score: str = typer.Option(
        "mean", "--phrase-score", help="A phrase's score from its tokens' probabilities: mean (official) or max."
    ),
    device: str = typer.Option("auto", help="auto (cuda when available), cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Ground the phrases of CAPTION in IMAGE with a teacher."""
    from PIL import Image, UnidentifiedImageError

    from pipeline.stages.teachers import inspect_teacher, load_teacher, resolve_device

    if not image.is_file():
        raise typer.BadParameter(f"{image}: image file not found", param_hint="IMAGE")
    try:
        picture = Image.open(image)
        picture.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise typer.BadParameter(f"{image}: cannot be decoded as an image: {exc}", param_hint="IMAGE") from None

    if phrase_score not in ("mean", "max"):
        raise typer.BadParameter(f"{phrase_score!r}: choose mean or max", param_hint="--phrase-score")
    if span:
        spans = [parse_span(s, caption) for s in span]
    else:
        spans = _phrase_spans(caption, mode)
    if not spans:
        raise ValueError(f"no groundable phrase found in {caption!r}; give one with --span START:END")

    source = inspect_teacher(teacher, config=config, min_size=min_size, max_size=max_size)
    predictor = load_teacher(source, device=resolve_device(device), phrase_score=phrase_score)

    detections = predictor.predict([picture], [caption], [spans])[0].above(threshold).sorted()
    rows = [
        {
            "box": [round(float(v), 2) for v in box],
            "score": round(float(score), 4),
            "phrase": caption[spans[pid][0] : spans[pid][1]],
            "span": list(spans[pid]),
        }
        for box, score, pid in zip(detections.boxes.tolist(), detections.scores.tolist(), detections.phrase_ids.tolist())
    ]
    if as_json:
        result = {
            "image": str(image),
            "width": picture.width,
            "height": picture.height,
            "caption": caption,
            "phrases": [{"phrase": caption[a:b], "span": [a, b]} for a, b in spans],
            "teacher": source.to_dict(),
            "threshold": threshold,
            "detections": rows,
        }
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
        return
    typer.echo(f"{image} ({picture.width}x{picture.height}), {len(spans)} phrases, "
               f"{len(rows)} detections above {threshold}:")
    for row in rows:
        x0, y0, x1, y1 = row["box"]
        typer.echo(f"  {row['score']:.3f}  [{x0:8.1f} {y0:8.1f} {x1:8.1f} {y1:8.1f}]  {row['phrase']!r} {row['span']}")


def _phrase_spans(caption: str, mode: str) -> list[tuple[int, int]]:
    from nlp.phrases import ExtractorSettings, PhraseExtractor

    # Spans must index the caption exactly as the user typed it, not a cleaned copy.
    extractor = PhraseExtractor(settings=ExtractorSettings.for_mode(mode, spans_into="source"))
    result = extractor.extract(caption)
    return [(p.start, p.end) for p in result.phrases if caption[p.start : p.end] == p.text]
