"""`pipeline ground` end to end on a real COCO image with a checkpoint in the official layout."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from model.weights.checkpoint import file_sha256
from model.config import get_config
from model.network.glip import GLIP
from pipeline.cli import app

IMAGE = "coco_mini/train2017/000000000790.jpg"
CAPTION = "a man riding a red motorcycle down the street"


@pytest.fixture(scope="module")
def official_file(tmp_path_factory):
    """A tiny GLIP saved exactly as the released files are: {"model": {"module." + key: ...}}.

    The official init gives every token a 1% prior, below the 0.05 pre-NMS floor; the token
    bias is raised so that an untrained model still yields candidates to check.
    """
    torch.manual_seed(0)
    model = GLIP(get_config("tiny"))
    with torch.no_grad():
        model.rpn.head.bias0.fill_(2.0)
    path = tmp_path_factory.mktemp("ckpt") / "glip_tiny_official_layout.pth"
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


def _run(*args: str):
    return CliRunner().invoke(app, ["ground", *args], catch_exceptions=False)


def test_ground_json_with_spans(shared_data, official_file):
    image = shared_data / IMAGE
    width, height = Image.open(image).size
    result = _run(
        str(image), CAPTION, "--teacher", str(official_file), "--config", "tiny",
        "--span", "0:5", "--span", "13:29", "--threshold", "0", "--min-size", "320",
        "--max-size", "512", "--json",
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert (out["width"], out["height"]) == (width, height)
    assert out["teacher"]["sha256"] == file_sha256(official_file)
    assert [p["phrase"] for p in out["phrases"]] == ["a man", "a red motorcycle"]
    assert out["detections"], "a head biased towards every token must yield detections"
    scores = [d["score"] for d in out["detections"]]
    assert scores == sorted(scores, reverse=True)
    for det in out["detections"]:
        x0, y0, x1, y1 = det["box"]
        # Boxes come back in ORIGINAL pixels although the network saw a 320-short-side image.
        assert 0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height
        start, end = det["span"]
        assert CAPTION[start:end] == det["phrase"]


def test_phrase_score_max_never_scores_a_box_below_mean(shared_data, official_file):
    args = (str(shared_data / IMAGE), CAPTION, "--teacher", str(official_file), "--config", "tiny", "--span", "2:29",
            "--threshold", "0", "--min-size", "256", "--max-size", "400", "--json")
    mean = json.loads(_run(*args).stdout)["detections"]
    maxed = json.loads(_run(*args, "--phrase-score", "max").stdout)["detections"]
    # One multi-token phrase: the max of its token probabilities is at least their mean, box by box.
    by_box = {tuple(round(v, 2) for v in d["box"]): d["score"] for d in maxed}
    shared = [(d["score"], by_box[tuple(round(v, 2) for v in d["box"])]) for d in mean if tuple(round(v, 2) for v in d["box"]) in by_box]
    assert shared and all(high >= low - 1e-6 for low, high in shared) and any(high > low for low, high in shared)
    wrong = _run(*args, "--phrase-score", "median")
    assert wrong.exit_code == 2 and "--phrase-score" in wrong.output


def test_ground_finds_phrases_itself(shared_data, official_file):
    result = _run(
        str(shared_data / IMAGE), CAPTION, "--teacher", str(official_file), "--config", "tiny",
        "--threshold", "0", "--min-size", "256", "--max-size", "400", "--json",
    )
    assert result.exit_code == 0, result.output
    phrases = [p["phrase"] for p in json.loads(result.stdout)["phrases"]]
    assert "a man" in phrases and "a red motorcycle" in phrases


def test_ground_table_output_lists_the_reference_detections(shared_data, official_file):
    """At threshold 0 the table lists every detection `GLIPPredictor` gives for the same
    weights, image, span and sizes: the same boxes and scores, best first, one line each."""
    from model.inference.predict import GLIPPredictor

    image = shared_data / IMAGE
    result = _run(
        str(image), CAPTION, "--teacher", str(official_file), "--config", "tiny",
        "--span", "0:5", "--threshold", "0", "--min-size", "256", "--max-size", "400", "--device", "cpu",
    )
    assert result.exit_code == 0, result.output
    predictor = GLIPPredictor.from_checkpoint(str(official_file), config="tiny", device="cpu", min_size=256, max_size=400)
    picture = Image.open(image)
    reference = predictor.predict([picture], [CAPTION], [[(0, 5)]])[0].above(0.0).sorted()
    assert len(reference.scores) > 0
    expected = [
        f"  {round(score, 4):.3f}  [{round(x0, 2):8.1f} {round(y0, 2):8.1f} {round(x1, 2):8.1f} {round(y1, 2):8.1f}]  'a man' [0, 5]"
        for (x0, y0, x1, y1), score in zip(reference.boxes.tolist(), reference.scores.tolist())
    ]
    lines = result.stdout.splitlines()
    assert lines[0] == f"{image} ({picture.width}x{picture.height}), 1 phrases, {len(expected)} detections above 0.0:"
    assert lines[1:] == expected


def test_ground_errors_name_the_problem(tmp_path, shared_data, official_file):
    image = str(shared_data / IMAGE)
    missing = _run(str(tmp_path / "nope.jpg"), CAPTION, "--teacher", str(official_file))
    assert missing.exit_code != 0 and "nope.jpg" in missing.output

    bad_span = _run(image, CAPTION, "--teacher", str(official_file), "--config", "tiny", "--span", "5:500")
    assert bad_span.exit_code != 0 and "5:500" in bad_span.output

    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x80\x02 not a checkpoint")
    bad_ckpt = _run(image, CAPTION, "--teacher", str(corrupt), "--span", "0:5")
    assert bad_ckpt.exit_code == 2 and "corrupt.pth" in bad_ckpt.output

    not_image = tmp_path / "text.jpg"
    not_image.write_text("hello")
    bad_image = _run(str(not_image), CAPTION, "--teacher", str(official_file), "--span", "0:5")
    assert bad_image.exit_code != 0 and "text.jpg" in bad_image.output
