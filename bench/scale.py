"""Scale bench: stage cost against the number of shards, locally and on an object store.

For each N of `--sizes` it writes a corpus of N WebDataset shards (`bench/make_corpus.py`:
real JPEG crops and CC3M captions) with K = max(1, `--total-samples` // N) samples per shard,
so every N up to `--total-samples` holds the same samples and the wall-time slope between
two such N is pure per-shard overhead; above it K = 1 and the slope also holds one sample's
work per shard (an upper bound on the overhead). Then, per stage of `--stages`:

* `parse`: `parse-captions` of the shards;
* `pseudo`: `pseudo-label` with a tiny random-weight teacher (`bench/sample_shards.py`), test
  size 128-192 px; only up to `--pseudo-max` shards (beyond, `filter` reads detections written
  by `make_corpus.py --detections`);
* `filter`: `filter` of the detections into pseudo shards.

Each stage runs in a fresh process (`--run`, as a user's command would: Ray started and
stopped inside), `--workers` actors, and prints: wall time of the run (Ray start included),
driver peak RSS (that process's `ru_maxrss`: Ray's own processes and the actors are apart),
the size of `_stats.json`, and the wall time of running the finished job again (resume: plan,
read back, write `_stats.json`). `--store s3` starts a moto S3 server on 127.0.0.1 (another
process, so its memory is not the driver's) and keeps corpus and outputs there.

`--resume-only` times only the resume of a finished job, made in one process by the stage's
own worker (no Ray: a finished job's resume starts none either), with `--compare-code DIR`'s
resume timed first (a checkout without the shard log reads every output back): the resume
goals measured where starting Ray for the fresh runs is too slow.

`--loader` measures train-student's data side instead: for each N of `--sizes`, N pseudo
shards (10 samples each) and a COCO gold source mixed with them, the time from building the
sample stream to the first collated batch, and the RSS that adds to the process (one loader
is what one training worker holds).

Runs: `nice -n 10 .venv/bin/python bench/scale.py --sizes 10,100,1000 --stages parse,filter`;
`--code DIR` runs the stages from another checkout (a before/after comparison).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CODE = Path(os.environ.get("SCALE_CODE", REPO))
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(CODE))
sys.path.append(str(Path(__file__).resolve().parent))  # make_corpus, sample_shards

STAGES = ("parse", "pseudo", "filter")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MotoServer:
    """A moto S3 server in its own process group on 127.0.0.1, with the env the stages need."""

    def __init__(self) -> None:
        port = _free_port()
        server = Path(sys.executable).parent / "moto_server"
        self.process = subprocess.Popen(
            [str(server), "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        self.endpoint = f"http://127.0.0.1:{port}"
        for name, value in {
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.endpoint,
        }.items():
            os.environ[name] = value
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        import fsspec

        fsspec.filesystem("s3").mkdir("scale")

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=30)


# ---- one stage run, in its own process -------------------------------------------------


def run_one(spec: dict) -> dict:
    """Run one stage as `spec` says, in this process; its wall time, peak RSS and stats."""
    import io

    from pipeline.io import storage
    from pipeline.stages.filtering import PRESETS

    stage, workers = spec["stage"], spec["workers"]
    started = time.perf_counter()
    if stage == "parse":
        from pipeline.stages.parse_captions import ParseCaptionsConfig, run_parse_captions

        stats = run_parse_captions(
            ParseCaptionsConfig(inputs=(spec["web"],), out=spec["out"], workers=workers), progress_stream=io.StringIO()
        )
    elif stage == "pseudo":
        from pipeline.stages.pseudo_label import PseudoLabelConfig, run_pseudo_label

        config = PseudoLabelConfig(
            inputs=(spec["web"],), phrases=spec["phrases"], teacher=spec["teacher"], out=spec["out"],
            policy=PRESETS["glip"], min_size=128, max_size=192, batch_size=4, workers=workers,
        )
        stats = run_pseudo_label(config, progress_stream=io.StringIO())
    else:
        from pipeline.stages.filter_stage import FilterConfig, run_filter

        config = FilterConfig(
            inputs=(spec["web"],), detections=spec["detections"], out=spec["out"], policy=PRESETS["glip"], workers=workers
        )
        stats = run_filter(config, progress_stream=io.StringIO())
    wall = time.perf_counter() - started
    stats_size = len(storage.read_bytes(storage.join(spec["out"], "_stats.json")))
    return {
        "wall_s": round(wall, 2),
        "stage_s": stats["throughput"]["seconds"],  # the stage's own: Ray start-up excluded
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "stats_bytes": stats_size,
        "samples": stats["samples"],
        "written": stats["shards"]["written"],
        "already_done": stats["shards"]["already_done"],
        "failed": stats["shards"]["failed"],
    }


def _spawn(flag: str, argument: str, code: Path | None = None) -> dict:
    """This script with `flag argument` in a fresh process running `code`'s modules (default
    `CODE`); its last stdout line as JSON."""
    code = code or CODE
    env = {**os.environ, "PYTHONPATH": str(code), "SCALE_CODE": str(code)}
    for _ in range(3):  # a loaded machine can miss Ray's 30 s raylet start-up wait: try again
        result = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), flag, argument],
            cwd=str(code), env=env, capture_output=True, text=True,
        )
        if "node timed out during startup" not in result.stderr:
            break
    if result.returncode != 0:
        raise RuntimeError(f"{flag} {argument[:200]} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def spawn_run(spec: dict, code: Path | None = None) -> dict:
    return _spawn("--run", json.dumps(spec), code)


def finish_in_process(spec: dict) -> dict:
    """Write every output of `spec`'s stage with the stage's own worker, in this process (no
    Ray): a finished job to time resumes on when starting Ray is what the machine cannot do."""
    from pipeline.io import storage
    from pipeline.io.shards import discover_shards
    from pipeline.stages.filtering import PRESETS
    from pipeline.stages.stage import plan_shards, run_shard

    shards = discover_shards([spec["web"]])
    if spec["stage"] == "parse":
        from nlp.phrases import ExtractorSettings
        from nlp.pipeline_loader import find_pipeline
        from pipeline.io.shards import CaptionColumns
        from pipeline.stages.parse_captions import CaptionShardWorker

        worker = CaptionShardWorker(settings=ExtractorSettings(), columns=CaptionColumns(),
                                    pipeline_name=find_pipeline(None), batch_size=256)
        markers, suffix = spec["out"], ".parquet"
    else:
        from pipeline.stages.filter_stage import FilterConfig, FilterWorker

        worker = FilterWorker(config=FilterConfig(inputs=(spec["web"],), detections=spec["detections"],
                                                  out=spec["out"], policy=PRESETS["glip"]))
        markers, suffix = storage.join(spec["out"], "pseudo"), ".tar"
    storage.makedirs(markers)
    started = time.perf_counter()
    plan = plan_shards(shards, out=markers, suffix=suffix, overwrite=False)
    failed = sum(run_shard(worker, task).error is not None for task in plan.pending)
    return {"seconds": round(time.perf_counter() - started, 1), "shards": len(plan.pending), "failed": failed}


def bench_resume(n: int, *, args, root: str) -> list[dict]:
    """Resume of a finished job of N shards (made in-process): with `--compare-code` (which
    ignores the shard log), then with this code without the log (it reads every output and
    writes the log) and with it."""
    from make_corpus import write_corpus

    from pipeline.io import storage

    k = samples_per_shard(n, args.total_samples)
    base = storage.join(root, f"resume-n{n}")
    _remove_tree(base)
    web, synthetic = storage.join(base, "web"), storage.join(base, "synthetic-detections")
    seconds = write_corpus(web, shards=n, samples=k, detections=synthetic if "filter" in args.stages else None)
    print(f"# N={n:,} K={k}: corpus written in {seconds:.1f} s", flush=True)
    rows = []
    for stage in [s for s in ("parse", "filter") if s in args.stages]:
        spec = {"stage": stage, "workers": args.workers, "web": web, "out": storage.join(base, stage),
                "detections": synthetic}
        made = _spawn("--finish-run", json.dumps(spec))
        print(f"# {stage}: {made['shards']:,} shards finished in-process in {made['seconds']} s", flush=True)
        row = {"stage": stage, "n": n, "k": k, "store": args.store, "load": round(os.getloadavg()[0], 1)}
        if args.compare_code:
            other = spawn_run(spec, Path(args.compare_code).resolve())
            row.update(other_resume_s=other["wall_s"], other_rss_mb=other["peak_rss_mb"], other_stats_bytes=other["stats_bytes"])
        no_log = spawn_run(spec)
        logged = spawn_run(spec)
        assert logged["already_done"] == n and logged["written"] == 0, logged
        row.update(no_log_resume_s=no_log["wall_s"], resume_s=logged["wall_s"], rss_mb=logged["peak_rss_mb"],
                   stats_bytes=logged["stats_bytes"], log_bytes=_size(storage.join(spec["out"], "_shards.jsonl")))
        rows.append(row)
        print(json.dumps(row), flush=True)
    if not args.keep:
        _remove_tree(base)
    return rows


def _size(uri: str) -> int:
    from pipeline.io import storage

    location = storage.resolve(uri)
    return int(location.fs.size(location.path)) if location.fs.exists(location.path) else 0


# ---- the bench ---------------------------------------------------------------------------


def samples_per_shard(n: int, total: int) -> int:
    return max(1, total // n)


def bench_size(n: int, *, args, root: str, teacher: str) -> list[dict]:
    """Every selected stage at N shards: a fresh run, then a resumed run of the finished job."""
    from make_corpus import write_corpus

    from pipeline.io import storage

    k = samples_per_shard(n, args.total_samples)
    base = storage.join(root, f"n{n}")
    web, synthetic = storage.join(base, "web"), storage.join(base, "synthetic-detections")
    run_pseudo = "pseudo" in args.stages and n <= args.pseudo_max
    need_synthetic = "filter" in args.stages and not run_pseudo
    _remove_tree(base)  # a fresh job every time, whatever an earlier bench left
    seconds = write_corpus(web, shards=n, samples=k, detections=synthetic if need_synthetic else None)
    print(f"# N={n:,} K={k}: corpus written in {seconds:.1f} s", flush=True)
    rows = []
    plan = [s for s in STAGES if s in args.stages or (s == "parse" and run_pseudo)]
    for stage in plan:
        if stage == "pseudo" and not run_pseudo:
            continue
        spec = {
            "stage": stage, "workers": args.workers, "web": web, "out": storage.join(base, stage),
            "phrases": storage.join(base, "parse"), "teacher": teacher,
            "detections": storage.join(base, "pseudo") if run_pseudo else synthetic,
        }
        fresh = spawn_run(spec)
        resumed = spawn_run(spec)
        assert resumed["written"] == 0 and resumed["already_done"] == fresh["written"], (fresh, resumed)
        row = {"stage": stage, "n": n, "k": k, "store": args.store, **fresh, "resume_s": resumed["wall_s"],
               "resume_rss_mb": resumed["peak_rss_mb"], "load": round(os.getloadavg()[0], 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if not args.keep:
        _remove_tree(base)
    return rows


def _remove_tree(uri: str) -> None:
    from pipeline.io import storage

    location = storage.resolve(uri)
    if location.fs.exists(location.path):
        location.fs.rm(location.path, recursive=True)


def print_table(rows: list[dict], total: int) -> None:
    print("\n| stage | store | N | K | wall s | stage s | s/shard overhead | driver peak RSS MB | _stats.json bytes | resume s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    previous: dict[tuple[str, str], dict] = {}
    for row in rows:
        key = (row["stage"], row["store"])
        before = previous.get(key)
        slope = "-"
        if before is not None and row["n"] > before["n"]:
            value = (row["stage_s"] - before["stage_s"]) / (row["n"] - before["n"])
            bound = "" if row["n"] <= total else " (<=)"  # K=1 above the fixed sample count
            slope = f"{value * 1000:.1f} ms{bound}"
        previous[key] = row
        print(
            f"| {row['stage']} | {row['store']} | {row['n']:,} | {row['k']} | {row['wall_s']:.1f} | {row['stage_s']:.1f} | {slope} | "
            f"{row['peak_rss_mb']:.0f} | {row['stats_bytes']:,} | {row['resume_s']:.1f} |"
        )


# ---- train-student's loader ---------------------------------------------------------------


def _rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def loader_one(spec: dict) -> dict:
    """Time to the first batch of a fresh train loader over `spec`'s sources, and its RSS."""
    from pipeline.train.data.loader import TrainLoader
    from pipeline.train.data.mixing import make_stream
    from pipeline.train.data.specs import SourceSpec
    from model.inputs.text import load_tokenizer

    tokenizer = load_tokenizer()
    sources = [SourceSpec(kind="pseudo", paths=(spec["pseudo"],), weight=1.0)]
    if spec.get("coco"):
        sources.append(SourceSpec(kind="coco", paths=(spec["coco"],), images=spec["images"], weight=1.0))
    base = _rss_mb()
    started = time.perf_counter()
    stream = make_stream(specs=sources, tokenizer=tokenizer, seed=0, rank=0, world_size=2)
    loader = iter(TrainLoader(stream=stream, batch_size=2, num_threads=2))
    next(loader)
    first = time.perf_counter() - started
    return {"first_batch_s": round(first, 2), "loader_rss_mb": round(_rss_mb() - base, 1)}


