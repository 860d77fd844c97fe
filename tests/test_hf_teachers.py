"""Grounding DINO and OWLv2 teachers (tiny, random, saved with `save_pretrained`) loaded back
through `--teacher hf:FOLDER`, checked against transformers' own post-processing of the same
model outputs on real COCO images; the refusals of bad teacher folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from model.weights.checkpoint import file_sha256
from pipeline.cli import app
from pipeline.stages.teachers import inspect_teacher, load_teacher, resolve_device
from tests.hf_fixtures import GD_MAX_TEXT_LEN

IMAGES = ["coco_mini/train2017/000000000790.jpg", "coco_mini/train2017/000000030752.jpg"]
CAPTIONS = ["a man riding a red motorcycle down the street", "the dog and the cat on a sofa"]
SPANS = [[(0, 5), (13, 29), (35, 45)], [(0, 7), (12, 19)]]


@pytest.fixture(scope="module")
def pictures(shared_data):
    return [Image.open(shared_data / name).convert("RGB") for name in IMAGES]


def _teacher(folder: Path, **options):
    return load_teacher(inspect_teacher(f"hf:{folder}"), **options)


def _clipped(boxes: torch.Tensor, picture: Image.Image) -> torch.Tensor:
    width, height = picture.size
    boxes = boxes.clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    return boxes


@pytest.mark.parametrize("score_agg", ["mean", "max"])
def test_grounding_dino_boxes_are_transformers_post_processing(hf_teachers, pictures, score_agg):
    teacher = _teacher(hf_teachers["grounding-dino"], phrase_score=score_agg)
    found = teacher.predict(pictures, CAPTIONS, SPANS)

    texts = [caption + "." for caption in CAPTIONS]  # Grounding DINO's own preprocessing
    inputs = teacher.processor(images=pictures, text=texts, return_tensors="pt", padding="longest")
    with torch.inference_mode():
        out = teacher.model(**inputs)
    reference = teacher.processor.post_process_grounded_object_detection(
        out, inputs["input_ids"], threshold=-1.0, text_threshold=0.3, target_sizes=[(p.height, p.width) for p in pictures]
    )
    probs = out.logits.sigmoid()  # [B, queries, max_text_len]
    for image, (picture, result, detections) in enumerate(zip(pictures, reference, found)):
        encoding = teacher.tokenizer(texts[image])
        expected = {}
        for phrase, (start, end) in enumerate(SPANS[image]):
            tokens = sorted({encoding.char_to_token(i) for i in range(start, end)} - {None})
            phrase_probs = probs[image][:, tokens]  # [queries, tokens of the phrase]
            scores = phrase_probs.mean(-1) if score_agg == "mean" else phrase_probs.amax(-1)
            for box, score in zip(_clipped(result["boxes"], picture).tolist(), scores.tolist()):
                expected[(tuple(box), phrase)] = score
        assert len(detections) == len(expected)  # 20 queries x phrases < 100: every pair is a box
        for box, score, phrase in zip(detections.boxes.tolist(), detections.scores.tolist(), detections.phrase_ids.tolist()):
            assert expected[(tuple(box), phrase)] == pytest.approx(score, abs=1e-6)
        assert detections.scores.tolist() == sorted(detections.scores.tolist(), reverse=True)


def test_grounding_dino_long_caption_is_chunked_by_phrases(hf_teachers, pictures):
    teacher = _teacher(hf_teachers["grounding-dino"])
    words = ["a red car", "two old bikes", "the tall man", "a small dog", "the green tree", "a blue sky", "an open door"]
    caption = " and ".join(words)
    spans, cursor = [], 0
    for word in words:
        start = caption.index(word, cursor)
        spans.append((start, start + len(word)))
        cursor = start + len(word)
    assert len(teacher.tokenizer(caption + ".")["input_ids"]) > GD_MAX_TEXT_LEN
    chunks = teacher._prompts_for(0, caption, [[s] for s in spans])
    assert len(chunks) > 1 and sorted(i for c in chunks for i in c.phrase_ids) == list(range(len(words)))
    found = teacher.predict([pictures[0]], [caption], [spans])[0]
    # Each chunk is a caption of its own ("a red car. two old bikes. ..."): grounding that caption
    # alone gives the same boxes and scores (up to float rounding across batch compositions),
    # under the chunk's phrase indices; the merge keeps the best 100 over all chunks.
    expected = []
    for chunk in chunks:
        alone = teacher.predict([pictures[0]], [chunk.text[:-1]], [[tuple(span) for (span,) in chunk.spans]])[0]
        expected += [(b, chunk.phrase_ids[p], s) for b, s, p in zip(alone.boxes, alone.scores.tolist(), alone.phrase_ids.tolist())]
    assert len(found) == 100 < len(expected)
    cutoff = sorted((s for _, _, s in expected), reverse=True)[99]
    for box, score, phrase in zip(found.boxes, found.scores.tolist(), found.phrase_ids.tolist()):
        assert score >= cutoff - 1e-5
        assert any(p == phrase and abs(s - score) < 1e-5 and torch.allclose(b, box, atol=1e-3) for b, p, s in expected)
    assert set(found.phrase_ids.tolist()) == set(range(len(words)))


def test_owlv2_boxes_are_transformers_post_processing(hf_teachers, pictures):
    teacher = _teacher(hf_teachers["owlv2"])
    found = teacher.predict(pictures, CAPTIONS, SPANS)
    for image, (picture, detections) in enumerate(zip(pictures, found)):
        queries = [CAPTIONS[image][a:b] for a, b in SPANS[image]]
        inputs = teacher.processor(images=[picture], text=[queries], return_tensors="pt", truncation=True)
        with torch.inference_mode():
            out = teacher.model(**inputs)
        (result,) = teacher.processor.post_process_grounded_object_detection(
            out, threshold=-1.0, target_sizes=[(picture.height, picture.width)]
        )
        boxes = _clipped(result["boxes"], picture)
        # A 4 x 4 patch grid on the image padded to a square: one box per patch; the boxes of
        # patches wholly in the padding are clipped to nothing and dropped as degenerate.
        inside = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)
        expected = {
            tuple(box): (score, label)
            for box, score, label in zip(boxes[inside].tolist(), result["scores"][inside].tolist(), result["labels"][inside].tolist())
        }
        assert len(detections) == len(expected) and detections.degenerate == 16 - len(expected)
        assert 0 < len(expected) < 16 if picture.width != picture.height else len(expected) == 16
        for box, score, phrase in zip(detections.boxes.tolist(), detections.scores.tolist(), detections.phrase_ids.tolist()):
            assert expected[tuple(box)][0] == pytest.approx(score, abs=1e-5) and expected[tuple(box)][1] == phrase
    # Batched with 3 and 2 queries (padded), and chunked one query per pass: the same labels.
    alone = [teacher.predict([p], [c], [s])[0] for p, c, s in zip(pictures, CAPTIONS, SPANS)]
    teacher.max_queries = 1
    chunked = teacher.predict(pictures, CAPTIONS, SPANS)
    for one, batched, passes in zip(alone, found, chunked):
        assert one.phrase_ids.tolist() == batched.phrase_ids.tolist() == passes.phrase_ids.tolist()
        assert torch.allclose(one.scores, batched.scores, atol=1e-5) and torch.allclose(one.scores, passes.scores, atol=1e-5)


def test_identity_and_object_store_folder(hf_teachers, pictures, tmp_path):
    import fsspec

    folder = hf_teachers["owlv2"]
    source = inspect_teacher(f"hf:{folder}")
    assert source.to_dict() == {
        "checkpoint": "tiny-owlv2", "kind": "owlv2", "sha256": file_sha256(folder / "model.safetensors"),
        "variant": "owlv2/vit-32x1-p16-64px",
        "preprocessing": {"size": {"height": 64, "width": 64}, "image_mean": source.identity.preprocessing["image_mean"],
                          "image_std": source.identity.preprocessing["image_std"]},
    }
    memory = fsspec.filesystem("memory")
    memory.put(str(folder), "/models/tiny-owlv2", recursive=True)
    try:
        remote = inspect_teacher("hf:memory://models/tiny-owlv2")
        assert remote.identity == source.identity  # same name, hash, variant
        local = load_teacher(source).predict(pictures[:1], CAPTIONS[:1], SPANS[:1])[0]
        copied = load_teacher(remote).predict(pictures[:1], CAPTIONS[:1], SPANS[:1])[0]
        assert torch.equal(local.boxes, copied.boxes) and torch.equal(local.scores, copied.scores)
    finally:
        memory.rm("/models", recursive=True)


def test_ground_and_eval_take_an_hf_teacher(hf_teachers, shared_data, tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        app, ["ground", str(shared_data / IMAGES[0]), CAPTIONS[0], "--teacher", f"hf:{hf_teachers['grounding-dino']}",
              "--span", "0:5", "--threshold", "0", "--json"],
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["teacher"]["kind"] == "grounding-dino" and out["detections"]
    assert {d["phrase"] for d in out["detections"]} == {"a man"}

    gold = json.loads((shared_data / "coco_mini/annotations/instances_train2017_subset.json").read_text())
    gold["images"] = sorted(gold["images"], key=lambda i: i["id"])[:2]
    ids = {i["id"] for i in gold["images"]}
    gold["annotations"] = [a for a in gold["annotations"] if a["image_id"] in ids]
    (tmp_path / "gold.json").write_text(json.dumps(gold))
    result = runner.invoke(
        app, ["eval", "--model", f"hf:{hf_teachers['owlv2']}", "--coco", str(tmp_path / "gold.json"),
              "--images", str(shared_data / "coco_mini/train2017"), "--json"],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output.strip().splitlines()[-1])
    from model.inputs.text import detection_prompt

    # The 80 class names are 80 queries (two passes of 64): every kept box is one prediction.
    caption, spans = detection_prompt([c["name"] for c in sorted(gold["categories"], key=lambda c: c["id"])])
    pictures = [Image.open(shared_data / "coco_mini/train2017" / i["file_name"]).convert("RGB") for i in gold["images"]]
    found = _teacher(hf_teachers["owlv2"]).predict(pictures, [caption] * 2, [spans] * 2)
    assert metrics["num_images"] == 2 and metrics["teacher"]["kind"] == "owlv2"
    assert metrics["num_predictions"] == sum(len(d) for d in found) > 0


def _broken_folders(hf_teachers, root: Path) -> dict[str, tuple[Path, str]]:
    """name -> (folder, what the one-line error must say)."""
    source = hf_teachers["grounding-dino"]
    no_weights = root / "no_weights"
    shutil.copytree(source, no_weights)
    (no_weights / "model.safetensors").unlink()
    other_type = root / "bert"
    other_type.mkdir()
    (other_type / "config.json").write_text(json.dumps({"model_type": "bert"}))
    no_processor = root / "no_processor"
    shutil.copytree(source, no_processor)
    (no_processor / "processor_config.json").unlink()
    bad_weights = root / "bad_weights"
    shutil.copytree(source, bad_weights)
    (bad_weights / "model.safetensors").write_bytes(b"not safetensors")
    return {
        "missing": (root / "absent", "folder not found"),
        "empty": (root, "no config.json"),
        "no_weights": (no_weights, "no weights file"),
        "other_type": (other_type, "model_type 'bert' is not a supported teacher"),
        "no_processor": (no_processor, "no processor_config.json"),
        "bad_weights": (bad_weights, "cannot load the saved grounding-dino model"),
    }


def test_bad_teacher_folders_give_one_line_and_exit_2(hf_teachers, shared_data, tmp_path):
    runner = CliRunner()
    image = str(shared_data / IMAGES[0])
    for name, (folder, message) in _broken_folders(hf_teachers, tmp_path).items():
        result = runner.invoke(app, ["ground", image, CAPTIONS[0], "--teacher", f"hf:{folder}", "--span", "0:5"])
        assert result.exit_code == 2, (name, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and str(folder) in lines[0], (name, result.output)
    refusals = {
        ("--config", "tiny"): "--config tiny: names a GLIP configuration",
        ("--min-size", "128"): "OWLv2 runs at its square input size 64x64",
    }
    for extra, message in refusals.items():
        result = runner.invoke(app, ["ground", image, CAPTIONS[0], "--teacher", f"hf:{hf_teachers['owlv2']}", "--span", "0:5", *extra])
        assert result.exit_code == 2 and message in result.output, result.output
    result = runner.invoke(app, ["ground", image, CAPTIONS[0], "--teacher", str(hf_teachers["owlv2"]), "--span", "0:5"])
    assert result.exit_code == 2 and f"hf:{hf_teachers['owlv2']}" in result.output, result.output


def test_resolve_device():
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="--device 'tpu': choose auto, cpu or cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU is visible"):
            resolve_device("cuda")
