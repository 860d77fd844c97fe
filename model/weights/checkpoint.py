"""GLIP checkpoint files: load the official releases and save ours in the same layout.

Official files (`glip_tiny_model_o365_goldg.pth`, `glip_a_tiny_o365.pth`, `glip_large_model.pth`)
are a dict whose `"model"` entry is the state dict of a DDP-wrapped model (keys prefixed
`module.`); some also hold `model_ema`, optimizer and scheduler entries (GLIP issue #59: `model`
is the one to use). The official loader strips `module.` only when every key has it.

Checkpoints this project writes use exactly that layout, so they load into the official code
too, plus one extra entry, `"glip_engine"`, with plain-data metadata: the variant, the full
model configuration, the preprocessing and where the weights came from. The official
checkpointer ignores unknown entries.

Loading is strict: a file that does not fit the model raises `CheckpointError` naming the file,
the missing keys, the unexpected keys and the shape mismatches. The only keys ever ignored are
the BERT `embeddings.position_ids`/`token_type_ids` buffers that older transformers saved and
the BERT `pooler.*` weights some releases carry (GLIP builds BERT without a pooler).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from model.config import GLIPConfig, Regularisers, config_from_dict, config_to_dict, get_config, with_regularisers
from model.network.glip import GLIP

METADATA_KEY = "glip_engine"
FORMAT_VERSION = 1

_IGNORED_SUFFIXES = (
    "embeddings.position_ids",
    "embeddings.token_type_ids",
)
_IGNORED_PARTS = (".pooler.",)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded into the requested model."""


@dataclass(frozen=True)
class CheckpointInfo:
    """Where a loaded model's weights came from (written into every stage's provenance)."""

    path: str
    sha256: str
    variant: str
    source_format: str  # "official" (no metadata), "glip_engine", or "safetensors"
    metadata: dict[str, Any] = field(default_factory=dict)
    config: GLIPConfig | None = None  # the configuration the weights load into

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def file_sha256(path: str | os.PathLike, *, chunk_size: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """Read a `.pth`/`.pt` or `.safetensors` file.

    Returns (state dict with model-side key names, our metadata or {}, source format). Never
    unpickles arbitrary objects: `.pth` files go through `torch.load(weights_only=True)`.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    # KeyError/IndexError: the unpickler reading text or random bytes as opcodes
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as exc:
        raise CheckpointError(f"{path}: not a valid or safe checkpoint ({_load_failure(exc)})") from None
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(raw).__name__}")
    metadata = raw.get(METADATA_KEY) or {}
    # Official loader rule: take the "model" entry when present, else the whole dict.
    state = raw["model"] if "model" in raw else raw
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: entry 'model' is a {type(state).__name__}, not a state dict")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: no tensors found under {'model' if 'model' in raw else 'the top level'}")
    return strip_module_prefix(tensors), dict(metadata), ("glip_engine" if metadata else "official")


def _load_failure(exc: BaseException) -> str:
    """One line on why `torch.load(weights_only=True)` refused a file.

    PyTorch's own message spans several lines and advises `weights_only=False` or allow-listing
    the offending global: for an untrusted file that advice runs the attacker's code, so it is
    never passed on.
    """
    text = str(exc)
    code = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if code:
        return f"it holds a reference to code, {code.group(1)}, which is never run"
    if "Weights only load failed" in text:
        operand = re.search(r"Unsupported operand (\S+)", text)
        detail = f": unsupported pickle operand {operand.group(1)}" if operand else ""
        return f"not a PyTorch file of tensors and plain data{detail}"
    if "legacy .tar format" in text:
        return "a tar archive, not a PyTorch checkpoint"
    if isinstance(exc, EOFError) or not text.strip():
        return "the file is empty or ends too early"
    if "weights_only" in text or isinstance(exc, (KeyError, IndexError)):  # never pass on torch's advice
        return f"not a PyTorch checkpoint file ({type(exc).__name__} while unpickling)"
    first_line = text.strip().splitlines()[0]
    if len(first_line) > 200:  # whole words only
        first_line = first_line[:200].rsplit(" ", 1)[0] + " ..."
    return f"truncated or corrupt: {first_line}"


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    import json

    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            header = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file: {exc}") from exc
    metadata = json.loads(header[METADATA_KEY]) if METADATA_KEY in header else {}
    return strip_module_prefix(tensors), metadata, "safetensors"


def strip_module_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the DDP `module.` prefix when every key carries it (the official rule)."""
    if state and all(key.startswith("module.") for key in state):
        return {key[len("module."):]: value for key, value in state.items()}
    return dict(state)


def drop_ignored_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        key: value
        for key, value in state.items()
        if not key.endswith(_IGNORED_SUFFIXES) and not any(part in key for part in _IGNORED_PARTS)
    }


def detect_variant(state: Mapping[str, torch.Tensor]) -> str:
    """Name the official variant whose layout these weights have (`glip-t-a`, `glip-t`, `glip-l`).

    Swin-L has a 192-wide patch embedding; T(A) has no fusion layers in the tower. Anything
    else that is not one of the official shapes needs its configuration from metadata.
    """
    patch = state.get("backbone.body.patch_embed.proj.weight")
    if patch is None:
        raise CheckpointError("not a GLIP state dict: no 'backbone.body.patch_embed.proj.weight'")
    has_fusion = any(".b_attn." in key for key in state)
    if patch.shape[0] == 192:
        return "glip-l"
    if patch.shape[0] == 96:
        return "glip-t" if has_fusion else "glip-t-a"
    raise CheckpointError(
        f"patch embedding width {patch.shape[0]} matches no official GLIP variant; "
        "a checkpoint of a custom configuration must carry its config in metadata"
    )


