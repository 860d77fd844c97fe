"""Captions -> groundable phrases with `[start, end)` character spans.

Three modes, all on one spaCy pipeline (`nlp.pipeline_loader`):

* `noun-chunks` (default): spaCy's English noun chunks (GRIT's first step in Kosmos-2,
  Florence-2's phrase source), cleaned by the switches of `ExtractorSettings`. A caption
  that opens with a capitalised common noun no chunk covers ("Cyclist crossing a bridge":
  the small model reads "Cyclist" as an adjective) is parsed a second time with that letter
  in lower case, and the chunk found there at the caption's start is kept (`recase_initial`).
* `glip`: GLIP's own demo grammar `NP: {<DT>?<JJ.*>*<NN.*>+}` (`run_ner` in the official
  `predictor_glip.py`) applied to spaCy's fine-grained (Penn Treebank) tags instead of
  NLTK's, whose tagger data cannot be installed here. Like GLIP, the caption is lower-cased
  before tagging. Unlike GLIP, each phrase keeps the span of the words it was built from
  (GLIP re-finds the phrase text with `re.finditer`, which also hits substrings such as
  "cat" in "concatenate").
* `ngrams`: OWL-ST (OWLv2) style word n-grams up to `ngram_max` words, n-grams made only of
  stop words dropped. N-grams do not cross punctuation. Only spaCy's tokenizer runs.

Spans follow GLIP's `tokens_positive` convention: `caption[start:end] == text`, offsets
into the caption as a Python string, where `caption` is the stored caption of
`CaptionPhrases` (the cleaned caption by default; see `nlp.cleaning`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Literal

from nlp.cleaning import CleanCaption, CleaningSettings, clean_caption
from nlp.pipeline_loader import load_english_pipeline, pipeline_identity
from nlp.vocabulary import is_non_visual_head

if TYPE_CHECKING:
    from spacy.language import Language
    from spacy.tokens import Doc, Span

Mode = Literal["noun-chunks", "glip", "ngrams"]
MODES: tuple[str, ...] = ("noun-chunks", "glip", "ngrams")
PARSE_FAILED = "parse_failed"  # spaCy raised on this caption (never seen on real data; kept for safety)

# Dependency labels whose subtrees a referring expression does not absorb: coordination
# would merge two objects ("a dog and a cat"), punctuation and appositions are not part of it.
_NOT_EXPANDED = frozenset({"cc", "conj", "punct", "appos", "preconj"})
# Penn tags -> one letter, so the GLIP grammar becomes a plain regular expression.
_GLIP_TAG_CODE = {"DT": "D", "JJ": "J", "JJR": "J", "JJS": "J", "NN": "N", "NNS": "N", "NNP": "N", "NNPS": "N"}
_GLIP_GRAMMAR = re.compile(r"D?J*N+")
_ARTICLE = "the "  # put back before a headline-style caption's bare first noun (`_recased`)


@dataclass(frozen=True, slots=True)
class Phrase:
    """One groundable phrase: `caption[start:end] == text` (character offsets, end exclusive)."""

    text: str
    start: int
    end: int


@dataclass(frozen=True, kw_only=True)
class CaptionPhrases:
    """The extractor's answer for one caption.

    `caption` is the string the spans index (None when the input was not text), `phrases`
    are in caption order, `error` is None when the caption was parsed (even with no phrase),
    else a reason from `nlp.cleaning` or `PARSE_FAILED`. `truncated` marks captions cut at the
    length limit.
    """

    caption: str | None
    phrases: tuple[Phrase, ...]
    error: str | None
    truncated: bool = False


@dataclass(frozen=True, kw_only=True)
class ExtractorSettings:
    """Every rule of the extractor as a named switch; `to_metadata()` records them all.

    Use `ExtractorSettings.for_mode(mode)` for the defaults of a mode: the phrase filters
    (`drop_non_visual`, `drop_pronouns`) are on for `noun-chunks` and off for `glip` and
    `ngrams`, which reproduce GLIP's and OWL-ST's unfiltered phrase sets.
    """

    mode: str = "noun-chunks"
    cleaning: CleaningSettings = field(default_factory=CleaningSettings)
    drop_pronouns: bool = True  # "it", "this", "who", "that": nothing to box
    drop_non_visual: bool = True  # head noun in nlp.vocabulary.NON_VISUAL_HEADS
    drop_non_alpha: bool = True  # no alphabetic word: "2008", "170x170", "L69"
    trim_punctuation: bool = True  # '"" T-Shirt' -> 'T-Shirt' (GLIP's run_ner strips punctuation too)
    expand_referring: bool = False  # GRIT step 2: grow chunks along the dependency tree
    keep_contained: bool = False  # with expansion: keep phrases inside a longer one (GRIT drops them)
    dedupe_text: bool = False  # keep only the first phrase of each lower-cased text ("a dog ... a dog")
    max_phrases: int | None = 32  # cap per caption, first ones in caption order kept
    ngram_max: int = 3  # `ngrams` mode: longest n-gram in words (OWL-ST used 10)
    glip_lowercase: bool = True  # `glip` mode: tag the lower-cased caption, as GLIP's run_ner does
    recase_initial: bool = True  # `noun-chunks` mode: re-parse an uncovered capitalised first word in lower case
    spans_into: Literal["cleaned", "source"] = "cleaned"  # which string `caption` and the spans are

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.max_phrases is not None and self.max_phrases < 1:
            raise ValueError(f"max_phrases must be >= 1 or None, got {self.max_phrases}")
        if self.ngram_max < 1:
            raise ValueError(f"ngram_max must be >= 1, got {self.ngram_max}")
        if self.spans_into not in ("cleaned", "source"):
            raise ValueError(f"spans_into must be 'cleaned' or 'source', got {self.spans_into!r}")

    @classmethod
    def for_mode(cls, mode: str, **overrides: object) -> ExtractorSettings:
        """Defaults of `mode` (see the class docstring), then `overrides`."""
        defaults: dict[str, object] = {"mode": mode}
        if mode in ("glip", "ngrams"):
            defaults.update(drop_non_visual=False, drop_pronouns=False, recase_initial=False)
        if mode == "ngrams":
            defaults.update(max_phrases=256)
        defaults.update(overrides)
        return cls(**defaults)  # type: ignore[arg-type]

    def to_metadata(self) -> dict[str, object]:
        """A flat JSON-able dict of every switch (cleaning switches prefixed `cleaning.`)."""
        flat = {key: value for key, value in asdict(self).items() if key != "cleaning"}
        flat.update({f"cleaning.{key}": value for key, value in asdict(self.cleaning).items()})
        return flat


class PhraseExtractor:
    """Extracts phrases from captions with one spaCy pipeline, parsing in `nlp.pipe` batches.

    Build one per process (a Ray actor, a notebook); it is not thread-safe.
    `parsed_texts` counts the distinct cleaned captions actually parsed, so callers can
    report how much de-duplication saved.
    """

    def __init__(
        self,
        *,
        settings: ExtractorSettings | None = None,
        nlp: Language | None = None,
        pipeline_name: str | None = None,
        batch_size: int = 256,
    ) -> None:
        self.settings = settings or ExtractorSettings()
        self.nlp = nlp if nlp is not None else load_english_pipeline(pipeline_name)
        self.batch_size = batch_size
        self.parsed_texts = 0
        required = {"noun-chunks": "parser", "glip": "tagger"}.get(self.settings.mode)
        if required is not None and required not in self.nlp.pipe_names:
            raise ValueError(
                f"mode {self.settings.mode!r} needs a spaCy pipeline with a {required}; "
                f"this one has {self.nlp.pipe_names}"
            )

    def extract(self, caption: object) -> CaptionPhrases:
        """Phrases of one caption (any value; bad input gives an `error`, never an exception)."""
        return self.extract_batch([caption])[0]

    def extract_batch(self, captions: Iterable[object]) -> list[CaptionPhrases]:
        """Phrases of every caption, in input order.

        Identical cleaned captions are parsed once (web shards repeat captions a lot).
        """
        cleaned = [clean_caption(value, self.settings.cleaning) for value in captions]
        unique_texts = list(dict.fromkeys(item.text for item in cleaned if item.error is None))
        spans_by_text, failures = self._spans_of_texts(unique_texts)
        self.parsed_texts += len(unique_texts)
        return [self._answer(item, spans_by_text, failures) for item in cleaned]

    def settings_metadata(self) -> dict[str, str]:
        """String metadata for output files: spaCy pipeline identity and the settings as JSON.

        Keys: `spacy_pipeline`, `spacy_pipeline_version`, `spacy_version`,
        `spacy_components`, `extractor_settings` (JSON of `ExtractorSettings.to_metadata()`).
        """
        metadata = pipeline_identity(self.nlp)
        metadata["extractor_settings"] = json.dumps(self.settings.to_metadata(), sort_keys=True)
        return metadata

    # --- parsing ---------------------------------------------------------------------------

    def _spans_of_texts(self, texts: list[str]) -> tuple[dict[str, list[tuple[int, int]]], dict[str, str]]:
        """Cleaned text -> its phrase spans; texts spaCy failed on -> failure reason."""
        spans: dict[str, list[tuple[int, int]]] = {}
        failures: dict[str, str] = {}
        if not texts:
            return spans, failures
        try:
            spans.update(self._parse(texts))
        except Exception:  # noqa: BLE001 - one bad caption must not sink the batch: retry one by one
            for text in texts:
                try:
                    spans.update(self._parse([text]))
                except Exception as error:  # noqa: BLE001
                    failures[text] = f"{PARSE_FAILED}: {type(error).__name__}"
        return spans, failures

    def _parse(self, texts: list[str]) -> dict[str, list[tuple[int, int]]]:
        """Phrase spans of each text: one `nlp.pipe` pass, then a second pass over the few
        texts whose capitalised first word the first parse left outside every noun chunk."""
        spans: dict[str, list[tuple[int, int]]] = {}
        recase: dict[str, list[tuple[int, int]]] = {}
        recasing = self.settings.mode == "noun-chunks" and self.settings.recase_initial
        for text, doc in zip(texts, self._pipe(texts)):
            candidates = self._candidate_spans(doc)
            if recasing and _uncovered_capitalised_start(doc):
                recase[text] = candidates
            else:
                spans[text] = self._finish(text, candidates)
        if recase:
            spans.update(self._recased(recase))
        return spans

    def _recased(self, first_spans: dict[str, list[tuple[int, int]]]) -> dict[str, list[tuple[int, int]]]:
        """Spans of texts whose first word the first parse left out (`_uncovered_capitalised_start`),
        given their first-parse spans: parsed again with the first letter in lower case, and where
        that parse reads the word as a noun but still chunks nothing there ("cyclist crossing a
        bridge" makes "cyclist crossing" a compound), once more with the article a headline-style
        caption drops ("the cyclist crossing a bridge"). Each adds its initial chunk, if any."""
        spans: dict[str, list[tuple[int, int]]] = {}
        with_article: dict[str, list[tuple[int, int]]] = {}
        lowered = {text: _lower_same_length(text[:1]) + text[1:] for text in first_spans}
        for (text, candidates), doc in zip(first_spans.items(), self._pipe(list(lowered.values()))):
            initial = self._noun_chunk_spans(doc, chunks=[c for c in doc.noun_chunks if _is_initial_common_noun(c)])
            if not initial and doc[0].pos_ == "NOUN":
                with_article[text] = candidates
            else:
                spans[text] = self._finish(text, _with_initial(candidates, initial))
        shift = len(_ARTICLE)
        for (text, candidates), doc in zip(with_article.items(), self._pipe([_ARTICLE + lowered[t] for t in with_article])):
            chunks = [doc[1 : c.end] for c in doc.noun_chunks if c.start <= 1 < c.end and c.root.pos_ == "NOUN"]
            initial = [(max(0, start - shift), end - shift) for start, end in self._noun_chunk_spans(doc, chunks=chunks)]
            spans[text] = self._finish(text, _with_initial(candidates, initial))
        return spans

    def _pipe(self, texts: list[str]) -> Iterable[Doc]:
        mode = self.settings.mode
        if mode == "ngrams":
            return self.nlp.tokenizer.pipe(texts, batch_size=self.batch_size)
        if mode == "glip" and self.settings.glip_lowercase:
            texts = [_lower_same_length(text) for text in texts]
        # n_process=1: callers parallelise across processes (Ray actors), never inside one.
        return self.nlp.pipe(texts, batch_size=self.batch_size, n_process=1)

    def _candidate_spans(self, doc: Doc) -> list[tuple[int, int]]:
        mode = self.settings.mode
        if mode == "noun-chunks":
            return self._noun_chunk_spans(doc)
        if mode == "glip":
            return self._glip_spans(doc)
        return self._ngram_spans(doc)

    def _finish(self, text: str, candidates: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Candidate spans of `text` in caption order, deduplicated and capped."""
        # Identical spans are never emitted twice (GLIP's run_ner re-finds every phrase text in the
        # caption and so reports "a dog" twice per occurrence when the caption repeats it).
        spans = sorted(set(candidates))
        if self.settings.dedupe_text:
            spans = _first_of_each_text(text, spans)
        if self.settings.max_phrases is not None:
            spans = spans[: self.settings.max_phrases]
        return spans

    def _noun_chunk_spans(self, doc: Doc, *, chunks: Iterable[Span] | None = None) -> list[tuple[int, int]]:
        """Spans of `chunks` (default: every noun chunk of `doc`) that pass the filters."""
        settings = self.settings
        spans: list[tuple[int, int]] = []
        for chunk in doc.noun_chunks if chunks is None else chunks:
            root = chunk.root
            if settings.drop_pronouns and root.pos_ == "PRON":
                continue
            if settings.trim_punctuation:
                chunk = _trim_punctuation(chunk)
            if not len(chunk) or not self._keep_phrase(chunk, head_text=root.text):
                continue
            spans.append((chunk.start_char, chunk.end_char))
            if settings.expand_referring:
                expanded = _referring_expression(chunk)
                if expanded is not None:
                    spans.append(expanded)
        if settings.expand_referring and not settings.keep_contained:
            spans = _drop_contained(spans)
        return spans

    def _glip_spans(self, doc: Doc) -> list[tuple[int, int]]:
        codes = "".join(_GLIP_TAG_CODE.get(token.tag_, "x") for token in doc)
        spans = []
        for match in _GLIP_GRAMMAR.finditer(codes):
            phrase = doc[match.start() : match.end()]
            if self._keep_phrase(phrase, head_text=phrase[-1].text):
                spans.append((phrase.start_char, phrase.end_char))
        return spans

    def _ngram_spans(self, doc: Doc) -> list[tuple[int, int]]:
        spans = []
        for run in _word_runs(doc):
            for first in range(len(run)):
                for last in range(first, min(first + self.settings.ngram_max, len(run))):
                    words = run[first : last + 1]
                    if all(token.is_stop for token in words):
                        continue
                    phrase = doc[words[0].i : words[-1].i + 1]
                    if self._keep_phrase(phrase, head_text=words[-1].text):
                        spans.append((phrase.start_char, phrase.end_char))
        return spans

    def _keep_phrase(self, phrase: Span, *, head_text: str) -> bool:
        if self.settings.drop_non_alpha and not any(token.is_alpha for token in phrase):
            return False
        if self.settings.drop_non_visual and is_non_visual_head(head_text):
            return False
        return True

    # --- answers ---------------------------------------------------------------------------

    def _answer(
        self, item: CleanCaption, spans_by_text: dict[str, list[tuple[int, int]]], failures: dict[str, str]
    ) -> CaptionPhrases:
        into_source = self.settings.spans_into == "source"
        if item.error is not None:
            return CaptionPhrases(caption=item.source, phrases=(), error=item.error, truncated=item.truncated)
        if item.text in failures:
            return CaptionPhrases(caption=item.source, phrases=(), error=failures[item.text], truncated=item.truncated)
        caption = item.source if into_source else item.text
        assert caption is not None  # a caption without error always has text
        phrases = []
        for start, end in spans_by_text[item.text]:
            if into_source:
                start, end = item.source_span(start, end)
            phrases.append(Phrase(text=caption[start:end], start=start, end=end))
        return CaptionPhrases(caption=caption, phrases=tuple(phrases), error=None, truncated=item.truncated)


def _lower_same_length(text: str) -> str:
    """`text.lower()`, except characters whose lower case is longer ("İ") stay as they are.

    Keeps character offsets valid for the original text.
    """
    lowered = text.lower()
    if len(lowered) == len(text):
        return lowered
    return "".join(char.lower() if len(char.lower()) == 1 else char for char in text)


def _uncovered_capitalised_start(doc: Doc) -> bool:
    """True when `doc` opens with a capitalised word ("Cyclist"; not "A", "USA" or "iPhone")
    that no noun chunk covers, followed by a lower-case word or by no word at all.

    The small English model often reads such a caption-initial common noun as an adjective,
    adverb or verb ("Cyclist crossing a bridge", "Golden retriever in the snow"): in its
    training text a capital there says little. A capitalised second word marks a title or a
    name ("Barack Obama speaking", "Owl On Tree Wall Sticker"), which stays as first parsed.
    """
    if not len(doc):
        return False
    first = doc[0]
    word = first.text
    if first.is_stop or not (first.is_alpha and len(word) > 1 and word[0].isupper() and word[1:].islower()):
        return False
    if len(doc) > 1 and doc[1].is_alpha and not doc[1].text.islower():
        return False
    return not any(chunk.start == 0 for chunk in doc.noun_chunks)


def _is_initial_common_noun(chunk: Span) -> bool:
    """A chunk of the lower-cased re-parse that starts the caption and is headed by a common
    noun: NOUN, or PROPN on a lower-case word after the first (a tagging slip: "golden
    retriever"). A re-parse that still reads a proper name ("vissla 7 Seas") adds nothing."""
    root = chunk.root
    if chunk.start != 0:
        return False
    return root.pos_ == "NOUN" or (root.pos_ == "PROPN" and root.i > 0 and root.text.islower())


def _with_initial(spans: list[tuple[int, int]], initial: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """`spans` plus the re-parse's `initial` spans, which replace the spans they contain; where
    the two parses disagree on a boundary (spans that cross), the first parse stands."""
    if not initial:
        return spans
    kept = [span for span in spans if not any(new[0] <= span[0] and span[1] <= new[1] for new in initial)]
    if any(span[0] < new[1] and new[0] < span[1] for span in kept for new in initial):
        return spans
    return kept + initial


def _first_of_each_text(text: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    seen: set[str] = set()
    kept = []
    for start, end in spans:
        phrase = text[start:end].lower()
        if phrase not in seen:
            seen.add(phrase)
            kept.append((start, end))
    return kept


def _trim_punctuation(phrase: Span) -> Span:
    """`phrase` without punctuation tokens at either end (may become empty)."""
    start, end = phrase.start, phrase.end
    doc = phrase.doc
    while start < end and doc[start].is_punct:
        start += 1
    while end > start and doc[end - 1].is_punct:
        end -= 1
    return doc[start:end]


def _word_runs(doc: Doc) -> list[list]:
    """Maximal runs of word tokens (no punctuation or whitespace tokens between them)."""
    runs: list[list] = [[]]
    for token in doc:
        if token.is_punct or token.is_space:
            if runs[-1]:
                runs.append([])
        else:
            runs[-1].append(token)
    return [run for run in runs if run]


def _referring_expression(chunk: Span) -> tuple[int, int] | None:
    """GRIT's expansion: the chunk plus its root's dependency subtree, as one contiguous span.

    Children joined by coordination, punctuation or apposition are not absorbed; chunks
    whose root has a conjunct are not expanded at all (GRIT: "we do not expand noun chunks
    with conjunctions"). The span stops at the first gap left by an excluded subtree.
    Returns None when nothing is added to the chunk.
    """
    root = chunk.root
    if any(child.dep_ == "conj" for child in root.children):
        return None
    included = {root.i}
    stack = [root]
    while stack:
        token = stack.pop()
        for child in token.children:
            if child.dep_ in _NOT_EXPANDED:
                continue
            included.add(child.i)
            stack.append(child)
    included.update(range(chunk.start, chunk.end))
    first, last = chunk.start, chunk.end - 1
    while first - 1 in included:
        first -= 1
    while last + 1 in included:
        last += 1
    doc = chunk.doc
    start_char, end_char = doc[first].idx, doc[last].idx + len(doc[last])
    if (start_char, end_char) == (chunk.start_char, chunk.end_char):
        return None
    return start_char, end_char


def _drop_contained(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Spans not strictly inside another span of the list (GRIT keeps only the longest)."""
    unique = set(spans)
    return [
        span
        for span in spans
        if not any(other != span and other[0] <= span[0] and span[1] <= other[1] for other in unique)
    ]


__all__ = [
    "MODES",
    "PARSE_FAILED",
    "CaptionPhrases",
    "ExtractorSettings",
    "Mode",
    "Phrase",
    "PhraseExtractor",
]
