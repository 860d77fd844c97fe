"""Checkpoint I/O: official layout in and out, strict loading with clear errors."""

from __future__ import annotations

import json
import tarfile
import zipfile

import pytest
import torch

from model.weights.checkpoint import (
    CheckpointError,
    detect_variant,
    file_sha256,
    inspect_checkpoint,
    load_glip,
    read_checkpoint,
    save_glip,
)
from model.config import get_config
from model.network.glip import GLIP


@pytest.fixture(scope="module")
def tiny_model() -> GLIP:
    torch.manual_seed(0)
    return GLIP(get_config("tiny")).eval()


def _official_layout(model: GLIP) -> dict:
    """What a released GLIP file looks like: DDP keys under "model", plus training state."""
    state = {f"module.{k}": v.clone() for k, v in model.state_dict().items()}
    # Released files were saved with transformers 4.x: BERT position_ids is a saved buffer.
    state["module.language_backbone.body.model.embeddings.position_ids"] = torch.arange(512)[None]
    return {"model": state, "optimizer": {"state": {}, "param_groups": []}, "iteration": 90000}


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize(
    ("manifest", "variant"),
    [("t_a", "glip-t-a"), ("t_b", "glip-t"), ("t_c", "glip-t"), ("l", "glip-l")],
)
def test_variant_detected_from_official_key_layout(reference_dir, manifest, variant):
    keys = json.loads((reference_dir / f"manifest_glip_{manifest}.json").read_text())["keys"]
    state = {k: torch.empty(v["shape"], device="meta") for k, v in keys.items()}
    assert detect_variant(state) == variant


def test_official_layout_file_loads_with_explicit_config(tmp_path, tiny_model):
    path = tmp_path / "official_layout.pth"
    torch.save(_official_layout(tiny_model), path)
    model, info = load_glip(path, config="tiny")
    _assert_same_weights(model, tiny_model)
    assert info.source_format == "official"
    assert info.name == "official_layout.pth"
    assert len(info.sha256) == 64


def test_custom_config_without_metadata_needs_config(tmp_path, tiny_model):
    path = tmp_path / "no_meta.pth"
    torch.save(_official_layout(tiny_model), path)
    with pytest.raises(CheckpointError, match="config"):
        load_glip(path)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_saved_checkpoint_round_trips_with_metadata(tmp_path, tiny_model, suffix):
    path = save_glip(tiny_model, tmp_path / f"student{suffix}", provenance={"run": "unit-test"})
    state, metadata, _ = read_checkpoint(path)
    assert all(not k.startswith("module.") for k in state)  # prefix stripped on read
    assert metadata["variant"] == "tiny"
    assert metadata["provenance"] == {"run": "unit-test"}
    assert metadata["preprocessing"]["min_size"] == tiny_model.config.preprocessing.min_size
    model, info = load_glip(path)  # config comes from the metadata
    _assert_same_weights(model, tiny_model)
    assert info.variant == "tiny"
    assert not list(tmp_path.glob(".*tmp*")), "temporary file left behind"


def test_saved_pth_is_official_layout(tmp_path, tiny_model):
    path = save_glip(tiny_model, tmp_path / "student.pth")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw["model"]) == {f"module.{k}" for k in tiny_model.state_dict()}


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path, tiny_model):
    layout = _official_layout(tiny_model)
    state = layout["model"]
    del state["module.rpn.head.bias0"]
    state["module.rpn.head.extra_weight"] = torch.zeros(3)
    state["module.rpn.head.log_scale"] = torch.zeros(2)
    path = tmp_path / "broken.pth"
    torch.save(layout, path)
    with pytest.raises(CheckpointError) as err:
        load_glip(path, config="tiny")
    message = str(err.value)
    assert str(path) in message
    assert "rpn.head.bias0" in message and "missing" in message
    assert "rpn.head.extra_weight" in message and "unexpected" in message
    assert "rpn.head.log_scale" in message and "mis-shaped" in message


def test_wrong_variant_is_refused(tmp_path, tiny_model):
    path = tmp_path / "tiny.pth"
    torch.save(_official_layout(tiny_model), path)
    with pytest.raises(CheckpointError, match="missing"):
        load_glip(path, config="glip-t-a")


def test_inspect_checkpoint_once_per_job_then_load_without_rehashing(tmp_path, tiny_model):
    import dataclasses

    path = save_glip(tiny_model, tmp_path / "tiny.pth")
    info = inspect_checkpoint(path)
    assert (info.variant, info.sha256, info.config.name) == ("tiny", file_sha256(path), "tiny")
    assert info.metadata["variant"] == "tiny"
    official = tmp_path / "official.pth"
    torch.save(_official_layout(tiny_model), official)
    # --config names the variant of an official file (its layout alone matches no official variant).
    assert inspect_checkpoint(official, config="tiny").variant == "tiny"
    with pytest.raises(CheckpointError, match="patch embedding width"):
        inspect_checkpoint(official)
    with pytest.raises(CheckpointError, match="official.pth: does not fit the model"):
        inspect_checkpoint(official, config="glip-t-a")  # refused before any weights are loaded
    # Workers load with the driver's info: its configuration and its hash (the file is not hashed again).
    stamped = dataclasses.replace(info, sha256="f" * 64)
    model, loaded = load_glip(path, config="glip-l", info=stamped)
    assert loaded is stamped
    _assert_same_weights(model, tiny_model)


def test_truncated_and_non_checkpoint_files(tmp_path, tiny_model):
    good = save_glip(tiny_model, tmp_path / "good.pth")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    with pytest.raises(CheckpointError, match="truncated.pth"):
        load_glip(truncated)
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.pth: not a valid or safe checkpoint") as refused:
        load_glip(text)
    assert "\n" not in str(refused.value) and "weights_only" not in str(refused.value)
    with pytest.raises(CheckpointError, match="not found"):
        load_glip(tmp_path / "absent.pth")


def test_any_non_checkpoint_file_gets_a_whole_message_without_torchs_advice(tmp_path, tiny_model):
    good = save_glip(tiny_model, tmp_path / "good.pth")
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:  # a WebDataset shard given as --teacher
        tar.add(good, arcname="00000.jpg")
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "words.pth").write_text("hello")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("a.txt", "x")
    expected = {"shard.tar": "(a tar archive, not a PyTorch checkpoint)", "empty.pth": "(the file is empty or ends too early)",
                "words.pth": "(not a PyTorch checkpoint file (KeyError while unpickling))", "other.zip": "not in a subdirectory: a.txt)"}
    for name, ending in expected.items():
        with pytest.raises(CheckpointError) as refused:
            read_checkpoint(tmp_path / name)
        message = str(refused.value)
        assert message.startswith(f"{tmp_path / name}: not a valid or safe checkpoint") and message.endswith(ending), message
        assert "\n" not in message and "weights_only" not in message


def test_pickled_code_is_refused(tmp_path, capsys):
    """weights_only=True: a file carrying arbitrary objects is refused in one line, not executed,
    and the message never passes on PyTorch's advice to disable weights_only."""

    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "hook": _Evil()}, path)
    with pytest.raises(CheckpointError, match="not a valid or safe checkpoint") as refused:
        read_checkpoint(path)
    message = str(refused.value)
    assert "print" in message  # names what it would have run
    assert "\n" not in message and "weights_only" not in message and "safe_globals" not in message
    assert "this must never run" not in capsys.readouterr().out


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))
