"""`pipeline submit` and `pipeline job status|logs|stop`: run any stage on a Ray cluster through
the Ray Jobs API.

`pipeline submit --address http://HEAD:8265 -- pseudo-label s3://bucket/shards ...` uploads the
working directory (the project; `.venv`, `runs/`, `.git` and checkpoints excluded) as the job's
runtime env, runs `python -m pipeline STAGE ARGS...` as the job's entry point, and streams its
logs until it ends (exit code 0 only when the job SUCCEEDED); `--no-wait` prints the job id
and returns. Inside the job `RAY_ADDRESS` is set, so the stage joins the cluster
(`pipeline.cluster.init_ray`) and its Ray Data / Ray Train work spreads over the workers.

A cluster that is still starting is waited for: while its dashboard does not answer, or answers
Ray's transient "No available agent to submit job", `submit` retries with back-off for
`--wait-cluster` seconds (default 60), printing what it waits for; any other error ends it at
once, in one line, with exit code 2.

The job must run the engine with an interpreter that has it installed, and a head started as
`.venv/bin/ray start --head` (venv not activated) has another `python` on its PATH. So before
the stage, `submit` runs a probe job (same runtime env) that tries `--python` (default: the
cluster's `python`, then this machine's own interpreter path, which is the same in a container
image or on a shared file system) and the stage runs with the first that imports the engine;
when none does, one line says what to install or activate. `--no-check` skips the probe.

`--runtime-env FILE` (YAML, read with `yaml.safe_load`) adds to the runtime env, e.g. `pip:`
requirements or `env_vars:` (S3 credentials, `AWS_ENDPOINT_URL`); keys it sets win over the
defaults. `--num-gpus`/`--num-cpus` reserve resources for the entry point (the driver) itself;
the stages' workers ask for theirs (`pseudo-label --num-gpus 1`, `train-student --use-gpu`).
"""

from __future__ import annotations

import re
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional, TypeVar

import typer

from pipeline.user_errors import user_errors

