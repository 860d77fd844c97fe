"""`pipeline submit` and `pipeline job status|logs|stop`: run any stage on a Ray cluster through
the Ray Jobs API.

`pipeline submit --address http://HEAD:8265 -- pseudo-label s3://bucket/shards ...` uploads the
working directory (the project; `.venv`, `runs/`, `.git` and checkpoints excluded) as the job's
runtime env, runs `python -m pipeline STAGE ARGS...` as the job's entry point, and streams its
logs until it ends (exit code 0 only when the job SUCCEEDED); `--no-wait` prints the job id
and returns. Inside the job `RAY_ADDRESS` is set, so the stage joins the cluster
(`pipeline.cluster.init_ray`) and its Ray Data / Ray Train work spreads over the workers.

`--runtime-env FILE` (YAML, read with `yaml.safe_load`) adds to the runtime env, e.g. `pip:`
requirements or `env_vars:` (S3 credentials, `AWS_ENDPOINT_URL`); keys it sets win over the
defaults. `--num-gpus`/`--num-cpus` reserve resources for the entry point (the driver) itself;
the stages' workers ask for theirs (`pseudo-label --num-gpus 1`, `train-student --use-gpu`).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer

EXCLUDES = [".venv", ".venv/**", "runs", "runs/**", ".git", ".git/**", "**/__pycache__", "*.pth", "*.safetensors", "*.tar"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


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


def entrypoint(stage_args: list[str]) -> str:
    """`python -m pipeline STAGE ARGS...`, quoted for the job's shell."""
    import shlex

    if not stage_args:
        raise ValueError("give the stage and its arguments after '--', e.g. -- parse-captions s3://b/shards --out s3://b/phrases")
    return " ".join(shlex.quote(part) for part in ["python", "-m", "pipeline", *stage_args])


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


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


def _submit_when_ready(client, *, wait_s: float = 120.0, **job) -> str:
    """`client.submit_job(**job)`, retried while a just-started head has no job agent yet."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as error:
            if "No available agent" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def submit_command(
    stage_args: list[str] = typer.Argument(..., help="After '--': the stage and its arguments."),
    address: str = typer.Option(..., "--address", help="Ray dashboard address, e.g. http://HEAD:8265."),
    working_dir: str = typer.Option(".", "--working-dir", help="Project folder uploaded as the job's working dir."),
    runtime_env: Optional[str] = typer.Option(None, "--runtime-env", help="YAML file with more runtime env keys (pip, env_vars)."),
    num_gpus: float = typer.Option(0.0, "--num-gpus", help="GPUs reserved for the entry point (the stage's driver)."),
    num_cpus: float = typer.Option(0.0, "--num-cpus", help="CPUs reserved for the entry point."),
    job_id: Optional[str] = typer.Option(None, "--job-id", help="Submission id (default: Ray's)."),
    no_wait: bool = typer.Option(False, "--no-wait", help="Print the job id and return without streaming logs."),
) -> None:
    """Submit a stage to a Ray cluster (Ray Jobs API) and stream its logs."""
    try:
        env = build_runtime_env(working_dir, runtime_env)
        command = entrypoint(stage_args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise typer.Exit(code=2) from None
    client = _client(address)
    submitted = _submit_when_ready(
        client,
        entrypoint=command,
        runtime_env=env or None,
        submission_id=job_id,
        entrypoint_num_gpus=num_gpus or None,
        entrypoint_num_cpus=num_cpus or None,
    )
    print(f"submitted job {submitted}: {command}", file=sys.stderr, flush=True)
    if no_wait:
        print(submitted)
        return
    status = follow(client, submitted)
    print(f"job {submitted}: {status}", file=sys.stderr)
    if status != "SUCCEEDED":
        raise typer.Exit(code=1)


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
