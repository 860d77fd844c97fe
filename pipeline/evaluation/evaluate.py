"""`pipeline eval`: zero-shot COCO detection AP of a teacher, and pseudo-label quality.

Model evaluation follows GLIP's COCO protocol (`engine/inference.py`): the prompt is the
dataset's class names in category-id order, "person. bicycle. car. ..." (split into several
prompts when they exceed 256 tokens, as LVIS chunked evaluation does; OWLv2 gets one query per
name, as its own COCO evaluation does); each detection's phrase
is its category; boxes go to pycocotools as [x, y, x1 - x0 + 1, y1 - y0 + 1] (the official
`BoxList.convert("xywh")`), up to 100 per image; the table is COCOeval's AP, AP50, AP75,
APs, APm, APl.

The same scoring function, `score_boxes`, rates pseudo-labels against gold boxes when the
gold exists: class-agnostic AP plus precision and recall at IoU 0.5 (greedy one-to-one
matching by descending score, the way COCOeval matches).
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import typer

from pipeline.user_errors import user_errors

AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


class EvalError(ValueError):
    """Evaluation input that cannot be used (names the file and the reason)."""


@dataclass(frozen=True)
class EvalResult:
    """COCOeval summary (fractions in [0, 1]; -1 where a size range has no gold box) plus
    precision/recall at IoU 0.5, and the counts they come from."""

    ap: dict[str, float]
    precision50: float
    recall50: float
    num_predictions: int
    num_gold: int
    num_images: int
    category_ap: dict[str, float] = field(default_factory=dict)  # AP@[.5:.95] per category name

    def group_ap(self, names: Sequence[str]) -> float:
        """Mean AP over the categories `names` that have gold boxes (COCOeval's mean over classes)."""
        values = [self.category_ap[n] for n in names if self.category_ap.get(n, -1.0) >= 0]
        return float(np.mean(values)) if values else -1.0

    def as_dict(self) -> dict[str, float | int]:
        return {
            **self.ap,
            "category_ap": dict(self.category_ap),
            "precision50": self.precision50,
            "recall50": self.recall50,
            "num_predictions": self.num_predictions,
            "num_gold": self.num_gold,
            "num_images": self.num_images,
        }


def load_gold(annotations: str | Path):
    """pycocotools COCO object of an instances JSON, quietly (it prints on load)."""
    from pycocotools.coco import COCO

    path = Path(annotations)
    if not path.is_file():
        raise EvalError(f"{path}: annotation file not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise EvalError(f"{path}: not valid JSON: {exc}") from None
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise EvalError(f"{path}: not a COCO detection file (no '{key}')")
    gold = COCO()
    gold.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        gold.createIndex()
    return gold


def xyxy_to_coco(box: Sequence[float]) -> list[float]:
    """Legacy xyxy -> COCO [x, y, w, h] with the "+1" width of `BoxList.convert("xywh")`."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return [x0, y0, x1 - x0 + 1, y1 - y0 + 1]


def class_agnostic_gold(gold):
    """A copy of `gold` where every box has category 1."""
    from pycocotools.coco import COCO

    data = dict(gold.dataset)
    data["annotations"] = [{**a, "category_id": 1} for a in gold.dataset["annotations"]]
    data["categories"] = [{"id": 1, "name": "object"}]
    agnostic = COCO()
    agnostic.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        agnostic.createIndex()
    return agnostic


def _iou_xywh(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU [N, M] of COCO boxes (pycocotools' plain-area convention)."""
    from pycocotools import mask as mask_utils

    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    return np.asarray(mask_utils.iou(a.tolist(), b.tolist(), [0] * len(b)))


def precision_recall_at(gold, predictions: Sequence[dict], *, iou: float = 0.5, class_agnostic: bool) -> tuple[float, float]:
    """Greedy one-to-one matching per image (and category unless class-agnostic), predictions
    by descending score; crowd gold boxes neither count as misses nor make matches."""
    matched_pred = 0
    matched_gold = 0
    total_gold = 0
    by_image: dict[int, list[dict]] = {}
    for prediction in predictions:
        by_image.setdefault(int(prediction["image_id"]), []).append(prediction)
    for image_id in gold.getImgIds():
        anns = [a for a in gold.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        total_gold += len(anns)
        preds = sorted(by_image.get(image_id, []), key=lambda p: -p["score"])
        allowed = None
        if not class_agnostic:
            allowed = np.asarray([[p["category_id"] == a["category_id"] for a in anns] for p in preds], dtype=bool)
        matches = greedy_matches([p["bbox"] for p in preds], [a["bbox"] for a in anns], allowed=allowed, iou=iou)
        matched_pred += int((matches >= 0).sum())
        matched_gold += int((matches >= 0).sum())
    precision = matched_pred / len(predictions) if predictions else 0.0
    recall = matched_gold / total_gold if total_gold else 0.0
    return precision, recall


def greedy_matches(
    predictions: Sequence[Sequence[float]],
    gold: Sequence[Sequence[float]],
    *,
    allowed: np.ndarray | None = None,
    iou: float = 0.5,
) -> np.ndarray:
    """The gold box each prediction matches (-1: none), the way COCOeval matches one image.

    predictions: COCO [x, y, w, h] boxes sorted by descending score; gold: COCO boxes;
    allowed: optional bool [P, G], False where a pair may not match (another category). Each
    prediction takes the unmatched gold box of highest IoU >= `iou`. Because the matching is
    greedy in score order, the matches of the boxes above any score threshold are a prefix of
    these: one call gives the whole precision/recall curve.
    """
    matches = np.full(len(predictions), -1, dtype=np.int64)
    if len(predictions) == 0 or len(gold) == 0:
        return matches
    ious = _iou_xywh(np.asarray(predictions, dtype=np.float64), np.asarray(gold, dtype=np.float64))
    if allowed is not None:
        ious = np.where(allowed, ious, 0.0)
    taken = np.zeros(len(gold), dtype=bool)
    for index, row in enumerate(ious):
        candidates = np.where(~taken & (row >= iou), row, -1.0)
        best = int(candidates.argmax())
        if candidates[best] >= iou:
            taken[best] = True
            matches[index] = best
    return matches


def score_boxes(gold, predictions: Sequence[dict], *, class_agnostic: bool = False) -> EvalResult:
    """Rate predictions against gold boxes.

    gold: pycocotools COCO; predictions: dicts with image_id, category_id, bbox COCO
    [x, y, w, h], score. Only images of `gold` are scored. class_agnostic: every box is one
    class (pseudo-labels name free phrases, not the gold categories).
    """
    from pycocotools.cocoeval import COCOeval

    image_ids = set(gold.getImgIds())
    predictions = [p for p in predictions if int(p["image_id"]) in image_ids]
    if class_agnostic:
        gold = class_agnostic_gold(gold)
        predictions = [{**p, "category_id": 1} for p in predictions]
    num_gold = sum(1 for a in gold.dataset["annotations"] if not a.get("iscrowd", 0))
    precision, recall = precision_recall_at(gold, predictions, class_agnostic=class_agnostic)
    if predictions:
        with contextlib.redirect_stdout(io.StringIO()):
            detections = gold.loadRes([dict(p) for p in predictions])
            evaluator = COCOeval(gold, detections, iouType="bbox")
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        ap = {key: float(value) for key, value in zip(AP_KEYS, evaluator.stats[:6])}
        category_ap = _per_category_ap(gold, evaluator)
    else:
        ap = {key: 0.0 for key in AP_KEYS}
        category_ap = {c["name"]: 0.0 for c in gold.dataset["categories"]}
    return EvalResult(
        ap=ap,
        precision50=precision,
        recall50=recall,
        num_predictions=len(predictions),
        num_gold=num_gold,
        num_images=len(image_ids),
        category_ap=category_ap,
    )


def _per_category_ap(gold, evaluator) -> dict[str, float]:
    """AP@[.5:.95] of each category (all areas, 100 detections), -1 without gold boxes: the
    per-class means that COCOeval's summary AP averages."""
    precision = evaluator.eval["precision"]  # [T, R, K, A, M]
    names = {int(c["id"]): c["name"] for c in gold.dataset["categories"]}
    result = {}
    for k, category_id in enumerate(evaluator.params.catIds):
        values = precision[:, :, k, 0, -1]
        values = values[values > -1]
        result[names[int(category_id)]] = float(values.mean()) if values.size else -1.0
    return result


def evaluate_model(
    predictor,
    annotations: str | Path,
    images: str | Path,
    *,
    batch_size: int = 2,
    max_images: int | None = None,
    progress: bool = False,
) -> EvalResult:
    """Zero-shot COCO detection of a teacher (`model.teachers.teacher.Teacher`; class names as the prompt)."""
    from PIL import Image, UnidentifiedImageError

    from model.inputs.text import detection_prompt

    gold = load_gold(annotations)
    categories = sorted(gold.dataset["categories"], key=lambda c: c["id"])
    category_ids = [int(c["id"]) for c in categories]
    caption, spans = detection_prompt([c["name"] for c in categories])
    image_infos = sorted(gold.dataset["images"], key=lambda i: i["id"])
    if max_images is not None:
        image_infos = image_infos[:max_images]
        keep = {int(i["id"]) for i in image_infos}
        gold = _subset(gold, keep)
    predictions: list[dict] = []
    started = time.perf_counter()
    for start in range(0, len(image_infos), batch_size):
        chunk = image_infos[start : start + batch_size]
        pictures = []
        for info in chunk:
            path = Path(images) / info["file_name"]
            try:
                picture = Image.open(path)
                pictures.append(picture.convert("RGB"))
            except FileNotFoundError:
                raise EvalError(f"{path}: image of image id {info['id']} not found") from None
            except (UnidentifiedImageError, OSError) as exc:
                raise EvalError(f"{path}: cannot be decoded: {exc}") from None
        results = predictor.predict(pictures, [caption] * len(chunk), [spans] * len(chunk))
        for info, detections in zip(chunk, results):
            for box, score, phrase in zip(detections.boxes.tolist(), detections.scores.tolist(), detections.phrase_ids.tolist()):
                predictions.append(
                    {"image_id": int(info["id"]), "category_id": category_ids[phrase], "bbox": xyxy_to_coco(box), "score": float(score)}
                )
        if progress:
            done = start + len(chunk)
            rate = done / max(time.perf_counter() - started, 1e-9)
            eta = (len(image_infos) - done) / rate
            print(f"eval: {done}/{len(image_infos)} images, {rate:.2f} img/s, ETA {eta:.0f}s", file=sys.stderr, flush=True)
    return score_boxes(gold, predictions)


def _subset(gold, image_ids: set[int]):
    from pycocotools.coco import COCO

    data = dict(gold.dataset)
    data["images"] = [i for i in gold.dataset["images"] if int(i["id"]) in image_ids]
    data["annotations"] = [a for a in gold.dataset["annotations"] if int(a["image_id"]) in image_ids]
    subset = COCO()
    subset.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        subset.createIndex()
    return subset


def pseudo_predictions(gold, pseudo_locations: Sequence[str], *, min_score: float = 0.0) -> list[dict]:
    """Pseudo-label boxes as class-agnostic predictions on the gold images they label.

    A pseudo sample matches a gold image when its key equals the image id (as text, leading
    zeros ignored) or the image file's stem; samples without gold are left out.
    """
    from pipeline.train.data.pseudo_stream import list_pseudo_shards, read_pseudo_shard

    index = gold_key_index(gold)
    predictions = []
    for shard in list_pseudo_shards(pseudo_locations):
        for key, _, sample in read_pseudo_shard(shard):
            name = str(sample.get("key", key))
            image_id = gold_image_id(index, name)
            if image_id is None:
                continue
            for region in sample.get("grounding", {}).get("regions", []):
                score = float(region.get("score", 1.0))
                if score >= min_score:
                    predictions.append({"image_id": image_id, "category_id": 1, "bbox": xyxy_to_coco(region["bbox"]), "score": score})
    return predictions


def gold_key_index(gold) -> dict[str, int]:
    """Sample key -> gold image id: the id as text and the image file's stem both name an image."""
    index: dict[str, int] = {}
    for info in gold.dataset["images"]:
        index[str(int(info["id"]))] = int(info["id"])
        index[Path(info["file_name"]).stem] = int(info["id"])
    return index


def gold_image_id(index: dict[str, int], key: str) -> int | None:
    """The gold image a shard key names (leading zeros of a numeric key ignored), or None."""
    found = index.get(key)
    return found if found is not None else index.get(key.lstrip("0") or "0")


def format_table(result: EvalResult, *, title: str) -> str:
    rows = [f"{title}", f"{'metric':<12}{'value':>8}"]
    for key in AP_KEYS:
        rows.append(f"{key:<12}{100 * result.ap[key]:>8.1f}")
    rows.append(f"{'P@0.5':<12}{100 * result.precision50:>8.1f}")
    rows.append(f"{'R@0.5':<12}{100 * result.recall50:>8.1f}")
    rows.append(f"images {result.num_images}, gold boxes {result.num_gold}, predictions {result.num_predictions}")
    return "\n".join(rows)


@user_errors(FileNotFoundError, ValueError)  # EvalError, CheckpointError, a missing or wrong teacher
def evaluate(
    coco: Path = typer.Option(..., "--coco", help="COCO instances JSON with the gold boxes."),
    model: Optional[str] = typer.Option(
        None, "--model", help="Teacher to evaluate zero-shot: GLIP checkpoint, or hf:FOLDER (Grounding DINO, OWLv2)."
    ),
    images: Optional[Path] = typer.Option(None, "--images", help="Image folder of the COCO JSON (with --model)."),
    pseudo: list[str] = typer.Option([], "--pseudo", help="Pseudo shard folder/tar to rate against the gold (repeatable)."),
    min_score: float = typer.Option(0.0, help="With --pseudo: only regions scoring at least this."),
    config: str = typer.Option("auto", help="GLIP: auto (from the checkpoint) or a variant name."),
    min_size: Optional[int] = typer.Option(None, help="Test-time short side (default: the checkpoint's, 800)."),
    max_size: Optional[int] = typer.Option(None, help="Test-time long-side cap (default 1333)."),
    batch_size: int = typer.Option(2, help="Images per forward."),
    max_images: Optional[int] = typer.Option(None, help="Evaluate only the first N images (by id)."),
    device: str = typer.Option("auto", help="auto (cuda when available), cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (AP, AP50, AP75, APs, APm, APl, ...)."),
) -> None:
    """Zero-shot COCO AP of a teacher (--model), or pseudo-label precision/recall (--pseudo)."""
    if (model is None) == (not pseudo):
        raise typer.BadParameter("give either --model CKPT (with --images) or --pseudo DIR")
    provenance = {}
    if model is not None:
        if images is None or not images.is_dir():
            raise typer.BadParameter(f"--images {images}: image folder not found")
        from pipeline.stages.teachers import inspect_teacher, load_teacher, resolve_device

        source = inspect_teacher(model, config=config, min_size=min_size, max_size=max_size)
        predictor = load_teacher(source, device=resolve_device(device))
        result = evaluate_model(predictor, coco, images, batch_size=batch_size, max_images=max_images, progress=not as_json)
        title = f"zero-shot COCO detection: {source.identity.name} ({source.kind}) on {coco.name}"
        provenance = {"teacher": source.to_dict()}
    else:
        gold = load_gold(coco)
        result = score_boxes(gold, pseudo_predictions(gold, pseudo, min_score=min_score), class_agnostic=True)
        title = f"pseudo-labels vs gold ({coco.name}), class-agnostic"
    if as_json:
        typer.echo(json.dumps({**result.as_dict(), **provenance}))
    else:
        typer.echo(format_table(result, title=title))