EXCLUDES = [".venv", ".venv/**", "runs", "runs/**", ".git", ".git/**", "**/__pycache__", "*.pth", "*.safetensors", "*.tar"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
NO_AGENT = "No available agent"  # Ray's answer while a just-started head has no job agent yet
ENGINE_IMPORTS = "import sys, typer, ray, pipeline.cli"
FOUND_MARKER = "GLIP_ENGINE_PYTHON="
PROBE_MARKER = "GLIP_ENGINE_PROBE "
T = TypeVar("T")


class ClusterNotReady(RuntimeError):
    """The cluster did not answer (or had no job agent) within `--wait-cluster` seconds."""


class EngineNotImportable(RuntimeError):
    """No interpreter tried on the cluster can import the engine."""


def build_runtime_env(working_dir: str | None, runtime_env_file: str | None) -> dict[str, Any]:
    """The job's runtime env: the working dir with the project's excludes, plus FILE's keys."""
    env: dict[str, Any] = {}
    if working_dir:
        folder = Path(working_dir)
        if not (folder / "pipeline").is_dir():
            raise ValueError(f"--working-dir {working_dir}: not the project folder (no pipeline/ package in it)")
        env = {"working_dir": str(folder.resolve()), "excludes": list(EXCLUDES)}
    if runtime_env_file:
        import yaml

        path = Path(runtime_env_file)
        if not path.is_file():
            raise FileNotFoundError(f"--runtime-env {path}: file not found")
        extra = yaml.safe_load(path.read_text())
        if not isinstance(extra, dict):
            raise ValueError(f"--runtime-env {path}: expected a YAML mapping (working_dir, pip, env_vars, ...)")
        if "excludes" in extra:
            extra["excludes"] = list(env.get("excludes", [])) + list(extra["excludes"])
        env.update(extra)
    return env


def entrypoint(stage_args: list[str], *, python: str = "python") -> str:
    """`PYTHON -m pipeline STAGE ARGS...`, quoted for the job's shell."""
    if not stage_args:
        raise ValueError("give the stage and its arguments after '--', e.g. -- parse-captions s3://b/shards --out s3://b/phrases")
    return " ".join(shlex.quote(part) for part in [python, "-m", "pipeline", *stage_args])


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def transient_wait(error: Exception, address: str) -> str | None:
    """What a transient error means we wait for, or None for an error to report at once."""
    import requests

    if isinstance(error, (ConnectionError, requests.exceptions.ConnectionError)):
        return f"the Ray dashboard at {address} to answer"
    if isinstance(error, RuntimeError) and NO_AGENT in str(error):
        return f"the job agent of the cluster at {address} (Ray: {NO_AGENT!r})"
    return None


def retry_while_starting(
    action: Callable[[], T], *, address: str, wait_s: float, stream=None, sleep=time.sleep
) -> T:
    """`action()`, retried with back-off (0.5 s doubling to 8 s) while it fails transiently
    (`transient_wait`), for at most `wait_s` seconds; each wait is printed on `stream`.

    Raises `ClusterNotReady` when the time is up, and any other error at once.
    """
    stream = stream or sys.stderr
    deadline = time.monotonic() + wait_s
    delay = 0.5
    while True:
        try:
            return action()
        except Exception as error:  # noqa: BLE001 - classified below, re-raised unless transient
            waiting_for = transient_wait(error, address)
            if waiting_for is None:
                raise
            left = deadline - time.monotonic()
            if left <= 0:
                raise ClusterNotReady(f"waited {wait_s:.0f} s (--wait-cluster) for {waiting_for}: {error}") from None
            print(f"submit: waiting for {waiting_for}, {left:.0f} s left", file=stream, flush=True)
            sleep(min(delay, left))
            delay = min(2 * delay, 8.0)


def probe_entrypoint(candidates: Sequence[str]) -> str:
    """A shell command that prints `GLIP_ENGINE_PYTHON=<first candidate importing the engine>`,
    and for each candidate that fails, one `GLIP_ENGINE_PROBE <candidate>: <last error line>`."""
    check = shlex.quote(ENGINE_IMPORTS)
    steps = []
    for python in candidates:
        quoted = shlex.quote(python)
        steps.append(
            f'if command -v {quoted} >/dev/null 2>&1; then '
            f'out="$({quoted} -c {check} 2>&1)" && {{ echo "{FOUND_MARKER}"{quoted}; exit 0; }}; '
            f'echo "{PROBE_MARKER}"{quoted}": $(printf "%s" "$out" | tail -n 1)"; '
            f'else echo "{PROBE_MARKER}"{quoted}": not found on the cluster\'s PATH"; fi'
        )
    return "; ".join(steps) + "; exit 1"


def find_engine_python(client, *, candidates: Sequence[str], runtime_env: dict | None, address: str, poll_s: float = 0.5) -> str:
    """The first of `candidates` that imports the engine on the cluster (a probe job with the
    stage's runtime env). Raises `EngineNotImportable` with what to do, in one line."""
    job = client.submit_job(entrypoint=probe_entrypoint(candidates), runtime_env=runtime_env)
    while str(getattr(status := client.get_job_status(job), "value", status)) not in TERMINAL:
        time.sleep(poll_s)
    logs = client.get_job_logs(job)
    found = re.search(rf"^{FOUND_MARKER}(.+)$", logs, flags=re.MULTILINE)
    if found:
        return found.group(1).strip()
    failures = [line[len(PROBE_MARKER):].strip() for line in logs.splitlines() if line.startswith(PROBE_MARKER)]
    reasons = "; ".join(failures) or f"the probe job {job} ended {status} ({logs.strip().splitlines()[-1:] or 'no log'})"
    raise EngineNotImportable(
        f"the cluster at {address} cannot run the engine ({reasons}): install it into the cluster's Python "
        "(pip install 'glip-data-engine[s3,gcs]' or the jobs/Dockerfile image), start the head from the activated "
        "venv (source .venv/bin/activate && ray start --head), or name the interpreter with --python PATH"
    )


def engine_candidates(python: str | None) -> list[str]:
    """`--python` alone when given, else the cluster's `python`, then this interpreter's path."""
    if python:
        return [python]
    return list(dict.fromkeys(["python", sys.executable]))


def follow(client, job_id: str, *, poll_s: float = 1.0, stream=None) -> str:
    """Print the job's log as it grows until it ends; returns the final status name."""
    stream = stream or sys.stdout
    printed = 0
    while True:
        raw = client.get_job_status(job_id)
        status = str(getattr(raw, "value", raw))
        logs = client.get_job_logs(job_id)
        if len(logs) > printed:
            stream.write(logs[printed:])
            stream.flush()
            printed = len(logs)
        if status in TERMINAL:
            return status
        time.sleep(poll_s)


@user_errors(ValueError, FileNotFoundError, RuntimeError)
def submit_command(
    stage_args: list[str] = typer.Argument(..., help="After '--': the stage and its arguments."),
    address: str = typer.Option(..., "--address", help="Ray dashboard address, e.g. http://HEAD:8265."),
    working_dir: str = typer.Option(".", "--working-dir", help="Project folder uploaded as the job's working dir."),
    runtime_env: Optional[str] = typer.Option(None, "--runtime-env", help="YAML file with more runtime env keys (pip, env_vars)."),
    num_gpus: float = typer.Option(0.0, "--num-gpus", help="GPUs reserved for the entry point (the stage's driver)."),
    num_cpus: float = typer.Option(0.0, "--num-cpus", help="CPUs reserved for the entry point."),
    job_id: Optional[str] = typer.Option(None, "--job-id", help="Submission id (default: Ray's)."),
    no_wait: bool = typer.Option(False, "--no-wait", help="Print the job id and return without streaming logs."),
    wait_cluster: float = typer.Option(
        60.0, "--wait-cluster", min=0, help="Seconds to wait for a cluster that is still starting (no dashboard or job agent yet)."
    ),
    python: Optional[str] = typer.Option(
        None, "--python", help="Interpreter the job runs the engine with (default: the cluster's python, else this one's path)."
    ),
    no_check: bool = typer.Option(False, "--no-check", help="Skip the probe job that finds an interpreter importing the engine."),
) -> None:
    """Submit a stage to a Ray cluster (Ray Jobs API) and stream its logs."""
    env = build_runtime_env(working_dir, runtime_env)
    entrypoint(stage_args)  # the stage arguments are checked before the cluster is asked
    client, submitted, command = _submit_stage(
        address, stage_args, env=env or None, wait_s=wait_cluster, python=python, check=not no_check,
        submission_id=job_id, entrypoint_num_gpus=num_gpus or None, entrypoint_num_cpus=num_cpus or None,
    )
    print(f"submitted job {submitted}: {command}", file=sys.stderr, flush=True)
    if no_wait:
        print(submitted)
        return
    status = follow(client, submitted)
    print(f"job {submitted}: {status}", file=sys.stderr)
    if status != "SUCCEEDED":
        raise typer.Exit(code=1)


def _submit_stage(
    address: str, stage_args: list[str], *, env: dict | None, wait_s: float, python: str | None, check: bool, **job
) -> tuple[Any, str, str]:
    """Wait for the cluster, find the engine's interpreter there (unless `check` is off), submit
    the stage; returns (client, job id, entry point). Every call to the cluster rides out its
    start-up, within one `wait_s` budget."""
    deadline = time.monotonic() + wait_s

    def patiently(action: Callable[[], T]) -> T:
        return retry_while_starting(action, address=address, wait_s=max(0.0, deadline - time.monotonic()))

    client = patiently(lambda: _client(address))
    chosen = python or "python"
    if check:
        candidates = engine_candidates(python)
        chosen = patiently(lambda: find_engine_python(client, candidates=candidates, runtime_env=env, address=address))
        if chosen != "python":
            print(f"submit: the cluster's engine interpreter is {chosen}", file=sys.stderr, flush=True)
    command = entrypoint(stage_args, python=chosen)
    return client, patiently(lambda: client.submit_job(entrypoint=command, runtime_env=env, **job)), command



job_app = typer.Typer(help="Status, logs and stopping of submitted jobs.", no_args_is_help=True)


@job_app.command("status")
def job_status(job_id: str, address: str = typer.Option(..., "--address")) -> None:
    """Print a job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    info = _client(address).get_job_info(job_id)
    status = getattr(info.status, "value", info.status)
    print(f"{job_id} {status}" + (f": {info.message}" if info.message else ""))


@job_app.command("logs")
def job_logs(
    job_id: str, address: str = typer.Option(..., "--address"), follow_logs: bool = typer.Option(False, "--follow", "-f")
) -> None:
    """Print a job's logs (with --follow, until it ends)."""
    client = _client(address)
    if follow_logs:
        follow(client, job_id)
    else:
        sys.stdout.write(client.get_job_logs(job_id))


@job_app.command("stop")
def job_stop(job_id: str, address: str = typer.Option(..., "--address")) -> None:
    """Ask Ray to stop a running job."""
    stopped = _client(address).stop_job(job_id)
    print(f"{job_id}: {'stop requested' if stopped else 'not running'}")
