"""`pos_from_tag`: the English attribute ruler's POS, TAG and DEP rules at a fraction of its cost.

spaCy's English pipelines set coarse POS after the tagger with an AttributeRuler: first one
pattern per fine tag (`{"TAG": "NN"}` -> NOUN), then exceptions keyed on words and labels
(`{"TAG": "NN", "LOWER": "something"}` -> PRON). Its Matcher tries every pattern on every
token. Here the per-tag patterns become one table lookup per token, and only the exceptions
that set POS, TAG or DEP run through spaCy's AttributeRuler, in their original order, so a
later rule still overrides an earlier one exactly as in the original component.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy
from spacy.attrs import POS, TAG
from spacy.language import Language

if TYPE_CHECKING:
    from spacy.tokens import Doc

COMPONENT = "pos_from_tag"
_KEPT_ATTRS = ("POS", "TAG", "DEP")  # what noun chunks, the glip grammar and the filters read


def split_ruler_patterns(patterns: list[dict]) -> tuple[dict[str, str], list[dict]] | None:
    """(fine tag -> POS, the remaining patterns that set POS/TAG/DEP, with only those attrs).

    None when a per-tag pattern follows an exception: the table, applied first, could then
    not reproduce the ruler's order, and the stock ruler must stay.
    """
    table: dict[str, str] = {}
    exceptions: list[dict] = []
    for pattern in patterns:
        tokens = pattern["patterns"]
        attrs = pattern["attrs"]
        per_tag = (
            len(tokens) == 1
            and len(tokens[0]) == 1
            and len(tokens[0][0]) == 1
            and isinstance(tokens[0][0].get("TAG"), str)
            and set(attrs) <= {"POS", "MORPH"}
            and pattern.get("index", 0) == 0
        )
        if per_tag:
            if exceptions:
                return None
            if "POS" in attrs:
                table[tokens[0][0]["TAG"]] = attrs["POS"]
            continue
        kept = {name: value for name, value in attrs.items() if name in _KEPT_ATTRS}
        if kept:
            exceptions.append({**pattern, "attrs": kept})
    return table, exceptions


class PosFromTag:
    """Sets `token.pos` from `token.tag` by table, then applies the exception rules."""

    def __init__(self, nlp: Language, table: dict[str, str], exceptions: list[dict]) -> None:
        from spacy.parts_of_speech import IDS
        from spacy.pipeline import AttributeRuler

        self._pos_of_tag = {nlp.vocab.strings.add(tag): IDS[pos] for tag, pos in table.items()}
        self._exceptions = AttributeRuler(nlp.vocab, name=f"{COMPONENT}_exceptions")
        self._exceptions.add_patterns(exceptions)

    def __call__(self, doc: Doc) -> Doc:
        if len(doc):
            table = self._pos_of_tag
            # A tag outside the table keeps the POS it had, as it does under the ruler.
            pos = [table.get(tag, old) for tag, old in zip(doc.to_array(TAG).tolist(), doc.to_array(POS).tolist())]
            doc.from_array([POS], numpy.asarray(pos, dtype=numpy.uint64).reshape(-1, 1))
        return self._exceptions(doc)


@Language.factory(COMPONENT)
def make_pos_from_tag(nlp: Language, name: str) -> PosFromTag:
    """Built from the attribute ruler `nlp` still holds (`replace_attribute_ruler`)."""
    split = split_ruler_patterns(nlp.get_pipe("attribute_ruler").patterns)
    if split is None:
        raise ValueError("the attribute ruler's per-tag patterns do not come first: keep the stock ruler")
    return PosFromTag(nlp, *split)


def replace_attribute_ruler(nlp: Language) -> None:
    """Swap `nlp`'s "attribute_ruler" for `pos_from_tag` in place (unchanged if it cannot be split)."""
    if split_ruler_patterns(nlp.get_pipe("attribute_ruler").patterns) is None:
        return
    nlp.add_pipe(COMPONENT, after="attribute_ruler")
    nlp.remove_pipe("attribute_ruler")
