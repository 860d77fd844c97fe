"""Are the pseudo-labels' names right? Per gold category, against hidden gold boxes.

The class-agnostic precision/recall of `evaluate.score_boxes` says whether a pseudo box lies on
an object; this says whether its phrase names that object's category, which is what a student
learns a word from ("two blue rings" names "ring", `policy_rating.names_category`). For each
category of the gold:

* `labels`: pseudo boxes whose phrase names the category; `right`: those of them on a gold box
  of that category (IoU >= `iou`); `precision` = right / labels;
* `gold`: the category's gold boxes on every gold image; `named`: those under a pseudo box whose phrase names the
  category (IoU >= `iou`); `recall` = named / gold.

Pseudo samples of images without gold are left out, as in `evaluate.pseudo_predictions`; a
gold image without a pseudo sample (dropped by the filter) has none of its boxes named.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

from pipeline.evaluation.evaluate import gold_image_id, gold_key_index
from pipeline.evaluation.policy_rating import names_category


def names_by_category(gold, pseudo_locations: Sequence[str], *, iou: float = 0.5) -> dict[str, dict]:
    """{category name: {labels, right, precision, gold, named, recall}} (see the module doc);
    `gold`: a pycocotools COCO of the labelled images."""
    import torch
    from torchvision.ops import box_iou  # plain areas, as pycocotools

    from pipeline.train.data.pseudo_stream import list_pseudo_shards, read_pseudo_shard

    names = {int(c["id"]): c["name"] for c in gold.dataset["categories"]}
    gold_boxes: dict[int, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for ann in gold.dataset["annotations"]:
        if not ann.get("iscrowd", 0):
            x, y, w, h = ann["bbox"]
            gold_boxes[int(ann["image_id"])][names[int(ann["category_id"])]].append([x, y, x + w, y + h])
    counts = {name: {"labels": 0, "right": 0, "gold": 0, "named": 0} for name in names.values()}
    labelled = set()
    index = gold_key_index(gold)
    for shard in list_pseudo_shards(pseudo_locations):
        for key, _, sample in read_pseudo_shard(shard):
            image_id = gold_image_id(index, str(sample.get("key", key)))
            if image_id is None or image_id in labelled:
                continue
            labelled.add(image_id)
            regions = sample.get("grounding", {}).get("regions", [])
            for name in counts:
                own = torch.tensor(gold_boxes[image_id][name], dtype=torch.float64).reshape(-1, 4)
                naming = [r for r in regions if names_category(str(r.get("phrase", "")), name)]
                boxes = torch.tensor([r["bbox"] for r in naming], dtype=torch.float64).reshape(-1, 4)
                overlap = (box_iou(boxes, own) >= iou).numpy()
                counts[name]["labels"] += len(boxes)
                counts[name]["right"] += int(overlap.any(axis=1).sum())
                counts[name]["named"] += int(overlap.any(axis=0).sum())
    for per_image in gold_boxes.values():  # every gold image counts: one without a sample has none named
        for name, boxes in per_image.items():
            counts[name]["gold"] += len(boxes)
    for entry in counts.values():
        entry["precision"] = round(entry["right"] / entry["labels"], 4) if entry["labels"] else None
        entry["recall"] = round(entry["named"] / entry["gold"], 4) if entry["gold"] else None
    return counts