def resolve_config(
    state: Mapping[str, torch.Tensor], metadata: Mapping[str, Any], config: str | GLIPConfig = "auto"
) -> GLIPConfig:
    """The configuration to build: explicit, from our metadata, or detected from the keys."""
    if isinstance(config, GLIPConfig):
        return config
    if config != "auto":
        return get_config(config)
    if "config" in metadata:
        return config_from_dict(metadata["config"])
    return get_config(detect_variant(state))


def check_state_dict(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor], *, source: str
) -> None:
    """Raise one `CheckpointError` listing every missing, unexpected and mis-shaped key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{key}: file {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in set(expected) & set(state)
        if tuple(state[key].shape) != tuple(expected[key].shape)
    )
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"{source}: does not fit the model "
            f"({len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} mis-shaped keys)"
            + _listing("missing", missing)
            + _listing("unexpected", unexpected)
            + _listing("mis-shaped", mismatched)
        )


def _listing(title: str, keys: list[str], limit: int = 20) -> str:
    if not keys:
        return ""
    shown = "\n    ".join(keys[:limit])
    more = f"\n    ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"\n  {title}:\n    {shown}{more}"


def checkpoint_variant(metadata: Mapping[str, Any], cfg: GLIPConfig, config: str | GLIPConfig) -> str:
    """The variant a checkpoint is recorded under: the one asked for, else the file's own."""
    if config != "auto":
        return cfg.name
    return str(metadata.get("variant", cfg.name))


def inspect_checkpoint(path: str | os.PathLike, *, config: str | GLIPConfig = "auto") -> CheckpointInfo:
    """Variant, sha256, metadata and configuration of a checkpoint, checked to fit the model.

    Reads and hashes the file once; no weights are materialised in a model (the fit is checked
    against a model built on the meta device), so a stage's driver can call it before any
    worker starts and hand the result to every worker (`load_glip(..., info=...)`).
    """
    state, metadata, source_format = read_checkpoint(path)
    state = drop_ignored_keys(state)
    cfg = resolve_config(state, metadata, config)
    with torch.device("meta"):
        shapes = GLIP(cfg)
    check_state_dict(shapes, state, source=str(path))
    return _checkpoint_info(path, metadata, source_format, cfg, config)


def load_glip(
    path: str | os.PathLike,
    *,
    config: str | GLIPConfig = "auto",
    device: str | torch.device = "cpu",
    info: CheckpointInfo | None = None,
    regularisers: Regularisers | None = None,
) -> tuple[GLIP, CheckpointInfo]:
    """Build the model a checkpoint describes and load its weights strictly (eval mode).

    info: the file's `inspect_checkpoint` result, when the caller has it; its configuration is
    used (`config` is then ignored) and the file is not hashed again. regularisers: training-time
    settings that replace the configuration's (they own no weights; `model.config.OFF` for parity).
    """
    state, metadata, source_format = read_checkpoint(path)
    state = drop_ignored_keys(state)
    cfg = info.config if info is not None and info.config is not None else resolve_config(state, metadata, config)
    if regularisers is not None:
        cfg = with_regularisers(cfg, regularisers)
    # Built on the CPU, not the meta device: non-persistent buffers (BERT position_ids) are
    # not in the file and must keep their constructed values.
    model = GLIP(cfg)
    check_state_dict(model, state, source=str(path))
    model.load_state_dict(state, strict=True)
    model.eval().to(device)
    if info is None:
        info = _checkpoint_info(path, metadata, source_format, cfg, config)
    return model, info


def _checkpoint_info(
    path: str | os.PathLike, metadata: Mapping[str, Any], source_format: str, cfg: GLIPConfig, config: str | GLIPConfig
) -> CheckpointInfo:
    return CheckpointInfo(
        path=str(path),
        sha256=file_sha256(path),
        variant=checkpoint_variant(metadata, cfg, config),
        source_format=source_format,
        metadata=dict(metadata),
        config=cfg,
    )


def save_glip(
    model: GLIP,
    path: str | os.PathLike,
    *,
    provenance: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write `model` in the official layout (`{"model": {"module." + key: tensor}}`) plus metadata.

    `.safetensors` paths get the same keys and the metadata as a JSON string in the header.
    The file appears atomically (written under a temporary name, then renamed).
    """
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {f"module.{key}": value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    metadata = {
        "format_version": FORMAT_VERSION,
        "variant": model.config.name,
        "config": config_to_dict(model.config),
        "preprocessing": dataclasses.asdict(model.config.preprocessing),
        "provenance": dict(provenance or {}),
        "torch_version": str(torch.__version__),
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(tmp), metadata={METADATA_KEY: json.dumps(metadata)})
    else:
        torch.save({"model": state, METADATA_KEY: metadata, **dict(extra or {})}, tmp)
    os.replace(tmp, path)
    return path
