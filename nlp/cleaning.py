"""Caption sanitising that never raises and remembers where every character came from.

`clean_caption(value)` accepts anything a shard can hold in a caption field (str, UTF-8
bytes, None, a number from a badly typed Parquet column) and returns a `CleanCaption`:

* `source`: the caption as a Python string (bytes decoded), exactly as given; None when
  the value was not text at all.
* `text`: what the parser sees: HTML entities decoded, HTML tags, terminal escape sequences
  (ANSI/CSI colours, OSC titles), control and zero-width characters and web boilerplate (`nlp.vocabulary.WEB_JUNK_RULES`) removed, whitespace
  collapsed, cut to `max_chars`. Empty when `error` is set.
* `error`: None, or one of `MISSING`, `NOT_TEXT`, `INVALID_UTF8`, `EMPTY`.
* `source_span(start, end)`: maps a `[start, end)` span of `text` back to a span of
  `source`, so a phrase found in the cleaned text can also be reported against the raw
  caption (`source[a:b]` then covers the same words, plus any markup that sat between them).

Which string the phrase spans index is the extractor's `spans_into` setting. The default,
and what `pipeline parse-captions` stores in its `caption` column, is the *cleaned* text:
it is the text the teacher will read (no `&amp;`, no `<a href=...>`), and GLIP's
`tokens_positive` must index the very string that is tokenised. Either way the stored
caption and the spans agree: `caption[start:end] == text` for every phrase.

Length limit: `MAX_CAPTION_CHARS` (1,024) characters of cleaned text, cut at the last space
before the limit. GLIP's text encoder reads at most 256 BERT tokens (`max_query_len`), about
1,000 characters of English, so nothing past the limit could be grounded anyway. Cleaning
itself only looks at the first `MAX_SOURCE_CHARS` (65,536) characters of the source, which
bounds the work a 1 MB caption costs; both cuts set `truncated`.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from nlp.vocabulary import JUNK_TRIGGERS, WEB_JUNK_RULES

MAX_CAPTION_CHARS = 1024
MAX_SOURCE_CHARS = 65_536

# Error reasons (the `error` column of the phrases parquet).
MISSING = "missing"  # None: the sample has no caption
NOT_TEXT = "not_text"  # a number, list, ... where a caption should be
INVALID_UTF8 = "invalid_utf8"  # bytes that are not UTF-8
EMPTY = "empty"  # nothing left after cleaning (empty, whitespace, markup only)

_ENTITY = re.compile(r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});?")
# A tag starts with a letter, "/" or "!" so that "a <3 b" and "x < y > z" survive.
_TAG = re.compile(r"<[A-Za-z/!][^<>]{0,1000}>")
# C0/C1 controls other than tab/newline/CR become a space (they often separate words);
# format characters (zero-width space/joiners, bidi marks, soft hyphen, BOM) vanish.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# Terminal escape sequences (ECMA-48) go whole, before the controls, so that "\x1b[31m" leaves no
# "[31m": CSI (ESC [ or U+009B, parameters, intermediates, a final byte), OSC/DCS/APC/PM
# strings ended by BEL or ESC \ (unended: only their introducer goes), and two-character
# escapes (ESC and one byte).
_ESCAPE_SEQUENCE = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"
    r"|(?:\x1b[\]PX^_]|[\x90\x9d\x98\x9e\x9f])[^\x07\x1b\x9c]{0,1000}(?:\x07|\x1b\\|\x9c)"
    r"|\x1b[ -~]"
)
_C1_INTRODUCERS = re.compile(r"[\x90\x98\x9b\x9d-\x9f]")
_INVISIBLE = re.compile(r"[\u00ad\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
# Only runs that change: two or more whitespace characters, or one that is not a plain space.
_WHITESPACE_RUN = re.compile(r"\s{2,}|[^\S ]")


@dataclass(frozen=True, kw_only=True)
class CleaningSettings:
    """Switches of the caption sanitiser; every one is recorded in the output metadata."""

    unescape_html: bool = True  # "&amp;" -> "&", "&#39;" -> "'" (twice: web text is often double-escaped)
    strip_html_tags: bool = True  # "<a href='...'>Yale</a>" -> " Yale "
    strip_control_chars: bool = True
    strip_web_junk: bool = True  # URLs, file names, stock credits (nlp.vocabulary.WEB_JUNK_RULES)
    collapse_whitespace: bool = True
    max_chars: int = MAX_CAPTION_CHARS
    decode_errors: Literal["error", "replace"] = "error"  # non-UTF-8 bytes: error row, or U+FFFD

    def __post_init__(self) -> None:
        if self.max_chars < 1:
            raise ValueError(f"max_chars must be >= 1, got {self.max_chars}")
        if self.decode_errors not in ("error", "replace"):
            raise ValueError(f"decode_errors must be 'error' or 'replace', got {self.decode_errors!r}")


@dataclass(frozen=True, kw_only=True)
class CleanCaption:
    """A sanitised caption and the map from its characters back to the source string.

    `_lo[i]`/`_hi[i]` are the source offsets `[lo, hi)` that produced character `i` of
    `text`; None means `text` is a prefix of `source` (the common, untouched case).
    """

    source: str | None
    text: str
    error: str | None
    truncated: bool = False
    _lo: tuple[int, ...] | None = None
    _hi: tuple[int, ...] | None = None

    def source_span(self, start: int, end: int) -> tuple[int, int]:
        """`[start, end)` in `text` -> `[start, end)` in `source` (non-empty spans only)."""
        if not 0 <= start < end <= len(self.text):
            raise ValueError(f"span [{start}, {end}) is not a non-empty span of a {len(self.text)}-char text")
        if self._lo is None or self._hi is None:
            return start, end
        return self._lo[start], self._hi[end - 1]


def clean_caption(value: object, settings: CleaningSettings | None = None) -> CleanCaption:
    """Sanitise one caption value (see the module docstring); never raises on bad input."""
    settings = settings or CleaningSettings()
    source, error = _as_text(value, settings.decode_errors)
    if error is not None or source is None:
        return CleanCaption(source=source, text="", error=error or MISSING)

    truncated = len(source) > MAX_SOURCE_CHARS
    if (
        not truncated
        and len(source) <= settings.max_chars
        and _already_clean(source, settings)
        and not (settings.strip_web_junk and JUNK_TRIGGERS.search(source.lower()))
    ):
        # Most captions need no edit: a few C-level scans instead of a dozen regex passes.
        return CleanCaption(source=source, text=source, error=None)
    tracked = _TrackedText(source[:MAX_SOURCE_CHARS])
    if settings.unescape_html and "&" in tracked.text:
        # Two passes undo the double escaping common in scraped alt-text ("&amp;quot;").
        for _ in range(2):
            tracked.substitute(_ENTITY, lambda match: html.unescape(match.group(0)))
    if settings.strip_html_tags and "<" in tracked.text:
        tracked.substitute(_TAG, lambda match: " ")
    if settings.strip_control_chars:
        if "\x1b" in tracked.text or _C1_INTRODUCERS.search(tracked.text):
            tracked.substitute(_ESCAPE_SEQUENCE, lambda match: " ")
        tracked.substitute(_CONTROL, lambda match: " ")
        tracked.substitute(_INVISIBLE, lambda match: "")
    if settings.collapse_whitespace:
        tracked.substitute(_WHITESPACE_RUN, lambda match: " ")
    if settings.strip_web_junk:
        lower = tracked.text.lower()
        if JUNK_TRIGGERS.search(lower):
            for rule in WEB_JUNK_RULES:
                if rule.may_match(lower):
                    tracked.substitute(rule.pattern, lambda match: " ")
            if settings.collapse_whitespace:
                tracked.substitute(_WHITESPACE_RUN, lambda match: " ")
    tracked.strip()
    if len(tracked.text) > settings.max_chars:
        tracked.truncate(settings.max_chars)
        truncated = True
    if not tracked.text:
        return CleanCaption(source=source, text="", error=EMPTY, truncated=truncated)
    lo, hi = tracked.offsets()
    return CleanCaption(source=source, text=tracked.text, error=None, truncated=truncated, _lo=lo, _hi=hi)


def _already_clean(source: str, settings: CleaningSettings) -> bool:
    """True when no enabled rule except web junk (gated by its triggers) would change `source`."""
    if not source or source[0].isspace() or source[-1].isspace():
        return False
    if settings.unescape_html and "&" in source:
        return False
    if settings.strip_html_tags and "<" in source:
        return False
    if settings.strip_control_chars and (_CONTROL.search(source) or _INVISIBLE.search(source)):
        return False
    if settings.collapse_whitespace and _WHITESPACE_RUN.search(source):
        return False
    return True


def _as_text(value: object, decode_errors: str) -> tuple[str | None, str | None]:
    """(caption as str, error reason) for any field value."""
    if value is None:
        return None, MISSING
    if isinstance(value, str):
        return str(value), None  # str() turns numpy.str_ and other subclasses into plain str
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        try:
            return raw.decode("utf-8"), None
        except UnicodeDecodeError:
            # Keep a readable rendition for the output row either way.
            replaced = raw.decode("utf-8", errors="replace")
            return replaced, (None if decode_errors == "replace" else INVALID_UTF8)
    return None, NOT_TEXT


class _TrackedText:
    """A string being edited, with per-character source offsets (identity until first edit)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self._lo: list[int] | None = None
        self._hi: list[int] | None = None

    def _offsets(self) -> tuple[list[int], list[int]]:
        if self._lo is None or self._hi is None:
            self._lo = list(range(len(self.text)))
            self._hi = list(range(1, len(self.text) + 1))
        return self._lo, self._hi

    def offsets(self) -> tuple[tuple[int, ...] | None, tuple[int, ...] | None]:
        if self._lo is None or self._hi is None:
            return None, None
        return tuple(self._lo), tuple(self._hi)

    def substitute(self, pattern: re.Pattern[str], replace: Callable[[re.Match[str]], str]) -> None:
        """Replace every non-empty match; replacement characters map to the whole matched range."""
        text = self.text
        edits = []
        for match in pattern.finditer(text):
            start, end = match.span()
            if start == end:
                continue
            replacement = replace(match)
            if replacement != match.group(0):
                edits.append((start, end, replacement))
        if not edits:
            return
        lo, hi = self._offsets()
        pieces: list[str] = []
        new_lo: list[int] = []
        new_hi: list[int] = []
        position = 0
        for start, end, replacement in edits:
            pieces.append(text[position:start])
            new_lo.extend(lo[position:start])
            new_hi.extend(hi[position:start])
            pieces.append(replacement)
            new_lo.extend([lo[start]] * len(replacement))
            new_hi.extend([hi[end - 1]] * len(replacement))
            position = end
        pieces.append(text[position:])
        new_lo.extend(lo[position:])
        new_hi.extend(hi[position:])
        self.text = "".join(pieces)
        self._lo, self._hi = new_lo, new_hi

    def strip(self) -> None:
        stripped = self.text.strip()
        if stripped == self.text:
            return
        start = len(self.text) - len(self.text.lstrip())
        self._keep_range(start, start + len(stripped))

    def truncate(self, max_chars: int) -> None:
        cut = self.text.rfind(" ", 0, max_chars + 1)
        if cut < max_chars // 2:
            cut = max_chars  # no convenient word boundary: cut mid-word
        end = len(self.text[:cut].rstrip())
        self._keep_range(0, end)

    def _keep_range(self, start: int, end: int) -> None:
        if start != 0 and self._lo is None:
            self._offsets()
        if self._lo is not None and self._hi is not None:
            self._lo, self._hi = self._lo[start:end], self._hi[start:end]
        self.text = self.text[start:end]
