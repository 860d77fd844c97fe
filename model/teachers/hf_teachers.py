"""Grounding DINO and OWLv2 as teachers, through transformers, from saved model folders only.

A teacher folder is what `save_pretrained` writes for the model and for its processor
(`config.json`, the weights, the processor and tokenizer files). Loading never reaches a hub
(`local_files_only=True`). Each model runs with its own processor (resizing, normalising,
tokenising) and transformers' own post-processing (box format and rescaling to the original
pixels); what is added here is only how phrases become the model's text input and how the
model's per-token or per-query scores become a score per phrase:

- Grounding DINO reads the caption itself, with a "." appended as its preprocessing does; a
  phrase's score for a query is the mean of the sigmoid token probabilities over the phrase's
  tokens (the official `token_spans` grounding: a row-normalised positive map times the
  probabilities; `score_agg="MAX"`: the best token of the phrase, as transformers'
  post-processing scores a query over the whole text). Every (query, phrase) pair is a
  candidate box; the best `max_detections` are kept. A caption longer than the model's
  `max_text_len` tokens is split into prompts built from its phrases ("a dog. a red ball.").
- OWLv2 reads one text query per phrase. Each predicted box keeps its best query (score and
  label of `post_process_grounded_object_detection`). Queries of a batch are padded per image
  with empty queries (token ids 0, which the model masks out; the processor's own padding
  query " " would be a real query). More than `max_queries` phrases run in several passes and
  each box keeps its best phrase over all passes (OWLv2's boxes do not depend on the text).
  A phrase longer than the text model's 16 positions is truncated by the tokenizer.

Boxes are clipped to the image, then boxes under `MIN_BOX_SIDE` pixels are dropped (counted).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Sequence

import torch
from PIL import Image

from model.teachers.teacher import (
    MIN_BOX_SIDE,
    Detections,
    Span,
    TeacherIdentity,
    check_batch,
    entity_spans,
    merge_detections,
)
from model.inputs.text import positive_map_from_spans, split_prompt

MODEL_TYPES = {"grounding-dino": "GroundingDinoForObjectDetection", "owlv2": "Owlv2ForObjectDetection"}
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


class HFTeacherError(ValueError):
    """A teacher folder that is not a saved, supported transformers model (names folder and reason)."""


@dataclass(frozen=True)
class HFModelInfo:
    """What `inspect_hf_model` reads from a folder: the model type and the identity."""

    model_type: str
    identity: TeacherIdentity


def inspect_hf_model(
    folder: str, *, name: str | None = None, min_size: int | None = None, max_size: int | None = None
) -> HFModelInfo:
    """Check a saved model folder and work out its identity; reads only small files and hashes the weights.

    name: what the identity calls the model (default: the folder's name). min_size/max_size:
    test-time sizes replacing the processor's (Grounding DINO only: OWLv2 runs at its square size).
    """
    label = name or os.path.basename(os.path.normpath(folder))
    if not os.path.isdir(folder):
        raise HFTeacherError(f"{folder}: teacher folder not found")
    config = _read_json(folder, "config.json", hint="not a saved transformers model (save_pretrained writes it)")
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise HFTeacherError(
            f"{folder}/config.json: model_type {model_type!r} is not a supported teacher "
            f"({', '.join(MODEL_TYPES)}); GLIP checkpoints are given without the hf: prefix"
        )
    weights = sorted(n for n in os.listdir(folder) if n.endswith(_WEIGHT_SUFFIXES) and not n.startswith("."))
    if not weights:
        raise HFTeacherError(f"{folder}: no weights file (model.safetensors) beside config.json")
    processor_file = next((n for n in _PROCESSOR_FILES if os.path.isfile(os.path.join(folder, n))), None)
    if processor_file is None:
        raise HFTeacherError(f"{folder}: no processor_config.json (save the processor with save_pretrained too)")
    processor = _read_json(folder, processor_file, hint="")
    image_settings = processor.get("image_processor", processor)
    preprocessing = _preprocessing(model_type, image_settings, min_size=min_size, max_size=max_size, folder=folder)
    identity = TeacherIdentity(
        name=label,
        kind=model_type,
        sha256=_weights_sha256(folder, weights),
        variant=_variant(model_type, config),
        preprocessing=preprocessing,
    )
    return HFModelInfo(model_type=model_type, identity=identity)


def _read_json(folder: str, name: str, *, hint: str) -> dict[str, Any]:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise HFTeacherError(f"{folder}: no {name}" + (f" ({hint})" if hint else ""))
    try:
        data = json.loads(open(path, encoding="utf-8").read())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise HFTeacherError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise HFTeacherError(f"{path}: expected a JSON object")
    return data


def _weights_sha256(folder: str, names: Sequence[str]) -> str:
    from model.weights.checkpoint import file_sha256

    hashes = [file_sha256(os.path.join(folder, n)) for n in names]
    if len(hashes) == 1:
        return hashes[0]
    return hashlib.sha256("".join(f"{n} {h}\n" for n, h in zip(names, hashes)).encode()).hexdigest()


def _variant(model_type: str, config: dict[str, Any]) -> str:
    if model_type == "grounding-dino":
        backbone = config.get("backbone_config") or {}
        return (
            f"grounding-dino/{backbone.get('model_type', config.get('backbone', '?'))}-{backbone.get('embed_dim', '?')}"
            f"/d{config.get('d_model')}-q{config.get('num_queries')}"
        )
    vision = config.get("vision_config") or {}
    return f"owlv2/vit-{vision.get('hidden_size')}x{vision.get('num_hidden_layers')}-p{vision.get('patch_size')}-{vision.get('image_size')}px"


def _preprocessing(
    model_type: str, settings: dict[str, Any], *, min_size: int | None, max_size: int | None, folder: str
) -> dict[str, Any]:
    size = dict(settings.get("size") or {})
    if model_type == "owlv2":
        if min_size or max_size:
            raise HFTeacherError(
                f"{folder}: OWLv2 runs at its square input size {size.get('height')}x{size.get('width')}; "
                "--min-size/--max-size apply to GLIP and Grounding DINO only"
            )
    else:
        if min_size:
            size["shortest_edge"] = int(min_size)
        if max_size:
            size["longest_edge"] = int(max_size)
    return {"size": size, "image_mean": settings.get("image_mean"), "image_std": settings.get("image_std")}


def load_hf_teacher(
    folder: str,
    info: HFModelInfo,
    *,
    device: str | torch.device = "cpu",
    bf16: bool = False,
    score_agg: str = "MEAN",
    max_detections: int = 100,
):
    """The teacher of a folder `inspect_hf_model` accepted: `GroundingDinoTeacher` or `Owlv2Teacher`."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    model_class = getattr(transformers, MODEL_TYPES[info.model_type])
    processor_class = transformers.GroundingDinoProcessor if info.model_type == "grounding-dino" else transformers.Owlv2Processor
    try:
        model = model_class.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
        processor = processor_class.from_pretrained(folder, local_files_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file in the folder: one line naming it
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise HFTeacherError(f"{folder}: cannot load the saved {info.model_type} model ({first[:200]})") from None
    model.eval().to(device)
    common = dict(identity=info.identity, bf16=bf16, max_detections=max_detections)
    if info.model_type == "grounding-dino":
        return GroundingDinoTeacher(model, processor, score_agg=score_agg, **common)
    return Owlv2Teacher(model, processor, **common)


class _HFTeacher:
    """Shared parts: device, bf16 autocast, image sizes, box clipping."""

    def __init__(self, model, processor, *, identity: TeacherIdentity, bf16: bool, max_detections: int) -> None:
        self.model = model.eval()
        self.processor = processor
        self.identity = identity
        self.bf16 = bf16
        self.max_detections = max_detections
        self.size = dict(identity.preprocessing.get("size") or {}) or None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def predict(
        self,
        images: Sequence[Image.Image],
        captions: Sequence[str],
        phrase_spans: Sequence[Sequence[Span | Sequence[Span]]],
    ) -> list[Detections]:
        """One `Detections` per image (`model.teachers.teacher.Teacher`); boxes xyxy in original pixels."""
        check_batch(images, captions, phrase_spans)
        pictures = [image if image.mode == "RGB" else image.convert("RGB") for image in images]
        return self._predict(pictures, list(captions), [entity_spans(spans) for spans in phrase_spans])

    def _predict(self, images: list[Image.Image], captions: list[str], entities: list[list[list[Span]]]) -> list[Detections]:
        raise NotImplementedError

    def _autocast(self):
        if self.bf16 and self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @staticmethod
    def _finish(boxes: torch.Tensor, scores: torch.Tensor, phrase_ids: torch.Tensor, size: tuple[int, int]) -> Detections:
        """Boxes clipped to the image (width, height), degenerate ones dropped, best first."""
        width, height = size
        boxes = boxes.float().cpu().clone()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        found = Detections(boxes, scores.float().cpu(), phrase_ids.to(torch.int64).cpu())
        return found.without_degenerate(MIN_BOX_SIDE).sorted()


@dataclass(frozen=True)
class _Prompt:
    image_index: int
    text: str
    spans: list[list[Span]]  # per entity of this prompt, its character spans into `text`
    phrase_ids: list[int]  # entity j of this prompt is phrase phrase_ids[j] of its image


class GroundingDinoTeacher(_HFTeacher):
    """Grounding DINO (`GroundingDinoForObjectDetection`): the caption with its phrases' token spans."""

    def __init__(self, model, processor, *, score_agg: str = "MEAN", **common) -> None:
        super().__init__(model, processor, **common)
        if score_agg.upper() not in ("MEAN", "MAX"):
            raise ValueError(f"score_agg must be MEAN or MAX, got {score_agg!r}")
        self.score_agg = score_agg.upper()
        self.tokenizer = processor.tokenizer
        self.max_text_len = int(model.config.max_text_len)

    def _predict(self, images: list[Image.Image], captions: list[str], entities: list[list[list[Span]]]) -> list[Detections]:
        prompts = [
            prompt
            for index, (caption, spans) in enumerate(zip(captions, entities))
            if spans
            for prompt in self._prompts_for(index, caption, spans)
        ]
        parts: list[list[Detections]] = [[] for _ in images]
        if prompts:
            for prompt, found in zip(prompts, self._run([images[p.image_index] for p in prompts], prompts)):
                parts[prompt.image_index].append(found)
        return [merge_detections(p, self.max_detections) for p in parts]

    def _prompts_for(self, image_index: int, caption: str, entities: list[list[Span]]) -> list[_Prompt]:
        """The caption with "." appended (Grounding DINO's preprocessing) when it fits, else phrase chunks."""
        text = caption if caption.rstrip().endswith(".") else caption + "."
        if len(self.tokenizer(text)["input_ids"]) <= self.max_text_len:
            return [_Prompt(image_index, text, entities, list(range(len(entities))))]
        phrases = [" ".join(caption[a:b] for a, b in entity) for entity in entities]
        chunks = split_prompt(self.tokenizer, phrases, max_length=self.max_text_len - 1, separator=". ")
        return [
            _Prompt(image_index, chunk_text + ".", [[span] for span in chunk_spans], chunk_ids)
            for chunk_text, chunk_spans, chunk_ids in chunks
        ]

    def _run(self, pictures: list[Image.Image], prompts: list[_Prompt]) -> list[Detections]:
        inputs = self.processor(
            images=pictures, text=[p.text for p in prompts], return_tensors="pt", padding="longest",
            **({"size": self.size} if self.size else {}),
        )
        inputs = inputs.to(self.device)
        with self._autocast():
            out = self.model(**inputs)
        logits = out.logits.float()  # [B, queries, max_text_len]; -inf past each text
        outputs = SimpleNamespace(logits=logits, pred_boxes=out.pred_boxes.float(), input_ids=inputs["input_ids"])
        # threshold -1 keeps every query, in query order; text_threshold 1 skips decoding labels.
        results = self.processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=-1.0, text_threshold=1.0,
            target_sizes=[(p.height, p.width) for p in pictures],
        )
        probabilities = logits.sigmoid()
        found = []
        for prompt, result, picture, probs in zip(prompts, results, pictures, probabilities):
            positive = positive_map_from_spans(self.tokenizer, prompt.text, prompt.spans, max_length=logits.shape[-1])
            positive = positive.to(probs.device)  # [P, max_text_len], rows sum to 1
            if self.score_agg == "MEAN":
                scores = probs @ positive.T  # [queries, P]
            else:
                scores = (probs[:, None, :] * (positive > 0)).amax(-1)  # [queries, P]
            flat = scores.flatten()
            keep = torch.argsort(flat, descending=True, stable=True)[: self.max_detections]
            query, entity = keep // scores.shape[1], keep % scores.shape[1]
            phrase = torch.as_tensor(prompt.phrase_ids, dtype=torch.int64, device=entity.device)[entity]
            found.append(self._finish(result["boxes"][query], flat[keep], phrase, picture.size))
        return found


class Owlv2Teacher(_HFTeacher):
    """OWLv2 (`Owlv2ForObjectDetection`): one text query per phrase."""

    def __init__(self, model, processor, *, max_queries: int = 64, **common) -> None:
        super().__init__(model, processor, **common)
        self.max_queries = max_queries
        self.text_length = int(model.config.text_config.max_position_embeddings)

    def _predict(self, images: list[Image.Image], captions: list[str], entities: list[list[list[Span]]]) -> list[Detections]:
        queries = [[" ".join(caption[a:b] for a, b in entity) for entity in spans] for caption, spans in zip(captions, entities)]
        best: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = [None] * len(images)
        passes = max((len(q) + self.max_queries - 1) // self.max_queries for q in queries) if queries else 0
        for step in range(passes):
            start = step * self.max_queries
            batch = [i for i, q in enumerate(queries) if len(q) > start]
            texts = [queries[i][start : start + self.max_queries] for i in batch]
            for i, (boxes, scores, labels) in zip(batch, self._run([images[i] for i in batch], texts)):
                labels = labels + start
                if best[i] is None:
                    best[i] = (boxes, scores, labels)
                else:  # the same boxes (image-only); keep each box's better phrase
                    better = scores > best[i][1]
                    best[i] = (best[i][0], torch.where(better, scores, best[i][1]), torch.where(better, labels, best[i][2]))
        results = []
        for image, found in zip(images, best):
            if found is None:
                results.append(Detections.empty())
                continue
            boxes, scores, labels = found
            results.append(self._finish(boxes, scores, labels, image.size).top(self.max_detections))
        return results

    def _run(self, pictures: list[Image.Image], texts: list[list[str]]) -> list[tuple[torch.Tensor, ...]]:
        """Every predicted box of each image with its best query: (boxes [N, 4] original pixels, scores [N], labels [N])."""
        inputs = self.processor(
            images=pictures, text=texts, return_tensors="pt", truncation=True, max_length=self.text_length
        )
        counts = torch.as_tensor([len(t) for t in texts])
        input_ids = inputs["input_ids"].view(len(texts), -1, inputs["input_ids"].shape[-1])  # [B, Q, L]
        padded = torch.arange(input_ids.shape[1])[None, :] >= counts[:, None]  # [B, Q]
        input_ids[padded] = 0  # an all-zero query is masked out by the model (query_mask)
        inputs = inputs.to(self.device)
        with self._autocast():
            out = self.model(**inputs)
        outputs = SimpleNamespace(logits=out.logits.float(), pred_boxes=out.pred_boxes.float())
        results = self.processor.post_process_grounded_object_detection(
            outputs, threshold=-1.0, target_sizes=[(p.height, p.width) for p in pictures]
        )
        return [(r["boxes"], r["scores"], r["labels"]) for r in results]