def bench_loader(args, root: str) -> list[dict]:
    from make_corpus import write_corpus

    from pipeline.io import storage

    shared = Path(os.environ.get("GLIP_SHARED_DIR", REPO.parent / "shared")) / "data" / "coco_mini"
    rows = []
    for n in args.sizes:
        pseudo = storage.join(root, f"pseudo-n{n}")
        write_corpus(pseudo, shards=n, samples=10, fmt="pseudo")
        for mixed in (False, True):
            spec = {"pseudo": pseudo}
            if mixed:
                spec.update(coco=str(shared / "annotations" / "instances_train2017_subset.json"),
                            images=str(shared / "train2017"))
            row = {"n": n, "sources": "pseudo+coco" if mixed else "pseudo", "store": args.store,
                   **_spawn("--loader-run", json.dumps(spec))}
            rows.append(row)
            print(json.dumps(row), flush=True)
        if not args.keep:
            _remove_tree(pseudo)
    print("\n| store | pseudo shards | sources | first batch s | loader RSS MB |")
    print("|---|---:|---|---:|---:|")
    for row in rows:
        print(f"| {row['store']} | {row['n']:,} | {row['sources']} | {row['first_batch_s']:.2f} | {row['loader_rss_mb']:.0f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,100,1000,10000,100000", help="Shard counts, comma-separated.")
    parser.add_argument("--stages", default="parse,pseudo,filter", help="Of parse, pseudo, filter.")
    parser.add_argument("--store", default="local", choices=("local", "s3"))
    parser.add_argument("--total-samples", type=int, default=1000, help="Samples of every N up to this many shards.")
    parser.add_argument("--pseudo-max", type=int, default=10000, help="Largest N pseudo-label runs at.")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", default=None, help="Local work folder (default: a temporary one).")
    parser.add_argument("--code", default=None, help="Run the stages from this checkout (default: this one).")
    parser.add_argument("--keep", action="store_true", help="Keep corpora and outputs.")
    parser.add_argument("--json", default=None, help="Also write the rows to this JSON file.")
    parser.add_argument("--loader", action="store_true", help="Measure train-student's loader instead.")
    parser.add_argument("--run", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--loader-run", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--teacher-run", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--finish-run", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--resume-only", action="store_true",
                        help="Time only resumes of finished jobs made in-process (no Ray for the fresh run).")
    parser.add_argument("--compare-code", default=None, help="--resume-only: also time this checkout's resume.")
    args = parser.parse_args()
    if args.run:
        print(json.dumps(run_one(json.loads(args.run))))
        return
    if args.loader_run:
        print(json.dumps(loader_one(json.loads(args.loader_run))))
        return
    if args.finish_run:
        print(json.dumps(finish_in_process(json.loads(args.finish_run))))
        return
    if args.teacher_run:
        from sample_shards import tiny_teacher

        print(json.dumps(str(tiny_teacher(Path(args.teacher_run)))))
        return
    global CODE
    if args.code:
        CODE = Path(args.code).resolve()
    args.sizes = [int(size) for size in args.sizes.split(",")]
    args.stages = [stage.strip() for stage in args.stages.split(",")]
    if unknown := set(args.stages) - set(STAGES):
        parser.error(f"--stages: unknown {sorted(unknown)}; choose from {', '.join(STAGES)}")
    work = Path(args.work or tempfile.mkdtemp(prefix="scale-"))
    work.mkdir(parents=True, exist_ok=True)
    server = MotoServer() if args.store == "s3" else None
    root = "s3://scale/bench" if server else str(work / "store")
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {os.getloadavg()[0]:.1f}, code {CODE}, "
          f"store {args.store}, workers {args.workers}", flush=True)
    try:
        if args.loader:
            rows = bench_loader(args, root)
        elif args.resume_only:
            rows = [row for n in args.sizes for row in bench_resume(n, args=args, root=root)]
        else:
            teacher = str(work / "teacher.pth") if "pseudo" in args.stages else ""
            if teacher:
                _spawn("--teacher-run", teacher)
            rows = []
            for n in args.sizes:
                rows += bench_size(n, args=args, root=root, teacher=teacher)
            print_table(rows, args.total_samples)
        print(f"# done {time.strftime('%H:%M UTC', time.gmtime())}, load {os.getloadavg()[0]:.1f}")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    finally:
        if server:
            server.stop()
        if not args.work and not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
