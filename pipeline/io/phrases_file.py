"""The `phrases/{shard}.parquet` format written by parse-captions and read by pseudo-label.

Columns (DESIGN.md), one row per input sample, in shard order:
* `key` string: the sample key (`{key}` of the WebDataset members, or the Parquet key);
* `caption` string: the caption the spans index (the cleaned caption by default, see
  `nlp.cleaning`); for error rows the raw caption as text, or null when it was not text;
* `phrases` list<struct<text: string, start: int32, end: int32>>: `caption[start:end] == text`;
* `error` string: null when the caption was parsed (possibly with no phrase), else the reason.

File (schema) metadata, all UTF-8 strings: `stage` ("parse-captions"), `source_shard`
(input URI), `spacy_pipeline`, `spacy_pipeline_version`, `spacy_version`,
`spacy_components`, `extractor_settings` (JSON), `shard_report` (JSON of the shard's
`ShardReport`, read back when a resumed run rebuilds `_stats.json`).
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from nlp.phrases import CaptionPhrases
from pipeline.io import storage

PHRASE_TYPE = pa.struct([("text", pa.string()), ("start", pa.int32()), ("end", pa.int32())])
PHRASES_SCHEMA = pa.schema(
    [("key", pa.string()), ("caption", pa.string()), ("phrases", pa.list_(PHRASE_TYPE)), ("error", pa.string())]
)
SUFFIX = ".parquet"


def phrases_table(keys: Sequence[str], results: Sequence[CaptionPhrases], metadata: dict[str, str]) -> pa.Table:
    """The output table of one shard: `keys[i]` with `results[i]`, schema `PHRASES_SCHEMA` + metadata."""
    if len(keys) != len(results):
        raise ValueError(f"{len(keys)} keys but {len(results)} results")
    # Built from flat columns + offsets: ~10x faster than pyarrow converting a dict per phrase.
    texts: list[str] = []
    starts: list[int] = []
    ends: list[int] = []
    offsets = [0]
    for result in results:
        for phrase in result.phrases:
            texts.append(phrase.text)
            starts.append(phrase.start)
            ends.append(phrase.end)
        offsets.append(len(texts))
    structs = pa.StructArray.from_arrays(
        [pa.array(texts, pa.string()), pa.array(starts, pa.int32()), pa.array(ends, pa.int32())],
        fields=list(PHRASE_TYPE),
    )
    table = pa.Table.from_arrays(
        [
            pa.array(keys, pa.string()),
            pa.array([result.caption for result in results], pa.string()),
            pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), structs, type=pa.list_(PHRASE_TYPE)),
            pa.array([result.error for result in results], pa.string()),
        ],
        schema=PHRASES_SCHEMA,
    )
    return table.replace_schema_metadata({name: value for name, value in metadata.items()})


def write_phrases_file(uri: str, table: pa.Table) -> None:
    """Write `table` to `uri` atomically (temporary name, then rename; one PUT on object stores)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    storage.write_atomic(uri, sink.getvalue().to_pybytes())


def read_phrases_file(uri: str) -> pa.Table:
    """The whole phrases table of `uri`, with its metadata."""
    with storage.open_read(uri) as handle:
        return pq.read_table(handle)


def read_phrases_metadata(uri: str) -> dict[str, str]:
    """Only the file metadata of `uri` (reads the Parquet footer, not the data)."""
    with storage.open_read(uri) as handle:
        schema = pq.read_schema(handle)
    return {key.decode("utf-8"): value.decode("utf-8") for key, value in (schema.metadata or {}).items()}


def count_rows(uri: str) -> int:
    with storage.open_read(uri) as handle:
        return int(pq.ParquetFile(handle).metadata.num_rows)
