"""Curated word lists behind the phrase-cleaning rules.

Two lists, both small enough to read in full and both used only through named switches of
`ExtractorSettings` (so a run's metadata says whether they were applied):

* `NON_VISUAL_HEADS`: head nouns of phrases that a detector cannot draw a box for. GRIT
  (Kosmos-2, section 2) drops "abstract noun chunks that are hard to recognise in the image, such as
  'time', 'love', 'freedom'"; Florence-2's phrase filter does the same for web captions, where
  noun chunks such as "stock photo" or "a beautiful view" describe the picture, not a thing in it.
  A phrase is dropped when its head (the syntactic root of a noun chunk, the last noun of a
  `glip` chunk, the last word of an n-gram) is in this set, compared in lower case, with a
  trailing plural "s" also tried ("photos" -> "photo").
* `WEB_JUNK_RULES`: regular expressions for the boilerplate that alt-text carries and
  no image shows: URLs, e-mail addresses, camera file names, stock-agency credits and
  "royalty free"/"stock photo" tags. `nlp.cleaning` removes their matches from the caption
  before parsing (HTML tags and entities are handled there too).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# --- head nouns that name no drawable thing -------------------------------------------------

# The picture itself and how it was made: web alt-text describes the medium constantly.
_IMAGE_MEDIUM = {
    "image", "photo", "photograph", "photography", "picture", "pic", "snapshot", "shot",
    "closeup", "close-up", "view", "footage", "video", "clip", "clipart", "illustration",
    "vector", "drawing", "rendering", "render", "graphic", "graphics", "wallpaper", "stock",
    "royalty", "thumbnail", "screenshot", "screen-shot", "template", "mockup", "stockphoto",
    "hd", "4k", "jpg", "jpeg", "png",
}

# Abstract nouns (GRIT's own examples first) and feelings.
_ABSTRACT = {
    "time", "love", "freedom", "life", "idea", "concept", "thing", "something", "anything",
    "everything", "nothing", "way", "kind", "sort", "type", "variety", "part", "piece",
    "fun", "beauty", "happiness", "joy", "success", "business", "nature", "world", "style",
    "fashion", "design", "theme", "quality", "inspiration", "memory", "dream", "story",
    "history", "future", "culture", "music", "lifestyle", "travel", "education",
    "health", "news", "information", "detail", "details", "example", "sale", "price",
    "review", "size", "color", "colour", "version", "edition", "collection", "series",
    "set", "number", "amount", "couple", "bunch", "group", "pair", "selection",
    "availability", "delivery", "shipping", "use", "background", "backdrop", "foreground", "scene",
    "place", "location",
}
# Left out on purpose, because COCO/CC3M use them for drawable things at least as often:
# "lot" (a parking lot), "range" (a mountain range), "area" (a grassy area), "spot",
# "art" (street art), "date" (the fruit).

# Time expressions: "a snowy day", "the moment", "this year".
_TIME = {
    "day", "days", "night", "year", "years", "week", "month", "today", "tonight", "yesterday",
    "tomorrow", "moment", "morning", "evening", "afternoon", "season", "weekend", "hour",
    "minute", "second", "century", "decade", "era", "period", "anniversary",
}

# Parts of a frame rather than objects: "the side of the road", "top of a surfboard".
_FRAME_POSITION = {
    "side", "top", "bottom", "middle", "center", "centre", "front", "left", "right", "edge",
    "distance", "foreground", "rear",
}

NON_VISUAL_HEADS: frozenset[str] = frozenset(_IMAGE_MEDIUM | _ABSTRACT | _TIME | _FRAME_POSITION)
"""Lower-case head nouns whose phrases are dropped by the `drop_non_visual` rule."""


def is_non_visual_head(word: str) -> bool:
    """True when `word` (a phrase head, any case) or its singular is in `NON_VISUAL_HEADS`."""
    lower = word.lower()
    if lower in NON_VISUAL_HEADS:
        return True
    # No lemmatizer runs (it is disabled for speed), so plurals are matched by one rule that
    # covers the regular English plurals of this list ("views", "photos", "images").
    return len(lower) > 3 and lower.endswith("s") and lower[:-1] in NON_VISUAL_HEADS


def singular(word: str) -> str:
    """A regular English plural's singular, by rule ("rings" -> "ring", "crosses" -> "cross",
    "berries" -> "berry", "boxes" -> "box"); other words unchanged. No lemmatizer runs here
    (the phrase extractor disables spaCy's for speed), so irregular plurals stay as they are."""
    lower = word.lower()
    if len(lower) <= 3 or not lower.endswith("s") or lower.endswith(("ss", "us", "is")):
        return word
    if lower.endswith("ies") and len(lower) > 4:
        return word[:-3] + ("Y" if word[-3].isupper() else "y")
    if lower.endswith(("sses", "ches", "shes", "xes", "zes")):
        return word[:-2]
    return word[:-1]


def phrase_name(phrase: str) -> str:
    """The class name a grounded phrase stands for: its head noun (the last word, as the `glip`
    and `ngrams` extractors take it, and the root of most noun chunks), lower case and singular:
    "two blue rings" -> "ring", "A small dotted red cross" -> "cross". Empty when the phrase has
    no alphabetic word. Used to turn pseudo-labels into detection-style prompts
    (`train-student --pseudo-prompt names`)."""
    words = [w.strip(".,;:!?\"'()[]{}") for w in phrase.split()]
    words = [w for w in words if any(c.isalpha() for c in w)]
    return singular(words[-1]).lower() if words else ""


# --- web boilerplate removed from captions before parsing -----------------------------------

_STOCK_SITES = (
    r"shutterstock|getty\s*images|istock(?:photo)?|alamy|dreamstime|depositphotos|123rf|"
    r"adobe\s*stock|fotolia|bigstock(?:photo)?|canstock(?:photo)?|pond5|vecteezy|freepik|"
    r"pixabay|unsplash|pexels|gettyimages"
)

@dataclass(frozen=True)
class JunkRule:
    """A web-junk pattern and its triggers: lower-case substrings of which at least one occurs
    in any text the pattern can match (a cheap gate: most captions skip the regex entirely)."""

    pattern: re.Pattern[str]
    triggers: tuple[str, ...]

    def may_match(self, lower_text: str) -> bool:
        return any(trigger in lower_text for trigger in self.triggers)


_STOCK_TRIGGERS = (
    "shutterstock", "getty", "istock", "alamy", "dreamstime", "depositphotos", "123rf", "adobe",
    "fotolia", "bigstock", "canstock", "pond5", "vecteezy", "freepik", "pixabay", "unsplash", "pexels",
)
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif")

WEB_JUNK_RULES: tuple[JunkRule, ...] = (
    # URLs and bare domains ("https://a.b/c.jpg", "www.example.com").
    JunkRule(re.compile(r"(?:https?|ftp)://\S+|www\.\S+", re.IGNORECASE), ("://", "www.")),
    # E-mail addresses.
    JunkRule(re.compile(r"\b[\w.+-]+@[\w-]+\.[\w.-]+\b"), ("@",)),
    # Camera and upload file names ("DSC_1073", "IMG_20170101_123456.jpg", "P1010203").
    JunkRule(
        re.compile(r"\b(?:DSC|DSCN|DSCF|IMG|PIC|PICT|DCIM|GOPR|MVI|P\d{3})[_-]?\d[\w-]*(?:\.\w{2,4})?\b", re.IGNORECASE),
        ("dsc", "img", "pic", "dcim", "gopr", "mvi", *(f"p{digit}" for digit in range(10))),
    ),
    # Bare image file names ("oil-rigs-sunset1.jpeg").
    JunkRule(re.compile(r"\b[\w-]+\.(?:jpe?g|png|gif|webp|bmp|tiff?)\b", re.IGNORECASE), _IMAGE_EXTENSIONS),
    # Stock-agency credits with their separators ("| Shutterstock", "- Getty Images", "© Alamy").
    JunkRule(
        re.compile(
            rf"(?:[|\-–—:©(]\s*)?(?:photo\s+by\s+|image\s+by\s+|credit:?\s*)?(?:{_STOCK_SITES})\b(?:\s*\.com)?\)?",
            re.IGNORECASE,
        ),
        _STOCK_TRIGGERS,
    ),
    # Licence and marketing tags ("royalty free", "stock photo", "stock vector", "free download").
    JunkRule(
        re.compile(
            r"(?:[|\-–—:]\s*)?\b(?:royalty[\s-]*free|rights[\s-]*managed|stock\s+(?:photos?|images?|pictures?|vectors?|"
            r"illustrations?|footage|photography)|free\s+download|download\s+free|high[\s-]+resolution|hi[\s-]?res|"
            r"hd\s+wallpapers?)\b",
            re.IGNORECASE,
        ),
        ("royalty", "rights", "stock", "download", "resolution", "hires", "hi-res", "hi res", "wallpaper"),
    ),
    # Copyright marks ("(c) 2014 John Smith" keeps the name; the mark and year go).
    JunkRule(re.compile(r"(?:©|\(c\)|copyright)\s*(?:\d{4}(?:\s*[-–]\s*\d{4})?)?", re.IGNORECASE), ("©", "(c)", "copyright")),
)
"""Rules whose matches `nlp.cleaning` removes (replaced by one space) when `strip_web_junk` is on.

Their triggers are sound for text whose whitespace is already collapsed to single spaces
(cleaning collapses whitespace before it removes junk): every `\\s` run in a pattern is then
one space, and every trigger is a literal part of what its pattern matches.
"""

JUNK_TRIGGERS: re.Pattern[str] = re.compile(
    "|".join(re.escape(trigger) for trigger in sorted({t for rule in WEB_JUNK_RULES for t in rule.triggers}, key=len, reverse=True))
)
"""Matches the lower-cased text wherever any rule's trigger occurs (one scan for all rules)."""
