"""The gold sources, read whole at construction and indexed by position.

* `coco`: COCO detection JSON + image folder, turned into grounding prompts of class names with
  random negative classes per sample (GLIP's od_to_grounding, `model.training.train_targets.detection_caption`);
* `grounding`: MDETR/GoldG JSON (COCO layout; each image has a `caption`, each box
  `tokens_positive` spans into it);
* `odvg`: ODVG JSONL (MM-Grounding-DINO): lines with `grounding` (caption + regions) or
  `detection` (instances with a `category` name) records.
"""

from __future__ import annotations

import json
import os

import torch

from model.training.train_targets import xywh_to_xyxy
from pipeline.train.data.records import (
    Record,
    grounding_record,
    image_location,
    parse_boxes,
    parse_spans,
    read_json,
    read_text,
)
from pipeline.train.data.specs import TrainDataError


class InMemorySource:
    """A gold source read whole at construction: `records` indexed by position."""

    kind: str
    records: list[Record]

    def __len__(self) -> int:
        return len(self.records)

    def record(self, index: int) -> Record:
        return self.records[index]


def _coco_layout(annotations: str, *, needs: tuple[str, ...], what: str) -> tuple[dict, dict[int, list[dict]]]:
    """The JSON of a COCO-layout file and its annotations grouped by image id."""
    data = read_json(annotations)
    if not isinstance(data, dict) or any(name not in data for name in needs):
        raise TrainDataError(f"{annotations}: not a {what} (needs {', '.join(needs)})")
    per_image: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        per_image.setdefault(int(ann["image_id"]), []).append(ann)
    return data, per_image


def _image_record(image: dict, anns: list[dict], *, images: str, where: str, **fields) -> Record:
    """The record of one `images` entry of a COCO-layout file and its annotations (boxes xywh)."""
    return Record(
        key=str(image["id"]),
        image=image_location(images, image["file_name"]),
        boxes=xywh_to_xyxy(torch.from_numpy(parse_boxes([a["bbox"] for a in anns], where))).numpy(),
        width=image.get("width"),
        height=image.get("height"),
        **fields,
    )


class CocoDetectionSource(InMemorySource):
    """COCO instances JSON + image folder as detection records (crowd boxes and images
    without boxes left out, as GLIP's COCO training set does)."""

    kind = "coco"

    def __init__(self, *, annotations: str, images: str) -> None:
        data, per_image = _coco_layout(
            annotations, needs=("images", "annotations", "categories"), what="COCO detection file"
        )
        names = {int(c["id"]): str(c["name"]) for c in data["categories"]}
        self.vocabulary = [names[i] for i in sorted(names)]
        self.records = []
        for image in data["images"]:
            anns = [a for a in per_image.get(int(image["id"]), []) if not a.get("iscrowd", 0)]
            if not anns:
                continue
            where = f"{annotations}: image {image['id']}"
            unknown = [a["category_id"] for a in anns if int(a["category_id"]) not in names]
            if unknown:
                raise TrainDataError(f"{where}: category ids {unknown} are not in 'categories'")
            self.records.append(
                _image_record(
                    image, anns, images=images, where=where,
                    box_names=[names[int(a["category_id"])] for a in anns], vocabulary=self.vocabulary,
                )
            )
        if not self.records:
            raise TrainDataError(f"{annotations}: no image with a non-crowd box")


class GroundingJsonSource(InMemorySource):
    """MDETR/GoldG grounding JSON: COCO layout with `caption` per image and `tokens_positive`
    per box (boxes xywh)."""

    kind = "grounding"

    def __init__(self, *, annotations: str, images: str) -> None:
        data, per_image = _coco_layout(annotations, needs=("images", "annotations"), what="grounding JSON")
        self.records = []
        for image in data["images"]:
            where = f"{annotations}: image {image.get('id')}"
            if "caption" not in image:
                raise TrainDataError(f"{where}: no 'caption' (MDETR/GoldG layout expected)")
            caption = str(image["caption"])
            anns = per_image.get(int(image["id"]), [])
            for ann in anns:
                if "tokens_positive" not in ann:
                    raise TrainDataError(f"{where}: annotation {ann.get('id')} has no 'tokens_positive'")
            self.records.append(
                _image_record(
                    image, anns, images=images, where=where,
                    caption=caption, spans=[parse_spans(a["tokens_positive"], caption, where) for a in anns],
                )
            )
        if not self.records:
            raise TrainDataError(f"{annotations}: no images")


class OdvgSource(InMemorySource):
    """ODVG JSONL (one JSON object per line: `filename`, `height`, `width`, and `grounding`
    {caption, regions[bbox xyxy, phrase, tokens_positive]} or `detection` {instances[bbox xyxy,
    label, category]}). Detection lines need a `category` per instance or a label map."""

    kind = "odvg"

    def __init__(self, *, annotations: str, images: str, label_map: dict[str, str] | None = None) -> None:
        self.records = []
        self.label_map = label_map
        self._categories: dict[str, None] = {}
        detection_records = []
        for number, line in enumerate(read_text(annotations).splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{annotations}: line {number}"
            try:
                sample = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TrainDataError(f"{where}: not valid JSON: {exc}") from None
            if "filename" not in sample:
                raise TrainDataError(f"{where}: no 'filename'")
            image = image_location(images, sample["filename"])
            key = os.path.splitext(os.path.basename(sample["filename"]))[0]
            if "grounding" in sample:
                self.records.append(grounding_record(sample, key=key, image=image, where=where))
            elif "detection" in sample:
                record = self._detection_record(sample, key=key, image=image, where=where)
                if record is not None:
                    detection_records.append(record)
                    self.records.append(record)
            else:
                raise TrainDataError(f"{where}: neither 'grounding' nor 'detection'")
        vocabulary = list(label_map.values()) if label_map else list(self._categories)
        for record in detection_records:
            record.vocabulary = vocabulary
        if not self.records:
            raise TrainDataError(f"{annotations}: no usable lines")

    def _detection_record(self, sample: dict, *, key: str, image: str, where: str) -> Record | None:
        """A detection line's record (None when it has no instance); names its categories."""
        instances = sample["detection"].get("instances", [])
        names = []
        for instance in instances:
            name = instance.get("category")
            if name is None and self.label_map is not None:
                name = self.label_map.get(str(instance.get("label")))
            if name is None:
                raise TrainDataError(f"{where}: instance without 'category' and no label map for {instance.get('label')!r}")
            names.append(str(name))
            self._categories[str(name)] = None
        if not instances:
            return None
        return Record(
            key=key,
            image=image,
            boxes=parse_boxes([i.get("bbox") for i in instances], where),
            box_names=names,
            width=sample.get("width"),
            height=sample.get("height"),
        )
