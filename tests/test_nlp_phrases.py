"""Phrase extraction with the real spaCy pipeline on real captions (COCO, CC3M, web alt-text)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from nlp.cleaning import EMPTY, INVALID_UTF8, MISSING, NOT_TEXT
from nlp.phrases import CaptionPhrases, ExtractorSettings, PhraseExtractor
from nlp.pipeline_loader import (
    DEFAULT_PIPELINES,
    SpacyPipelineNotFound,
    find_pipeline,
    load_english_pipeline,
    pipeline_identity,
)


@pytest.fixture(scope="module")
def nlp():
    return load_english_pipeline()


def extractor(nlp, mode: str = "noun-chunks", **overrides: object) -> PhraseExtractor:
    return PhraseExtractor(settings=ExtractorSettings.for_mode(mode, **overrides), nlp=nlp)


def texts(result: CaptionPhrases) -> list[str]:
    return [phrase.text for phrase in result.phrases]


def assert_spans_slice_back(results: list[CaptionPhrases]) -> None:
    for result in results:
        for phrase in result.phrases:
            assert result.caption is not None
            assert result.caption[phrase.start : phrase.end] == phrase.text, (result.caption, phrase)
            assert 0 <= phrase.start < phrase.end <= len(result.caption)
        starts = [(phrase.start, phrase.end) for phrase in result.phrases]
        assert starts == sorted(starts)


def coco_captions(shared_data: Path, n: int) -> list[str]:
    annotations = json.loads((shared_data / "captions" / "coco_captions_val2017.json").read_text())["annotations"]
    return [annotation["caption"] for annotation in annotations[:n]]


def cc3m_captions(shared_data: Path, n: int) -> list[str]:
    with open(shared_data / "captions" / "cc3m_validation.tsv", encoding="utf-8") as handle:
        return [row[0] for _, row in zip(range(n), csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))]


def web_captions(shared_data: Path, n: int) -> list[object]:
    return pq.read_table(shared_data / "captions" / "web_alt_text_10000.parquet").column("TEXT").to_pylist()[:n]


def test_loader_finds_an_installed_pipeline_and_names_how_to_install_a_missing_one(nlp) -> None:
    assert find_pipeline() in DEFAULT_PIPELINES
    assert "ner" not in nlp.pipe_names and "lemmatizer" not in nlp.pipe_names
    assert "parser" in nlp.pipe_names and "tagger" in nlp.pipe_names
    identity = pipeline_identity(nlp)
    assert identity["spacy_pipeline"].startswith("en_core_web_sm")
    assert identity["spacy_pipeline_version"] == "3.8.0"
    with pytest.raises(SpacyPipelineNotFound, match="python -m spacy download en_core_web_sm"):
        load_english_pipeline("en_core_web_does_not_exist")


def test_pos_from_tag_gives_the_attribute_rulers_annotations_on_real_captions(nlp, shared_data: Path) -> None:
    captions = coco_captions(shared_data, 300) + cc3m_captions(shared_data, 300) + web_captions(shared_data, 400)
    captions = [caption for caption in captions if isinstance(caption, str)]
    stock = load_english_pipeline(stock=True)
    assert "attribute_ruler" in stock.pipe_names and "pos_from_tag" not in stock.pipe_names
    assert nlp.pipe_names[-1] == "pos_from_tag" and "attribute_ruler" not in nlp.pipe_names
    for ruled, tabled in zip(stock.pipe(captions), nlp.pipe(captions)):
        assert [(t.pos_, t.tag_, t.dep_, t.head.i) for t in ruled] == [(t.pos_, t.tag_, t.dep_, t.head.i) for t in tabled]
        assert [chunk.text for chunk in ruled.noun_chunks] == [chunk.text for chunk in tabled.noun_chunks]
    # The exceptions still override the per-tag table ("something" is tagged NN, its POS is PRON).
    assert [token.pos_ for token in nlp("something on a table")] == ["PRON", "ADP", "DET", "NOUN"]


def test_a_pipeline_without_parser_is_refused_for_noun_chunks(tmp_path: Path) -> None:
    import spacy

    spacy.blank("en").to_disk(tmp_path / "blank")
    blank = load_english_pipeline(str(tmp_path / "blank"))
    with pytest.raises(ValueError, match="needs a spaCy pipeline with a parser"):
        PhraseExtractor(nlp=blank)
    # n-grams only tokenise, so a blank pipeline is enough for them.
    result = PhraseExtractor(nlp=blank, settings=ExtractorSettings.for_mode("ngrams")).extract("red bus")
    assert texts(result) == ["red", "red bus", "bus"]


def test_noun_chunks_on_known_coco_captions(nlp) -> None:
    results = extractor(nlp).extract_batch(
        [
            "A man riding a wave on top of a surfboard.",
            "it is a beautiful view of the city at night",
            "A woman and her dog sitting on a bench in the park.",
        ]
    )
    assert texts(results[0]) == ["A man", "a wave", "a surfboard"]  # "top" is a frame position
    assert texts(results[1]) == ["the city"]  # "it" pronoun, "view" and "night" non-visual
    assert texts(results[2]) == ["A woman", "her dog", "a bench", "the park"]
    assert_spans_slice_back(results)


# Headline-style captions whose first word is a bare common noun; (caption, phrase at the start).
CAPTION_INITIAL_NOUNS = [
    ("Cyclist crossing a bridge", "Cyclist"),  # the small model reads "Cyclist" as an adjective
    ("Golden retriever in the snow", "Golden retriever"),  # "retriever" as an adverb
    ("Motorcyclist on chromed motorcycle rounding a curve roadway.", "Motorcyclist"),  # COCO val2017
    ("Small kitten sitting on top of a wooden crate.", "Small kitten"),  # COCO val2017
    ("Boy blowing out birthday candles", "Boy"),  # "Boy" as an interjection
    ("Sign in the snow that warns mountain goers.", "Sign"),  # COCO val2017; "Sign" as a verb
    ("Young woman with an umbrella", "Young woman"),
    ("Bowl of soup", "Bowl"),
]


@pytest.mark.parametrize(("caption", "initial"), CAPTION_INITIAL_NOUNS)
def test_a_capitalised_bare_noun_that_opens_the_caption_is_kept(nlp, caption: str, initial: str) -> None:
    result = extractor(nlp).extract(caption)
    assert texts(result)[0] == initial
    assert result.phrases[0].start == 0 and result.caption == caption  # spans index the caption as given
    assert_spans_slice_back([result])


def test_recase_initial_adds_only_the_first_phrase_and_can_be_switched_off(nlp) -> None:
    captions = [caption for caption, _ in CAPTION_INITIAL_NOUNS[:6]]
    off = extractor(nlp, recase_initial=False).extract_batch(captions)
    on = extractor(nlp).extract_batch(captions)
    for (_, initial), without, with_ in zip(CAPTION_INITIAL_NOUNS, off, on):
        assert initial not in texts(without)  # what the first parse alone misses
        assert texts(with_) == [initial] + [text for text in texts(without) if not initial.endswith(text)]
    # GRIT's expansion grows the recovered chunk like any other.
    assert texts(extractor(nlp, expand_referring=True).extract("Cyclist crossing a bridge")) == ["Cyclist crossing a bridge"]
    assert json.loads(extractor(nlp).settings_metadata()["extractor_settings"])["recase_initial"] is True
    assert ExtractorSettings.for_mode("glip").recase_initial is False


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("Barack Obama speaking at the White House", ["Barack Obama", "the White House"]),  # a name stays as parsed
        ("Looking up at elephants in an enclosure", ["elephants", "an enclosure"]),  # a verb stays a verb
        ("Close up of a bunch of bananas", ["bananas"]),
        ("Shop our featured flooring in the catalog", ["our featured flooring", "the catalog"]),  # an imperative
        ("Picture of a dog on a beach", ["a dog", "a beach"]),  # recovered, then dropped as non-visual
        ("Vissla 7 Seas short sleeve wetsuit", ["Vissla 7 Seas short sleeve wetsuit"]),  # a brand
        ("Running in the rain", ["the rain"]),
    ],
)
def test_caption_initial_words_that_are_no_groundable_noun_stay_out(nlp, caption: str, expected: list[str]) -> None:
    assert texts(extractor(nlp).extract(caption)) == expected


def test_glip_grammar_on_spacy_tags(nlp) -> None:
    glip = extractor(nlp, "glip")
    results = glip.extract_batch(
        ["A man riding a wave on top of a surfboard.", "The big brown dog chased two small cats near an old red barn."]
    )
    # <DT>?<JJ.*>*<NN.*>+ keeps "top" (no filters in glip mode) and needs no parser.
    assert texts(results[0]) == ["A man", "a wave", "top", "a surfboard"]
    assert texts(results[1]) == ["The big brown dog", "small cats", "an old red barn"]  # "two" is CD
    assert_spans_slice_back(results)
    # GLIP lower-cases before tagging, but the spans still index the caption as stored.
    assert results[1].caption.startswith("The big")


def test_ngrams_drop_stop_word_only_grams_and_do_not_cross_punctuation(nlp) -> None:
    result = extractor(nlp, "ngrams", ngram_max=2).extract("the red bus, in the city")
    assert texts(result) == ["the red", "red", "red bus", "bus", "the city", "city"]
    assert "in the" not in texts(result) and "bus in" not in texts(result)
    ten = extractor(nlp, "ngrams", ngram_max=10).extract("a small white dog sleeps on the big green sofa")
    assert "a small white dog sleeps on the big green sofa" in texts(ten)


def test_every_mode_on_real_captions_slices_back(nlp, shared_data: Path) -> None:
    captions = coco_captions(shared_data, 300) + cc3m_captions(shared_data, 300) + web_captions(shared_data, 300)
    for mode in ("noun-chunks", "glip", "ngrams"):
        for spans_into in ("cleaned", "source"):
            results = extractor(nlp, mode, spans_into=spans_into).extract_batch(captions)
            assert len(results) == len(captions)
            assert_spans_slice_back(results)
            parsed = [result for result in results if result.error is None]
            assert len(parsed) > 0.95 * len(captions)
            assert sum(bool(result.phrases) for result in parsed) > 0.9 * len(parsed)


def test_source_spans_point_into_the_raw_caption(nlp) -> None:
    raw = "<a href='http://x.org'>Yale</a> Children&#39;s Hospital &amp; a red car"
    cleaned = extractor(nlp).extract(raw)
    source = extractor(nlp, spans_into="source").extract(raw)
    assert cleaned.caption == "Yale Children's Hospital & a red car"
    assert source.caption == raw
    assert len(cleaned.phrases) == len(source.phrases) >= 2
    assert_spans_slice_back([cleaned, source])
    assert texts(source)[-1] == "a red car"


def test_bad_inputs_in_a_batch_give_errors_and_the_rest_is_parsed(nlp) -> None:
    batch = [
        None,
        7,
        "",
        "   ",
        "&amp;&lt;&gt;",
        "\x00\x01",
        b"caf\xe9",
        "a big " * 200_000,
        "A cat &amp; a dog\x07 on a <b>sofa</b>.",
        b"A cat & a dog on a sofa.",
    ]
    results = extractor(nlp).extract_batch(batch)
    assert [result.error for result in results[:7]] == [MISSING, NOT_TEXT, EMPTY, EMPTY, None, EMPTY, INVALID_UTF8]
    assert results[4].phrases == ()  # "&<>" parses, holds no phrase
    assert results[7].error is None and results[7].truncated
    assert texts(results[8]) == ["A cat", "a dog", "a sofa"]
    assert texts(results[9]) == ["A cat", "a dog", "a sofa"]
    assert all(result.phrases == () for result in results[:7])
    assert_spans_slice_back(results)


def test_rules_are_switchable(nlp) -> None:
    caption = "It is a beautiful view of a dog with a red collar, 2017."
    default = extractor(nlp).extract(caption)
    assert texts(default) == ["a dog", "a red collar"]
    keep = extractor(nlp, drop_pronouns=False, drop_non_visual=False, drop_non_alpha=False).extract(caption)
    assert texts(keep)[:2] == ["It", "a beautiful view"]
    expanded = extractor(nlp, expand_referring=True).extract(caption)
    assert texts(expanded) == ["a dog with a red collar"]  # GRIT keeps only the longest expression
    both = extractor(nlp, expand_referring=True, keep_contained=True).extract(caption)
    assert texts(both) == ["a dog", "a dog with a red collar", "a red collar"]
    capped = extractor(nlp, max_phrases=1).extract(caption)
    assert texts(capped) == ["a dog"]
    quoted = '"""I am the Reason the Rum is always Gone"" T-Shirt"'  # a real web alt-text
    assert texts(extractor(nlp).extract(quoted))[-1] == "T-Shirt"
    assert texts(extractor(nlp, trim_punctuation=False).extract(quoted))[-1] == '"" T-Shirt'


