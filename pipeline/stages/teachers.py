"""`--teacher`: which grounding model a stage runs, worked out once per job, loaded once per actor.

A teacher is named by one string:
- a GLIP checkpoint file (`.pth`/`.pt`/`.safetensors`, official or trained here), local or
  an object-store URI: `glip_tiny_model_o365_goldg.pth`, `s3://bucket/teacher.pth`;
- `hf:FOLDER`, a transformers model saved with `save_pretrained` (model and processor) of a
  supported type, Grounding DINO or OWLv2, local or an object-store URI:
  `hf:/models/grounding-dino-tiny`, `hf:s3://bucket/owlv2-base-ensemble`. Nothing is ever
  fetched from a model hub.

`inspect_teacher` runs on the stage's driver: it checks the teacher (a GLIP file is read,
hashed and matched against its configuration; a folder's config, weights and processor files
are checked and hashed) and returns a `TeacherSource`, small and picklable, with the identity
every pseudo sample records. Each actor then calls `load_teacher(source, ...)`, which loads the
weights once and never re-hashes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.io import storage

if TYPE_CHECKING:  # imports torch: not for `pipeline --help` or parse-captions
    from model.teachers.teacher import TeacherIdentity

HF_PREFIX = "hf:"


@dataclass(frozen=True)
class TeacherSource:
    """A checked teacher: where it is, what kind, and its identity (plus GLIP's checkpoint info)."""

    uri: str  # the file or folder, without the hf: prefix
    kind: str  # "glip", "grounding-dino" or "owlv2"
    identity: TeacherIdentity
    details: object  # model.weights.checkpoint.CheckpointInfo (GLIP) or model.teachers.hf_teachers.HFModelInfo

    def to_dict(self) -> dict:
        return self.identity.to_dict()


def resolve_device(device: str) -> str:
    """`auto`: cuda when a GPU is visible, else cpu; `cpu`/`cuda`/`cuda:N` as given."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"--device {device!r}: choose auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is visible")
    return device


def inspect_teacher(
    teacher: str, *, config: str = "auto", min_size: int | None = None, max_size: int | None = None
) -> TeacherSource:
    """Check `--teacher` before any work starts; ValueError/FileNotFoundError with one line naming it."""
    if teacher.startswith(HF_PREFIX):
        return _inspect_hf(teacher[len(HF_PREFIX):], config=config, min_size=min_size, max_size=max_size)
    return _inspect_glip(teacher, config=config, min_size=min_size, max_size=max_size)


def _inspect_glip(uri: str, *, config: str, min_size: int | None, max_size: int | None) -> TeacherSource:
    from model.teachers.teacher import TeacherIdentity
    from model.weights.checkpoint import inspect_checkpoint

    if storage.is_dir(uri):
        raise ValueError(f"--teacher {uri}: a folder; a transformers model folder is given as hf:{uri}")
    try:
        local = storage.local_copy(uri)  # object-store teachers are downloaded once per machine
    except FileNotFoundError:
        raise FileNotFoundError(f"--teacher {uri}: checkpoint not found") from None
    info = inspect_checkpoint(local, config=config)
    pre = info.config.preprocessing
    # The sizes `GLIPPredictor` resizes to: None keeps the checkpoint's, 0 the image's own.
    preprocessing = {
        "min_size": pre.min_size if min_size is None else (min_size or None),
        "max_size": pre.max_size if max_size is None else (max_size or None),
        "size_divisibility": pre.size_divisibility,
    }
    identity = TeacherIdentity(
        name=storage.basename(uri), kind="glip", sha256=info.sha256, variant=info.variant, preprocessing=preprocessing
    )
    return TeacherSource(uri=uri, kind="glip", identity=identity, details=info)


def _inspect_hf(uri: str, *, config: str, min_size: int | None, max_size: int | None) -> TeacherSource:
    from model.teachers.hf_teachers import inspect_hf_model

    if not uri:
        raise ValueError("--teacher hf: needs a folder, e.g. hf:/models/grounding-dino-tiny")
    if config != "auto":
        raise ValueError(f"--config {config}: names a GLIP configuration; a transformers teacher brings its own")
    try:
        folder = storage.local_folder_copy(uri)
    except FileNotFoundError:
        raise FileNotFoundError(f"--teacher hf:{uri}: folder not found") from None
    info = inspect_hf_model(folder, name=storage.basename(uri), min_size=min_size, max_size=max_size)
    return TeacherSource(uri=uri, kind=info.model_type, identity=info.identity, details=info)


def load_teacher(
    source: TeacherSource,
    *,
    device: str = "cpu",
    bf16: bool = False,
    phrase_score: str = "mean",
):
    """The `model.teachers.teacher.Teacher` of a checked source, on `device` (bf16 autocast only on CUDA)."""
    bf16 = bf16 and str(device).startswith("cuda")
    if source.kind == "glip":
        from model.inference.predict import GLIPPredictor

        pre = source.identity.preprocessing
        return GLIPPredictor.from_checkpoint(
            storage.local_copy(source.uri), info=source.details, device=device,
            min_size=pre["min_size"] or 0, max_size=pre["max_size"] or 0, bf16=bf16,
            score_agg=phrase_score.upper(),
        )
    from model.teachers.hf_teachers import load_hf_teacher

    folder = storage.local_folder_copy(source.uri)
    return load_hf_teacher(folder, source.details, device=device, bf16=bf16, score_agg=phrase_score.upper())
