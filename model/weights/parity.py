"""Parity with the official GLIP reference runs (`shared/reference/glip`, its README).

Three kinds of reference, told apart by their arrays:
* forward (`glip_{t_c,t_a,l}_reference.npz`): eval-mode features, tower steps and head outputs;
* training (`glip_{t_c,t_a}_train_reference.npz`, with `*_summary.json` beside it): the model in
  training mode with every regulariser off on one image with three boxes: loss terms, ATSS
  assignment, head outputs and their gradients, tower outputs, full gradients of the head's
  parameters and the gradient norm of every parameter;
* loss only: the training reference's stored head outputs fed into `GLIPLoss` (no network).

Each comparison pairs our tensor with the stored one; `relative_difference` is max |ours - ref| /
max |ref|. Gradient norms the reference gives as zero or rounding noise (the README: the scales
of levels without positives, exactly 0; BERT self-attention key biases, 0 in exact arithmetic
because softmax is shift-invariant, about 1e-7 in float32) are compared absolutely.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from model.training.loss import GLIPLoss, total_loss
from model.inputs.preprocess import PIXEL_MEAN, PIXEL_STD

LEVELS = (3, 4, 5, 6, 7)
LOSS_TERMS = ("loss_reg", "loss_centerness", "loss_dot_product_token")
# Reference gradient norms below this are zero in exact arithmetic: compared absolutely.
NOISE_NORM = 1e-5
NORM_PREFIX = "grad_norm:"


@dataclass(frozen=True)
class Comparison:
    """One compared tensor: `difference` is relative (see the module doc) unless `absolute`."""

    name: str
    difference: float
    absolute: bool = False


def relative_difference(ours: Tensor, reference: Any) -> float:
    """max |ours - reference| / max |reference| (float64; the plain max when reference is 0)."""
    expected = torch.as_tensor(np.asarray(reference)).double()
    got = ours.detach().cpu().double()
    if tuple(got.shape) != tuple(expected.shape):
        raise ValueError(f"shape {tuple(got.shape)} vs reference {tuple(expected.shape)}")
    if got.numel() == 0:
        return 0.0
    diff = float((got - expected).abs().max())
    scale = float(expected.abs().max())
    return diff / scale if scale > 0 else diff


def reference_kind(npz: Mapping[str, Any]) -> str:
    """'training' or 'forward', from the arrays the reference holds."""
    files = set(npz.files if hasattr(npz, "files") else npz)
    if "atss_assigned_gt" in files:
        return "training"
    if "final_boxes" in files:
        return "forward"
    raise ValueError("not a GLIP reference: neither 'atss_assigned_gt' (training) nor 'final_boxes' (forward) in it")


def load_summary(npz_path: str | Path) -> dict:
    """The `*_summary.json` written beside a reference `.npz`."""
    path = Path(npz_path)
    summary = path.with_name(path.stem + "_summary.json")
    if not summary.is_file():
        raise FileNotFoundError(f"{path}: its summary {summary.name} is not beside it")
    return json.loads(summary.read_text())


def reference_bgr(height: int = 480, width: int = 640) -> np.ndarray:
    """[H, W, 3] uint8 BGR: the README's synthetic input (the training references store none)."""
    y, x, c = np.meshgrid(np.arange(height), np.arange(width), np.arange(3), indexing="ij")
    return ((x * (c + 1) * 3 + y * (5 - c) * 2 + ((x // 40 + y // 40) % 2) * 96 + c * 50) % 256).astype(np.uint8)


def reference_image(npz: Mapping[str, Any]) -> Tensor:
    """[1, 3, 480, 640]: the README's preprocessing without Resize (BGR x255, mean/std)."""
    files = set(npz.files if hasattr(npz, "files") else npz)
    pixels = np.asarray(npz["image_bgr_uint8"]) if "image_bgr_uint8" in files else reference_bgr()
    bgr = torch.from_numpy(pixels).float()  # [H, W, 3] BGR
    # to_tensor (/255) then x255 is a float round trip; done the same way for exactness.
    x = (bgr.permute(2, 0, 1) / 255.0) * 255.0
    mean = torch.tensor(PIXEL_MEAN)[:, None, None]
    std = torch.tensor(PIXEL_STD)[:, None, None]
    return ((x - mean) / std)[None]


def reference_text(npz: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
    """(input_ids [1, 256], attention_mask [1, 256]) int64."""
    return _tensor(npz, "input_ids")[None], _tensor(npz, "attention_mask")[None]


def reference_targets(npz: Mapping[str, Any]) -> list[dict[str, Tensor]]:
    """The training sample's targets as `GLIPLoss` takes them: boxes in the 640x480 frame and the
    binary positive map (what the official collator hands the loss)."""
    return [{"boxes": _tensor(npz, "gt_boxes"), "positive_map": _tensor(npz, "positive_map")}]


def _tensor(npz: Mapping[str, Any], key: str) -> Tensor:
    return torch.from_numpy(np.asarray(npz[key]))


def _level_shapes(npz: Mapping[str, Any]) -> list[tuple[int, int]]:
    return [tuple(np.asarray(npz[f"centerness_P{p}"]).shape) for p in LEVELS]


# -- loss only ------------------------------------------------------------------------------


def loss_comparisons(npz: Mapping[str, Any], summary: Mapping[str, Any]) -> list[Comparison]:
    """Feed the stored head outputs, anchors and targets to `GLIPLoss`; compare the ATSS
    assignment and token targets (exact: the difference counts mismatching anchors), the loss
    terms and the gradients w.r.t. the head outputs."""
    shapes = _level_shapes(npz)
    box_regression = [_tensor(npz, f"bbox_reg_P{p}")[None].requires_grad_() for p in LEVELS]  # [1, 4, H, W]
    centerness = [_tensor(npz, f"centerness_P{p}")[None, None].requires_grad_() for p in LEVELS]  # [1, 1, H, W]
    logits = [_tensor(npz, f"dot_logits_P{p}")[None].requires_grad_() for p in LEVELS]  # [1, HW, 256]
    anchors = _tensor(npz, "anchors").split([h * w for h, w in shapes])
    _, text_mask = reference_text(npz)
    loss_fn = GLIPLoss()
    targets = reference_targets(npz)
    assigned = loss_fn.assign(anchors, targets, num_tokens=logits[0].shape[-1])
    wrong_gt = assigned.assigned != _tensor(npz, "atss_assigned_gt")
    wrong_tokens = (assigned.token_targets[0] != _tensor(npz, "token_targets").float()).any(1)
    comparisons = [Comparison("atss_assigned_gt", float(wrong_gt.sum())), Comparison("token_targets", float(wrong_tokens.sum()))]
    losses = loss_fn(
        box_regression=box_regression, centerness=centerness, dot_product_logits=logits, anchors=anchors,
        targets=targets, text_mask=text_mask,
    )
    comparisons += _loss_terms(losses, summary)
    total_loss(losses).backward()
    for index, p in enumerate(LEVELS):
        comparisons += [
            Comparison(f"grad_bbox_reg_P{p}", relative_difference(box_regression[index].grad[0], npz[f"grad_bbox_reg_P{p}"])),
            Comparison(f"grad_centerness_P{p}", relative_difference(centerness[index].grad[0, 0], npz[f"grad_centerness_P{p}"])),
            Comparison(f"grad_dot_logits_P{p}", relative_difference(logits[index].grad[0, :, :16], npz[f"grad_dot_logits_P{p}_first16"])),
        ]
    return comparisons


def _loss_terms(losses: Mapping[str, Tensor], summary: Mapping[str, Any]) -> list[Comparison]:
    out = [Comparison(term, relative_difference(losses[term], summary["losses"][term])) for term in LOSS_TERMS]
    out.append(Comparison("total_loss", relative_difference(total_loss(losses), summary["total_loss"])))
    return out


# -- whole network, training mode -------------------------------------------------------------


def training_comparisons(model: torch.nn.Module, npz: Mapping[str, Any], summary: Mapping[str, Any]) -> list[Comparison]:
    """One training step of `model` (built without regularisers, in train mode, float32, CPU)
    on the reference sample: loss terms, head and tower outputs, gradients w.r.t. the head
    outputs, the stored full gradients and every parameter's gradient norm."""
    parameters = dict(model.named_parameters())
    _check_names(parameters, summary["grad_norms"])  # before minutes of work, not after
    captured: dict[str, Any] = {}
    hook = model.rpn.head.dyhead_tower.register_forward_hook(lambda module, args, out: captured.update(tower=out))
    try:
        model.zero_grad(set_to_none=True)
        input_ids, attention_mask = reference_text(npz)
        out = model(reference_image(npz), input_ids, attention_mask)
    finally:
        hook.remove()
    for tensor in (*out.box_regression, *out.centerness, *out.dot_product_logits):
        tensor.retain_grad()
    losses = GLIPLoss()(
        box_regression=out.box_regression, centerness=out.centerness, dot_product_logits=out.dot_product_logits,
        anchors=out.anchors, targets=reference_targets(npz), text_mask=attention_mask,
    )
    comparisons = _loss_terms(losses, summary)
    total_loss(losses).backward()

    anchors = torch.cat(out.anchors)
    comparisons.append(Comparison("anchors", relative_difference(anchors, npz["anchors"])))
    tower = captured["tower"]
    # What enters the dot-product branch: the fused text (deep fusion) or BERT's masked output (T(A)).
    text = tower["lang"]["hidden"] if model.rpn.head.early_fuse else tower["lang"]["embedded"]
    comparisons.append(Comparison("dot_text_embedding_first16", relative_difference(text[0, :16], npz["dot_text_embedding_first16"])))
    for index, p in enumerate(LEVELS):
        comparisons += [
            Comparison(f"tower_out_P{p}", relative_difference(tower["visual"][index][0], npz[f"tower_out_P{p}"])),
            Comparison(f"bbox_reg_P{p}", relative_difference(out.box_regression[index][0], npz[f"bbox_reg_P{p}"])),
            Comparison(f"centerness_P{p}", relative_difference(out.centerness[index][0, 0], npz[f"centerness_P{p}"])),
            Comparison(f"dot_logits_P{p}", relative_difference(out.dot_product_logits[index][0], npz[f"dot_logits_P{p}"])),
            Comparison(f"grad_bbox_reg_P{p}", relative_difference(out.box_regression[index].grad[0], npz[f"grad_bbox_reg_P{p}"])),
            Comparison(f"grad_centerness_P{p}", relative_difference(out.centerness[index].grad[0, 0], npz[f"grad_centerness_P{p}"])),
            Comparison(
                f"grad_dot_logits_P{p}",
                relative_difference(out.dot_product_logits[index].grad[0, :, :16], npz[f"grad_dot_logits_P{p}_first16"]),
            ),
        ]
    for key in sorted(k for k in npz.files if k.startswith("grad__")):
        name = key[len("grad__"):]
        comparisons.append(Comparison(key, relative_difference(_grad(parameters, name), npz[key])))
    comparisons += gradient_norm_comparisons(parameters, summary["grad_norms"])
    return comparisons


def _grad(parameters: Mapping[str, torch.nn.Parameter], name: str) -> Tensor:
    if name not in parameters:
        raise ValueError(f"the reference has a gradient for {name!r}, which this model does not have")
    grad = parameters[name].grad
    return torch.zeros_like(parameters[name]) if grad is None else grad


def _check_names(parameters: Mapping[str, Any], reference_norms: Mapping[str, Any]) -> None:
    missing = sorted(set(reference_norms) - set(parameters))
    extra = sorted(set(parameters) - set(reference_norms))
    if missing or extra:
        raise ValueError(
            f"the model's parameters are not the reference's ({len(missing)} missing, {len(extra)} extra, "
            f"e.g. {(missing or extra)[0]}): a checkpoint of another variant?"
        )


def gradient_norm_comparisons(
    parameters: Mapping[str, torch.nn.Parameter], reference_norms: Mapping[str, float | None]
) -> list[Comparison]:
    """Every parameter's gradient L2 norm (float64 of the float32 gradient, as the reference)
    against the stored one; a parameter the reference trains without gradient (None: frozen
    `cls_logits`) must have none here either."""
    _check_names(parameters, reference_norms)
    out = []
    for name in sorted(reference_norms):
        expected, grad = reference_norms[name], parameters[name].grad
        if expected is None:
            out.append(Comparison(NORM_PREFIX + name, 0.0 if grad is None else float("inf"), absolute=True))
            continue
        norm = torch.zeros((), dtype=torch.float64) if grad is None else grad.detach().double().norm()
        if expected < NOISE_NORM:
            out.append(Comparison(NORM_PREFIX + name, abs(float(norm) - expected), absolute=True))
        else:
            out.append(Comparison(NORM_PREFIX + name, relative_difference(norm, expected)))
    return out


# -- whole network, eval mode (forward references) --------------------------------------------


def forward_pairs(model: torch.nn.Module, npz: Mapping[str, Any]) -> tuple[dict[str, tuple[Tensor, Any]], Any]:
    """Eval-mode forward on the reference input: {name: (ours, stored)} for the language
    features, Swin stages, FPN maps, every tower step (P7 and text) and the head outputs, and
    the `GLIPOutputs`. Samples are taken as the README stores them."""
    captured: dict[str, Any] = {}
    hooks = [
        model.backbone.body.register_forward_hook(lambda module, args, out: captured.update(swin=out)),
        model.language_backbone.register_forward_hook(lambda module, args, out: captured.update(lang=out)),
    ]
    for index, module in enumerate(model.rpn.head.dyhead_tower):
        hooks.append(module.register_forward_hook(lambda module, args, out, i=index: captured.update({f"tower{i:02d}": out})))
    try:
        with torch.no_grad():
            input_ids, attention_mask = reference_text(npz)
            out = model.eval()(reference_image(npz), input_ids, attention_mask)
    finally:
        for hook in hooks:
            hook.remove()
    pairs: dict[str, tuple[Tensor, Any]] = {}
    lang = captured["lang"]
    pairs["lang_hidden"] = (lang["hidden"][0, :16], npz["lang_hidden_first16"])
    pairs["lang_embedded"] = (lang["embedded"][0, :16], npz["lang_embedded_first16"])
    for index, stage in enumerate(captured["swin"]):
        pairs[f"swin_stage{index + 2}"] = (stage[0, :8, ::4, ::4], npz[f"swin_stage{index + 2}_sample"])
    for level, feature in enumerate(out.features):
        sample = feature[0, :16, ::2, ::2] if level < 3 else feature[0]
        pairs[f"fpn_P{level + 3}"] = (sample, npz[f"fpn_P{level + 3}_sample"])
    tower_keys = sorted(k for k in npz.files if k.startswith("tower"))
    if len(tower_keys) != 2 * len(model.rpn.head.dyhead_tower):
        raise ValueError(f"the reference has {len(tower_keys) // 2} tower steps, this model {len(model.rpn.head.dyhead_tower)}")
    for key in tower_keys:
        step = captured[key[:7]]
        ours = step["visual"][4][0] if key.endswith("_P7") else step["lang"]["hidden"][0, :16]
        pairs[key] = (ours, npz[key])
    for level, p in enumerate(LEVELS):
        pairs[f"bbox_reg_P{p}"] = (out.box_regression[level][0], npz[f"bbox_reg_P{p}"])
        pairs[f"centerness_P{p}"] = (out.centerness[level][0, 0], npz[f"centerness_P{p}"])
        pairs[f"dot_logits_P{p}"] = (out.dot_product_logits[level][0, :, :16], npz[f"dot_logits_P{p}_first16"])
    return pairs, out


def forward_comparisons(model: torch.nn.Module, npz: Mapping[str, Any]) -> list[Comparison]:
    pairs, _ = forward_pairs(model, npz)
    return [Comparison(name, relative_difference(ours, stored)) for name, (ours, stored) in pairs.items()]
