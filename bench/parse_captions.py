"""Benchmark: parse-captions stage vs raw spaCy `nlp.pipe`, on real captions.

Two corpora from ../shared/data/captions, each packed into WebDataset shards (`{key}.txt` +
`{key}.json`, 1,000 samples per shard) in a temporary folder:
* `coco`: the 25,014 human COCO val2017 captions;
* `web`: 15,833 CC3M validation captions + 10,000 raw web alt-texts (LAION/CC-style noise).

For each corpus and repeat (with the load average at that moment) it prints captions/s of
* raw: spaCy as shipped, `nlp.pipe(captions, batch_size=256)` over every caption (NER and
  lemmatizer disabled, as in the stage; spaCy's attribute ruler, which the stage replaces by
  `nlp.pos_from_tag`), pinned to one core, no cleaning, no phrase extraction, no I/O; timed
  before and after the stage runs and averaged (one core's rate drifts on a shared machine);
* extractor: `PhraseExtractor.extract_batch` in this process on the same core (the stage's
  spaCy pipeline, cleaning, de-duplication, phrase extraction; no I/O, no Ray);
* stage, 1 and 2 workers: `run_parse_captions` on Ray Data (read shards, clean, de-duplicate,
  parse, extract phrases, write Parquet). Ray start-up is excluded (Ray is started once
  before). "wall" includes actor start-up (process spawn + spaCy load in each actor);
  "steady" excludes it (time from the first shard starting to the last result). Where the
  steady time goes: "in shards" (the workers' summed time inside their shards: read, clean,
  parse, extract, write) and "between shards" (workers x steady seconds - in shards: Ray Data
  hand-off of tasks and reports, and the tail where one worker waits for the last shard).
and the ratios stage/raw. Then, optionally, the recall of COCO category names: of the
occurrences of the 80 COCO category names (and their plurals) in the COCO captions, the share
inside an extracted phrase, per mode.

Run: `.venv/bin/python bench/parse_captions.py` (about 4 minutes on 2 idle cores);
`--limit 6000 --repeats 3 --no-recall` for a shorter run, `--recase-only` for the effect of
`recase_initial` on phrases per caption.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import re
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nlp.phrases import ExtractorSettings, PhraseExtractor  # noqa: E402
from nlp.pipeline_loader import load_english_pipeline, pipeline_identity  # noqa: E402
from pipeline.cluster import init_ray, shutdown_ray  # noqa: E402
from pipeline.io.phrases_file import read_phrases_file  # noqa: E402
from pipeline.stages.parse_captions import ParseCaptionsConfig, run_parse_captions  # noqa: E402

SHARD_SIZE = 1000


def load_sources(data: Path) -> dict[str, list[str]]:
    """The three caption sources: COCO val2017 (human), CC3M validation, raw web alt-text."""
    coco = json.loads((data / "captions" / "coco_captions_val2017.json").read_text())["annotations"]
    with open(data / "captions" / "cc3m_validation.tsv", encoding="utf-8") as handle:
        cc3m = [row[0] for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)]
    web = pq.read_table(data / "captions" / "web_alt_text_10000.parquet").column("TEXT").to_pylist()
    return {"coco": [item["caption"] for item in coco], "cc3m": cc3m, "web": [text or "" for text in web]}


def load_corpora(data: Path) -> dict[str, list[str]]:
    sources = load_sources(data)
    return {"coco": sources["coco"], "web": sources["cc3m"] + sources["web"]}


def recase_effect(nlp, sources: dict[str, list[str]], *, examples: int) -> None:
    """Phrases per caption and the share of captions with a phrase, `recase_initial` off and on,
    per source, and a seeded sample of the phrases it added (to judge them groundable)."""
    rng = random.Random(0)
    print("recase_initial (caption-initial capitalised nouns), noun-chunks mode:")
    for name, captions in sources.items():
        answers = {}
        for flag in (False, True):
            extractor = PhraseExtractor(settings=ExtractorSettings(recase_initial=flag), nlp=nlp)
            answers[flag] = extractor.extract_batch(captions)
        parsed = [(off, on) for off, on in zip(answers[False], answers[True]) if off.error is None]
        line = [f"  {name:<5} {len(parsed):,} parsed captions:"]
        for flag, label in ((False, "off"), (True, "on")):
            phrases = sum(len(pair[flag].phrases) for pair in parsed)
            covered = sum(bool(pair[flag].phrases) for pair in parsed)
            line.append(f"{label} {phrases / len(parsed):.3f} phrases/caption, {covered / len(parsed):.2%} with >= 1")
        changed = [(on.caption, sorted({p.text for p in on.phrases} - {p.text for p in off.phrases})) for off, on in parsed]
        changed = [(caption, added) for caption, added in changed if added]
        print(" ".join(line[:2]) + "; " + line[2] + f"; {len(changed):,} captions gained a phrase")
        for caption, added in rng.sample(changed, min(examples, len(changed))):
            print(f"      + {added} <- {caption[:90]!r}")


def write_shards(captions: list[str], folder: Path) -> None:
    folder.mkdir(parents=True)
    for shard, first in enumerate(range(0, len(captions), SHARD_SIZE)):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as archive:
            for index, caption in enumerate(captions[first : first + SHARD_SIZE], start=first):
                key = f"{index:09d}"
                for extension, data in (
                    ("txt", caption.encode("utf-8")),
                    ("json", json.dumps({"key": key, "caption": caption}).encode("utf-8")),
                ):
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))


def one_core_rate(work, captions: list[str]) -> float:
    """Captions/s of `work(captions)` pinned to one core."""
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(affinity)})
    try:
        started = time.perf_counter()
        work(captions)
        return len(captions) / (time.perf_counter() - started)
    finally:
        os.sched_setaffinity(0, affinity)


def raw_parse(nlp):
    def parse(captions: list[str]) -> None:
        for _ in nlp.pipe(captions, batch_size=256):
            pass

    return parse


def extract_in_process(nlp):
    def extract(captions: list[str]) -> None:
        extractor = PhraseExtractor(nlp=nlp)  # fresh: no de-duplication across repeats
        for first in range(0, len(captions), SHARD_SIZE):
            extractor.extract_batch(captions[first : first + SHARD_SIZE])

    return extract


def stage_rates(shards: Path, out: Path, workers: int) -> dict:
    config = ParseCaptionsConfig(inputs=(str(shards),), out=str(out), workers=workers, overwrite=True)
    stats = run_parse_captions(config, progress_stream=io.StringIO())
    return {"stats": stats, **stats["throughput"]}


def print_stage(label: str, run: dict, raw: float) -> None:
    steady_seconds = run["seconds"] - run["startup_seconds"]
    in_shards = run["worker_seconds"]
    between = run["workers"] * steady_seconds - in_shards
    print(
        f"  {label:<16} wall    {run['samples_per_s']:8.1f} captions/s  ({run['samples_per_s'] / raw:.2f}x raw; "
        f"actor start-up {run['startup_seconds']:.1f} s of {run['seconds']:.1f} s)"
    )
    print(
        f"  {label:<16} steady  {run['steady_samples_per_s']:8.1f} captions/s  ({run['steady_samples_per_s'] / raw:.2f}x raw; "
        f"worker time {in_shards:.1f} s in shards, {between:.1f} s between shards)"
    )


def category_names(data: Path) -> list[str]:
    instances = json.loads((data / "coco_mini" / "annotations" / "instances_train2017_subset.json").read_text())
    return sorted(category["name"] for category in instances["categories"])


def name_recall(rows: list[tuple[str, list[tuple[int, int]]]], names: list[str]) -> tuple[int, int]:
    """(covered, total) occurrences of category names (or plurals) inside an extracted phrase span."""
    pattern = re.compile(r"\b(" + "|".join(re.escape(name) for name in names) + r")(?:s|es)?\b", re.IGNORECASE)
    covered = total = 0
    for caption, spans in rows:
        for match in pattern.finditer(caption):
            total += 1
            covered += any(start <= match.start() and match.end() <= end for start, end in spans)
    return covered, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--no-recall", action="store_true", help="skip the COCO category recall")
    parser.add_argument(
        "--recase-only", action="store_true", help="only the recase_initial effect per source (no timing, no Ray)"
    )
    parser.add_argument("--examples", type=int, default=12, help="added phrases shown per source")
    parser.add_argument("--limit", type=int, default=None, help="first N captions of each corpus or source")
    parser.add_argument("--repeats", type=int, default=1, help="timing rounds per corpus (the machine may be busy)")
    args = parser.parse_args()
    data = Path(args.data)
    if args.recase_only:
        sources = {name: captions[: args.limit] for name, captions in load_sources(data).items()}
        recase_effect(load_english_pipeline(), sources, examples=args.examples)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

    corpora = {name: captions[: args.limit] for name, captions in load_corpora(data).items()}
    nlp = load_english_pipeline()
    stock = load_english_pipeline(stock=True)
    identity = pipeline_identity(nlp)
    print(f"spaCy {identity['spacy_version']}, {identity['spacy_pipeline']} {identity['spacy_pipeline_version']} ")
    print(f"stage components: {identity['spacy_components']}; raw: {','.join(stock.pipe_names)}; {os.cpu_count()} CPUs")
    print("stage timings exclude Ray start-up; 'wall' includes actor start-up, 'steady' does not\n")
    started = init_ray(None, num_cpus=os.cpu_count())
    results = {}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-parse-captions-") as temporary:
            root = Path(temporary)
            for name, captions in corpora.items():
                write_shards(captions, root / name / "shards")
                for repeat in range(1, args.repeats + 1):
                    load_before = os.getloadavg()[0]
                    # raw before and after the stage runs, averaged: one core's rate drifts by
                    # +-15% over minutes on a shared VM, and every ratio is divided by it
                    raw_before = one_core_rate(raw_parse(stock), captions)
                    extract = one_core_rate(extract_in_process(nlp), captions)
                    one = stage_rates(root / name / "shards", root / name / "w1", workers=1)
                    two = stage_rates(root / name / "shards", root / name / "w2", workers=2)
                    raw_after = one_core_rate(raw_parse(stock), captions)
                    raw = (raw_before + raw_after) / 2
                    stats = one["stats"]
                    print(
                        f"{name} #{repeat}: {len(captions):,} captions in {-(-len(captions) // SHARD_SIZE)} shards, "
                        f"{stats['unique_captions']:,} distinct parsed; load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}"
                    )
                    print(
                        f"  raw nlp.pipe (stock spaCy), 1 core {raw:8.1f} captions/s  "
                        f"(mean of {raw_before:.1f} before and {raw_after:.1f} after the stage runs)"
                    )
                    print(f"  extractor in process, 1 core      {extract:8.1f} captions/s  ({extract / raw:.2f}x raw)")
                    for label, run in (("stage, 1 worker", one), ("stage, 2 workers", two)):
                        print_stage(label, run, raw)
                    print(f"  2 workers / 1 worker (steady): {two['steady_samples_per_s'] / one['steady_samples_per_s']:.2f}x\n")
                results[name] = root / name / "w1"
            if not args.no_recall:
                names = category_names(data)
                rows = []
                for path in sorted(results["coco"].glob("*.parquet")):
                    for row in read_phrases_file(str(path)).to_pylist():
                        rows.append((row["caption"] or "", [(p["start"], p["end"]) for p in row["phrases"]]))
                covered, total = name_recall(rows, names)
                print(f"recall of COCO category names in COCO captions ({total:,} occurrences):")
                print(f"  noun-chunks (default)   {covered / total:.3f}")
                for mode in ("glip",):
                    extractor = PhraseExtractor(settings=ExtractorSettings.for_mode(mode), nlp=nlp)
                    results_mode = extractor.extract_batch(corpora["coco"])
                    rows_mode = [
                        (result.caption or "", [(p.start, p.end) for p in result.phrases]) for result in results_mode
                    ]
                    covered_mode, total_mode = name_recall(rows_mode, names)
                    print(f"  {mode:<22}  {covered_mode / total_mode:.3f}")
    finally:
        shutdown_ray(started)


if __name__ == "__main__":
    main()
