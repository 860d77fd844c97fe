"""Caption sanitising: every bad-input kind, the offset map back to the source, web junk."""

from __future__ import annotations

import csv

import pyarrow.parquet as pq
import pytest

from nlp.cleaning import (
    EMPTY,
    INVALID_UTF8,
    MAX_CAPTION_CHARS,
    MISSING,
    NOT_TEXT,
    CleaningSettings,
    clean_caption,
)
from nlp.vocabulary import NON_VISUAL_HEADS, is_non_visual_head


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (None, MISSING),
        (42, NOT_TEXT),
        (3.5, NOT_TEXT),
        (float("nan"), NOT_TEXT),
        (["a dog"], NOT_TEXT),
        ({"caption": "a dog"}, NOT_TEXT),
        ("", EMPTY),
        ("   \t\n  ", EMPTY),
        ("\x00\x01\x1f\u200b\ufeff", EMPTY),
        ("&nbsp;&#160;", EMPTY),
        ("<br/><p></p>", EMPTY),
        (b"caf\xe9 au lait", INVALID_UTF8),  # latin-1, not UTF-8
        (b"\xff\xfe\x00d\x00o\x00g", INVALID_UTF8),  # UTF-16 with BOM
    ],
)
def test_bad_values_give_an_error_and_no_text(value: object, error: str) -> None:
    cleaned = clean_caption(value)
    assert cleaned.error == error
    assert cleaned.text == ""


def test_bytes_are_decoded_and_invalid_bytes_keep_a_readable_source() -> None:
    assert clean_caption("a café".encode()).text == "a café"
    invalid = clean_caption(b"caf\xe9 au lait")
    assert invalid.source == "caf\ufffd au lait"
    replaced = clean_caption(b"caf\xe9 au lait", CleaningSettings(decode_errors="replace"))
    assert replaced.error is None and replaced.text == "caf\ufffd au lait"


def test_html_entities_tags_control_characters_and_whitespace() -> None:
    source = "A  dog &amp;amp; a <b>cat</b>\x00 on\ta mat\u200b.&#39;s"
    cleaned = clean_caption(source)
    assert cleaned.error is None
    assert cleaned.text == "A dog & a cat on a mat.'s"
    # Each switch can be turned off on its own.
    kept_entities = clean_caption(source, CleaningSettings(unescape_html=False))
    assert "&amp;amp;" in kept_entities.text
    kept_tags = clean_caption(source, CleaningSettings(strip_html_tags=False))
    assert "<b>cat</b>" in kept_tags.text


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("a dog next to \x1b[31m a red car\x1b[0m", "a dog next to a red car"),
        ("a \x1b[1;4;38;5;196mbold\x1b[m cat", "a bold cat"),
        ("a cat\x1b]0;evil window title\x07 on a mat", "a cat on a mat"),
        ("a cat\x1b]8;;http://x.example\x1b\\link\x1b]8;;\x1b\\ here", "a cat link here"),
        ("\x9b31ma red ball", "a red ball"),
        ("a dog\x1bc barking\x1b", "a dog barking"),
    ],
)
def test_terminal_escape_sequences_are_removed_whole(source: str, expected: str) -> None:
    cleaned = clean_caption(source)
    assert cleaned.text == expected
    start = cleaned.text.index(expected.split()[-1])
    a, b = cleaned.source_span(start, len(cleaned.text))
    assert source[a:b] == expected.split()[-1]
    assert clean_caption(source, CleaningSettings(strip_control_chars=False)).text != expected


def test_spans_map_back_to_the_source_caption() -> None:
    source = "  <a href='http://x.org/y'>Red &amp; white</a>\u200b   lighthouse \x07 on rocks"
    cleaned = clean_caption(source)
    assert cleaned.text == "Red & white lighthouse on rocks"
    for word in ("Red", "&", "white", "lighthouse", "rocks", "Red & white lighthouse"):
        start = cleaned.text.index(word)
        a, b = cleaned.source_span(start, start + len(word))
        original = source[a:b]
        if word == "&":
            assert original == "&amp;"
        elif word == "Red & white lighthouse":
            assert original.startswith("Red &amp; white") and original.endswith("lighthouse")
        else:
            assert original == word


def test_an_untouched_caption_maps_to_itself() -> None:
    caption = "A man riding a wave on top of a surfboard."
    cleaned = clean_caption(caption)
    assert cleaned.text == caption
    assert cleaned.source_span(2, 5) == (2, 5)
    with pytest.raises(ValueError, match="non-empty span"):
        cleaned.source_span(3, 3)


def test_one_megabyte_caption_is_truncated_at_the_documented_limit() -> None:
    source = "a red bus on the street " * 45_000  # ~1 MB
    cleaned = clean_caption(source)
    assert cleaned.error is None and cleaned.truncated
    assert len(cleaned.text) <= MAX_CAPTION_CHARS
    assert cleaned.text.endswith("street") or cleaned.text.endswith("the")  # cut at a word boundary
    a, b = cleaned.source_span(0, len(cleaned.text))
    assert source[a:b] == cleaned.text
    assert not clean_caption("short").truncated
    assert len(clean_caption("x" * 5000).text) == MAX_CAPTION_CHARS  # no space: cut mid-word


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("Woman with umbrella - stock photo | Shutterstock", "Woman with umbrella"),
        ("Banded Dragonfly DSC_1073.jpg, Guyana", "Banded Dragonfly , Guyana"),
        ("see https://example.com/a.jpg now", "see now"),
        ("(c) 2014 John Smith", "John Smith"),
        ("royalty-free vector illustration of a cat", "vector illustration of a cat"),
        ("oil-rigs-sunset1.jpeg", ""),
        ("contact me at someone@example.com", "contact me at"),
    ],
)
def test_web_junk_is_removed(source: str, expected: str) -> None:
    assert clean_caption(source).text == expected
    assert clean_caption(source, CleaningSettings(strip_web_junk=False)).text == " ".join(source.split())


def test_non_visual_vocabulary_is_curated_and_matches_plurals() -> None:
    for word in ("time", "love", "view", "image", "photo", "picture", "stock", "royalty", "vector", "illustration"):
        assert word in NON_VISUAL_HEADS
    assert is_non_visual_head("Photos") and is_non_visual_head("VIEWS")
    for visual in ("dog", "bus", "lot", "range", "glass", "bus"):
        assert not is_non_visual_head(visual)


def test_real_web_captions_never_raise_and_keep_the_offset_invariant(shared_data) -> None:
    web = pq.read_table(shared_data / "captions" / "web_alt_text_10000.parquet").column("TEXT").to_pylist()
    with open(shared_data / "captions" / "cc3m_validation.tsv", encoding="utf-8") as handle:
        cc3m = [row[0] for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)][:2000]
    changed = 0
    for caption in web + cc3m:
        cleaned = clean_caption(caption)
        if cleaned.error is not None:
            assert cleaned.error in (EMPTY, MISSING)
            continue
        changed += cleaned.text != caption
        # Every cleaned word maps back to the same word in the source.
        position = 0
        for word in cleaned.text.split(" "):
            start = cleaned.text.index(word, position)
            position = start + len(word)
            a, b = cleaned.source_span(start, position)
            if "&" not in caption and "<" not in caption:
                assert caption[a:b] == word
    assert changed > 100  # the web file really is dirty