def test_expansion_does_not_absorb_conjuncts(nlp) -> None:
    result = extractor(nlp, expand_referring=True).extract(
        "a dog with a red collar chasing a ball and a cat that is sleeping"
    )
    assert texts(result) == ["a dog with a red collar chasing a ball", "a cat that is sleeping"]


def test_identical_captions_are_parsed_once(nlp, shared_data: Path) -> None:
    captions = cc3m_captions(shared_data, 200)
    phrase_extractor = extractor(nlp)
    results = phrase_extractor.extract_batch(captions + captions + ["  " + captions[0] + "  "])
    assert phrase_extractor.parsed_texts == len(set(captions))
    assert results[: len(captions)] == results[len(captions) : 2 * len(captions)]
    assert results[-1] == results[0]


def test_repeated_phrase_texts_are_kept_unless_deduplicated(nlp) -> None:
    caption = "A dog near a dog and a cat"
    both = extractor(nlp).extract(caption)
    assert texts(both) == ["A dog", "a dog", "a cat"]  # two spans, two dogs: each its own phrase
    assert both.phrases[0].start != both.phrases[1].start
    first = extractor(nlp, dedupe_text=True).extract(caption)
    assert texts(first) == ["A dog", "a cat"]
    ngrams = extractor(nlp, "ngrams", ngram_max=1, dedupe_text=True).extract(caption)
    assert texts(ngrams) == ["dog", "near", "cat"]


