"""Starting or joining Ray for a stage driver.

`init_ray(None)` starts an embedded single-node Ray of this process's own: a fresh local
cluster (`address="local"`) in a temp folder of its own, listening on 127.0.0.1 only, with
token authentication disabled (Ray 2.60 enables it by default; see ASSETS.md). It never
joins another Ray that happens to run on the machine (a `ray start --head`, a test's
`ray.cluster_utils.Cluster`, another user's engine): Ray's own `ray.init()` would join the
cluster named in `/tmp/ray/ray_current_cluster`, which is not what "embedded" means.

A cluster is joined only when asked: `init_ray("ray://...")` or `init_ray("10.0.0.5:6379")`
(the `--address` option), or `RAY_ADDRESS` in the environment (a stage running as a Ray job),
whose own configuration then applies.

What reaches the terminal (`pipeline.run_log`): by default Ray's own log lines go to the run's
log file and an embedded Ray does not forward its workers' output (`log_to_driver=False`);
`--verbose` or GLIP_VERBOSE=1 keeps Ray's defaults. A joined cluster forwards its workers'
output as Ray does (our training progress comes through it there).

Ray is imported here and in stage drivers only, never in `nlp/` or `model/`.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# What a loopback-only embedded cluster needs (the caller's environment wins when it sets them).
# Starts of an embedded Ray before giving up, when its raylet misses Ray's start-up limit.
START_ATTEMPTS = 3

EMBEDDED_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}


@dataclass
class _Embedded:
    """The embedded Ray this process started: its temp root and the RAY_TMPDIR it replaced."""

    root: str
    previous_tmpdir: str | None


_embedded: _Embedded | None = None
_forwarding: bool | None = None  # log_to_driver of the Ray init_ray started (None: not ours)


def init_ray(
    address: str | None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    include_dashboard: bool = False,
    log_to_driver: bool | None = None,
) -> bool:
    """Start embedded Ray (address None) or connect to `address`; True when this call started it.

    A Ray already initialised in this process is reused as is (returns False), so tests can
    share one module-scoped cluster across stage runs. `num_cpus`/`num_gpus` size the
    embedded cluster only (a joined cluster has its own resources). Callers that get True
    should call `shutdown_ray(True)` when done. `log_to_driver` None: workers' output is
    forwarded with --verbose or on a joined cluster only (`pipeline.run_log`).
    """
    import ray

    from pipeline import run_log

    global _forwarding
    if ray.is_initialized():
        return False
    _forget_embedded()  # a previous embedded Ray shut down with a bare ray.shutdown()
    # Inside a job submitted with `pipeline submit` (Ray Jobs API), RAY_ADDRESS names the
    # cluster the job runs on: join it instead of starting an embedded one.
    address = address or os.environ.get("RAY_ADDRESS") or None
    forward = log_to_driver if log_to_driver is not None else bool(address) or run_log.verbose()
    run_log.quiet_ray()
    try:
        if address:
            ray.init(address=address, log_to_driver=forward, configure_logging=False)
        else:
            for name, value in EMBEDDED_ENV.items():
                os.environ.setdefault(name, value)
            _start_embedded(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=include_dashboard, log_to_driver=forward)
    except BaseException:
        run_log.restore()
        raise
    _forwarding = forward
    return True


def worker_output_forwarded() -> bool | None:
    """Whether the running Ray forwards its workers' stdout/stderr here (None: not started by
    `init_ray`, so Ray's default, forwarded)."""
    return _forwarding


