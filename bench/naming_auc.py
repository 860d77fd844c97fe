"""Does a teacher tell its words apart? Per-category AUC of a detector's scores on a COCO split.

    python bench/naming_auc.py --teacher runs/demo/teacher/student.pth \
        --annotations runs/demo/world/test/instances.json --images runs/demo/world/test/images

The category names form the prompt (as in `pipeline eval`). For every gold box and every
category, the box's score under that category is the best score of that category's detections
overlapping it at IoU >= 0.5 (0 if none). A category's AUC is the chance that one of its own
boxes scores higher under its name than a box of another category does: 0.5 means the word is
matched to objects at random (its score is objectness plus a fixed offset), 1.0 that it ranks
all of its objects first. Unlike "the top-scored name per box", it does not follow the fixed
offsets between words. AP can be well above zero at AUC 0.5: localisation and the offsets
carry it. Prints one line per category, then the mean.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.ops import box_iou


def box_scores(teacher, annotations: Path, images: Path, *, max_images: int | None = None):
    """([N, C] score of every gold box under every category, [N] its category index, names)."""
    from model.inputs.text import detection_prompt

    gold = json.loads(annotations.read_text())
    categories = sorted(gold["categories"], key=lambda c: c["id"])
    names = [c["name"] for c in categories]
    index_of = {int(c["id"]): i for i, c in enumerate(categories)}
    caption, spans = detection_prompt(names)
    by_image: dict[int, list[dict]] = {}
    for ann in gold["annotations"]:
        by_image.setdefault(int(ann["image_id"]), []).append(ann)
    infos = sorted(gold["images"], key=lambda i: i["id"])[:max_images]
    rows, labels = [], []
    for info in infos:
        with Image.open(images / info["file_name"]) as picture:
            [found] = teacher.predict([picture.convert("RGB")], [caption], [spans])
        for ann in by_image.get(int(info["id"]), []):
            x, y, w, h = ann["bbox"]
            row = np.zeros(len(names))
            if len(found):
                overlap = box_iou(torch.tensor([[x, y, x + w, y + h]], dtype=torch.float32), found.boxes)[0] >= 0.5
                for j in range(len(names)):
                    hit = overlap & (found.phrase_ids == j)
                    if bool(hit.any()):
                        row[j] = float(found.scores[hit].max())
            rows.append(row)
            labels.append(index_of[int(ann["category_id"])])
    return np.array(rows).reshape(-1, len(names)), np.array(labels, dtype=np.int64), names


def category_auc(scores: np.ndarray, labels: np.ndarray) -> list[float | None]:
    """Per category: P(own box scores higher than another category's box), ties count half;
    None where the category has no box or every box is of it."""
    aucs: list[float | None] = []
    for j in range(scores.shape[1]):
        own, other = scores[labels == j, j], scores[labels != j, j]
        if not len(own) or not len(other):
            aucs.append(None)
            continue
        greater = (own[:, None] > other[None, :]).mean()
        ties = (own[:, None] == other[None, :]).mean()
        aucs.append(float(greater + 0.5 * ties))
    return aucs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="a GLIP checkpoint (official or ours)")
    parser.add_argument("--annotations", required=True, type=Path, help="COCO instances JSON")
    parser.add_argument("--images", required=True, type=Path, help="folder of its images")
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--min-size", type=int, default=128)
    parser.add_argument("--max-size", type=int, default=192)
    args = parser.parse_args()

    from model.inference.predict import GLIPPredictor

    teacher = GLIPPredictor.from_checkpoint(args.teacher, min_size=args.min_size, max_size=args.max_size)
    teacher.postprocessor.detections_per_img = 1000  # every category's boxes, not only the top ones
    scores, labels, names = box_scores(teacher, args.annotations, args.images, max_images=args.max_images)
    aucs = category_auc(scores, labels)
    for name, auc in zip(names, aucs):
        print(f"{name:>20s}  AUC {'-' if auc is None else f'{auc:.2f}'}  boxes {int((labels == names.index(name)).sum())}")
    known = [a for a in aucs if a is not None]
    print(f"mean AUC {np.mean(known):.3f} over {len(known)} categories, {len(labels)} gold boxes (0.5: words matched at random)")


if __name__ == "__main__":
    main()