def test_settings_metadata_names_every_rule(nlp) -> None:
    metadata = extractor(nlp).settings_metadata()
    settings = json.loads(metadata["extractor_settings"])
    for rule in (
        "mode",
        "drop_pronouns",
        "drop_non_visual",
        "drop_non_alpha",
        "trim_punctuation",
        "expand_referring",
        "dedupe_text",
        "max_phrases",
        "cleaning.unescape_html",
        "cleaning.strip_web_junk",
        "cleaning.max_chars",
    ):
        assert rule in settings
    assert metadata["spacy_pipeline_version"] == "3.8.0"
    with pytest.raises(ValueError, match="unknown mode"):
        ExtractorSettings(mode="chunks")


IMPORT_PROBE = """
import json, sys
from nlp.pipeline_loader import load_english_pipeline
nlp = load_english_pipeline(sys.argv[1] or None)
import thinc.compat
before = "torch" in sys.modules
import torch  # the process can still import it afterwards
doc = nlp("A young woman with an umbrella crossing a bridge")
print(json.dumps({"torch_at_load": before, "thinc_torch": thinc.compat.has_torch, "torch": torch.__version__,
                  "chunks": [chunk.text for chunk in doc.noun_chunks]}))
"""


def _probe(name: str) -> dict:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", IMPORT_PROBE, name], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_default_pipeline_loads_without_torch_and_a_named_folder_as_spacy_does():
    """The default pipeline is loaded without thinc importing torch (1.7-2 s of every parse
    actor's start); torch stays importable after. A pipeline named by folder (it could be a
    transformer) gets spaCy's usual import, torch included. Same parse either way."""
    default = _probe("")
    assert default["torch_at_load"] is False and default["thinc_torch"] is False and default["torch"]
    package = __import__(find_pipeline())
    folder = next(Path(package.__file__).parent.glob(f"{find_pipeline()}-*"))
    named = _probe(str(folder))
    assert named["torch_at_load"] is True and named["thinc_torch"] is True
    assert default["chunks"] == named["chunks"] and "an umbrella" in default["chunks"]