def _start_embedded(*, num_cpus: int | None, num_gpus: int | None, include_dashboard: bool, log_to_driver: bool) -> None:
    """`ray.init(address="local")` in a temp root of its own, with free dashboard ports.

    Why the temp root: code that runs inside the cluster and asks Ray "which cluster am I
    on?" without an address reads `$RAY_TMPDIR/ray/ray_current_cluster` (the file `ray start`
    writes). Ray Train v2's placement-group cleaner does so through the State API to learn
    whether its controller is alive; with another Ray on the machine it asked that one, got
    "no such actor" and removed a live training's placement group ("Destroying worker since
    its placement group was removed"). Setting RAY_TMPDIR before the raylet starts (workers
    inherit it) and writing our own address there makes every such lookup find this cluster.
    Why the port: the dashboard's default (8265) may be another cluster's; a free one is taken.
    (Ray's other ports are chosen free by Ray itself; its dashboard agent's fixed default is
    not settable through `ray.init`, and two trainings side by side run with it as it is:
    tests/test_two_engines.py.)
    """
    import ray
    from ray._private.utils import write_ray_address

    global _embedded
    base = os.environ.get("RAY_TMPDIR") or "/tmp"  # short: Ray's Unix socket paths are length-limited
    for attempt in range(1, START_ATTEMPTS + 1):
        root = tempfile.mkdtemp(prefix="glip-", dir=base)
        _embedded = _Embedded(root=root, previous_tmpdir=os.environ.get("RAY_TMPDIR"))
        os.environ["RAY_TMPDIR"] = root
        temp_dir = os.path.join(root, "ray")
        try:
            ray.init(
                address="local",
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                include_dashboard=include_dashboard,
                dashboard_host="127.0.0.1",
                dashboard_port=_free_port() if include_dashboard else None,
                _node_ip_address="127.0.0.1",
                _temp_dir=temp_dir,
                log_to_driver=log_to_driver,
                configure_logging=False,
            )
        except BaseException as error:
            # Ray gives its raylet a fixed 30 s to register (not a setting: ray/_private/node.py);
            # on a busy machine it can miss it. The half-started node is ours alone (its
            # processes name our temp root): stop them and start again.
            timed_out = "timed out during startup" in str(error)
            if timed_out:
                ray.shutdown()
                _stop_processes_under(root)
            _forget_embedded()
            if not timed_out or attempt == START_ATTEMPTS:
                raise
            print(
                f"Ray's node did not register within its 30 s start-up limit (a busy machine?): "
                f"starting it again ({attempt + 1}/{START_ATTEMPTS})",
                file=sys.stderr, flush=True,
            )
            continue
        break
    write_ray_address(ray.get_runtime_context().gcs_address, temp_dir)


def _stop_processes_under(root: str, *, timeout_s: float = 10.0) -> None:
    """SIGKILL the processes whose command line names `root` (a half-started embedded Ray:
    its GCS, raylet and agents all take our unique temp dir as an argument), never another's.
    The scan is repeated until it finds none (a process starting during one scan is caught by
    the next; a killed one's command line reads empty), for at most `timeout_s`."""
    import signal

    deadline = time.monotonic() + timeout_s
    while True:
        found = pids_naming(root)
        if not found or time.monotonic() > deadline:
            return
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                continue
        time.sleep(0.2)


def pids_naming(marker: str) -> list[int]:
    """Pids of the processes (this one apart) whose command line contains `marker`."""
    pids = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _forget_embedded() -> None:
    """Restore RAY_TMPDIR and remove the temp root of an embedded Ray that is no longer up."""
    global _embedded
    if _embedded is None:
        return
    if _embedded.previous_tmpdir is None:
        os.environ.pop("RAY_TMPDIR", None)
    else:
        os.environ["RAY_TMPDIR"] = _embedded.previous_tmpdir
    shutil.rmtree(_embedded.root, ignore_errors=True)
    _embedded = None


def shutdown_ray(started: bool) -> None:
    """`ray.shutdown()` when `started` (the value `init_ray` returned), else nothing."""
    global _forwarding
    if started:
        import ray

        from pipeline import run_log

        # Worker output this terminal did not get (log_to_driver=False) lives in the session's
        # logs, which go with the temp root: the run's log file keeps it.
        logs = _session_logs() if _forwarding is False and _embedded is not None else None
        ray.shutdown()
        if logs is not None:
            run_log.append_worker_output(logs)
        _forget_embedded()
        _forwarding = None
        run_log.restore()


def _session_logs() -> str | None:
    import ray

    node = ray._private.worker._global_node
    return os.path.join(node.get_session_dir_path(), "logs") if node is not None else None


@atexit.register
def _cleanup_at_exit() -> None:
    import sys

    ray = sys.modules.get("ray")
    if _embedded is None:
        return
    if ray is not None and ray.is_initialized():
        ray.shutdown()  # our temp root holds its sockets and logs: stop it before removing them
    _forget_embedded()
    run_log_module = sys.modules.get("pipeline.run_log")
    if run_log_module is not None:
        run_log_module.restore()
