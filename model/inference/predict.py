"""Batched grounding: images + captions + phrase spans -> boxes in original pixels.

The GLIP teacher (`model.teachers.teacher.Teacher`) of `pipeline ground`, `pseudo-label` and `eval`.
It composes the official steps in their order: test transform (resize, BGR x255 normalise,
pad to 32), tokenisation, the GLIP forward, ATSS post-processing with MEAN phrase scores,
and the rescaling of boxes to the original image size (BoxList.resize: plain ratios).

Two padding modes for the text side:
- `pad_to_max=True` pads every prompt to 256 tokens, exactly as the official forward
  (parity path);
- `pad_to_max=False` pads each batch to its longest prompt (fast path). Padding tokens are
  masked out of BERT and of the fusion's text->image attention, but the image->text direction
  of VLFuse attends over visual tokens only, so results agree up to float rounding.

A prompt whose phrases need more than `max_query_len` tokens is split into several prompts
built from the phrases themselves ("a dog. a red ball. ..."), each grounded separately, and
the detections merged.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image

from model.weights.checkpoint import CheckpointInfo, load_glip
from model.network.glip import GLIP
from model.inference.postprocess import ATSSPostProcessor, rescale_boxes
from model.inputs.preprocess import batch_images, image_to_tensor
from model.teachers.teacher import MIN_BOX_SIDE, Detections, Span, TeacherIdentity, check_batch, entity_spans, merge_detections
from model.inputs.text import label_to_tokens, load_tokenizer, positive_map_from_spans, split_prompt, tokenize

__all__ = ["Detections", "GLIPPredictor", "MIN_BOX_SIDE"]


@dataclass(frozen=True)
class _Prompt:
    image_index: int
    caption: str
    spans: list[list[Span]]  # one list of character spans per entity of this prompt
    phrase_ids: list[int]  # entity j of this prompt is phrase phrase_ids[j] of its image


class GLIPPredictor:
    """Grounds phrases in images with a GLIP model. Build with `from_checkpoint` or a model."""

    def __init__(
        self,
        model: GLIP,
        *,
        tokenizer=None,
        min_size: int | None = None,
        max_size: int | None = None,
        pad_to_max: bool = False,
        bf16: bool = False,
        nms_mode: str = "gpu",
        score_agg: str = "MEAN",
        checkpoint: CheckpointInfo | None = None,
    ) -> None:
        self.model = model.eval()
        self.config = model.config
        self.tokenizer = tokenizer or load_tokenizer()
        pre = self.config.preprocessing
        # None: the checkpoint's test size; 0: feed images at their own size (no resize).
        self.min_size = pre.min_size if min_size is None else (min_size or None)
        self.max_size = pre.max_size if max_size is None else (max_size or None)
        self.size_divisibility = pre.size_divisibility
        self.max_query_len = self.config.max_query_len
        self.pad_to_max = pad_to_max
        self.bf16 = bf16
        self.nms_mode = nms_mode
        self.checkpoint = checkpoint
        inference = self.config.inference
        self.postprocessor = ATSSPostProcessor(
            pre_nms_thresh=inference.pre_nms_thresh,
            pre_nms_top_n=inference.pre_nms_top_n,
            nms_thresh=inference.nms_thresh,
            detections_per_img=inference.detections_per_img,
            nms_mode=nms_mode,
            score_agg=score_agg.upper(),
        )

    @classmethod
    def from_checkpoint(
        cls,
        path: str,
        *,
        config="auto",
        device: str | torch.device = "cpu",
        info: CheckpointInfo | None = None,
        **kwargs,
    ) -> "GLIPPredictor":
        """Load `path`; `info` (from `inspect_checkpoint`, worked out once per job) spares
        re-hashing the file and re-resolving its configuration in every actor."""
        model, info = load_glip(path, config=config, device=device, info=info)
        return cls(model, checkpoint=info, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def identity(self) -> TeacherIdentity:
        """Provenance: the checkpoint's name, sha256 and variant, and the test-time sizes used."""
        info = self.checkpoint
        preprocessing = {"min_size": self.min_size, "max_size": self.max_size, "size_divisibility": self.size_divisibility}
        if info is None:  # built from a model in memory
            return TeacherIdentity(name="", kind="glip", sha256="", variant=self.config.name, preprocessing=preprocessing)
        return TeacherIdentity(
            name=info.name, kind="glip", sha256=info.sha256, variant=info.variant, preprocessing=preprocessing
        )

    # -- prompts ---------------------------------------------------------------------------

    def _prompts_for(self, image_index: int, caption: str, spans: Sequence[Sequence[Span]]) -> list[_Prompt]:
        """One prompt (the caption itself) when it fits, else phrase-built chunks."""
        n_tokens = len(self.tokenizer(caption, add_special_tokens=True)["input_ids"])
        if n_tokens <= self.max_query_len:
            return [_Prompt(image_index, caption, [list(s) for s in spans], list(range(len(spans))))]
        phrases = [" ".join(caption[a:b] for a, b in entity) for entity in spans]
        chunks = split_prompt(self.tokenizer, phrases, max_length=self.max_query_len)
        return [
            _Prompt(image_index, chunk_caption, [[span] for span in chunk_spans], chunk_ids)
            for chunk_caption, chunk_spans, chunk_ids in chunks
        ]

    # -- inference -------------------------------------------------------------------------

    @torch.inference_mode()
    def predict(
        self,
        images: Sequence[Image.Image],
        captions: Sequence[str],
        phrase_spans: Sequence[Sequence[Span | Sequence[Span]]],
    ) -> list[Detections]:
        """Ground each image's phrases in it.

        images: PIL images (any mode; converted to RGB). captions: one per image.
        phrase_spans: per image, one entry per phrase: a `(start, end)` character span into
        that image's caption, or a list of such spans for a phrase made of several pieces.
        Returns one `Detections` per image, boxes in the original pixels, sorted by score.
        """
        check_batch(images, captions, phrase_spans)
        tensors = [self._image_tensor(image) for image in images]
        prompts: list[_Prompt] = []
        for index, (caption, spans) in enumerate(zip(captions, phrase_spans)):
            entities = entity_spans(spans)
            if entities:
                prompts.extend(self._prompts_for(index, caption, entities))
        parts: list[list[Detections]] = [[] for _ in images]
        # Images with several prompts (very long phrase lists) run once per prompt.
        for round_prompts in _rounds(prompts):
            dets = self._run(
                [tensors[p.image_index] for p in round_prompts],
                [images[p.image_index].size for p in round_prompts],
                round_prompts,
            )
            for prompt, det in zip(round_prompts, dets):
                parts[prompt.image_index].append(det)
        return [merge_detections(p, self.postprocessor.detections_per_img) for p in parts]

    def _image_tensor(self, image: Image.Image) -> torch.Tensor:
        if image.mode != "RGB":
            image = image.convert("RGB")
        return image_to_tensor(image, min_size=self.min_size, max_size=self.max_size)

    def _run(
        self,
        tensors: list[torch.Tensor],
        original_sizes: list[tuple[int, int]],
        prompts: list[_Prompt],
    ) -> list[Detections]:
        device = self.device
        batch, image_sizes = batch_images(tensors, size_divisibility=self.size_divisibility)
        text = tokenize(
            self.tokenizer,
            [p.caption for p in prompts],
            max_length=self.max_query_len,
            pad_to_max=self.pad_to_max,
        )
        length = text["input_ids"].shape[1]
        maps = [
            label_to_tokens(positive_map_from_spans(self.tokenizer, p.caption, p.spans, max_length=length))
            for p in prompts
        ]
        autocast = (
            torch.autocast(device_type="cuda", dtype=torch.bfloat16)
            if self.bf16 and device.type == "cuda"
            else contextlib.nullcontext()
        )
        with autocast:
            out = self.model(
                batch.to(device, non_blocking=True),
                text["input_ids"].to(device),
                text["attention_mask"].to(device),
            )
        num_classes = max(80, max((len(p.spans) for p in prompts), default=0))
        results = self.postprocessor(
            [t.float() for t in out.box_regression],
            [t.float() for t in out.centerness],
            [t.float() for t in out.dot_product_logits],
            out.anchors,
            image_sizes,
            maps,
            num_classes=num_classes,
        )
        detections = []
        for prompt, result, net_size, (width, height) in zip(prompts, results, image_sizes, original_sizes):
            boxes = rescale_boxes(result["boxes"].float().cpu(), net_size, (height, width))
            phrase_index = torch.as_tensor(prompt.phrase_ids, dtype=torch.int64)
            labels = result["labels"].cpu() - 1  # official labels are entity index + 1
            found = Detections(boxes, result["scores"].float().cpu(), phrase_index[labels])
            detections.append(found.without_degenerate(MIN_BOX_SIDE))
        return detections


def _rounds(prompts: list[_Prompt]) -> list[list[_Prompt]]:
    """Group prompts into forward batches holding each image at most once."""
    rounds: list[list[_Prompt]] = []
    seen: list[set[int]] = []
    for prompt in prompts:
        for batch, images in zip(rounds, seen):
            if prompt.image_index not in images:
                batch.append(prompt)
                images.add(prompt.image_index)
                break
        else:
            rounds.append([prompt])
            seen.append({prompt.image_index})
    return rounds
