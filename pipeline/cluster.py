"""Starting or joining Ray for a stage driver.

`init_ray(None)` starts an embedded single-node Ray that listens on 127.0.0.1 only, with
the dashboard off and token authentication disabled (Ray 2.60 enables it by default; see
ASSETS.md). `init_ray("ray://...")` or `init_ray("10.0.0.5:6379")` joins an existing cluster,
whose own configuration then applies; so does `init_ray(None)` when `RAY_ADDRESS` is set (a
stage running as a Ray job).

Ray is imported here and in stage drivers only, never in `nlp/` or `model/`.
"""

from __future__ import annotations

import os

# What a loopback-only embedded cluster needs (the caller's environment wins when it sets them).
EMBEDDED_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def init_ray(
    address: str | None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    include_dashboard: bool = False,
    log_to_driver: bool = True,
) -> bool:
    """Start embedded Ray (address None) or connect to `address`; True when this call started it.

    A Ray already initialised in this process is reused as is (returns False), so tests can
    share one module-scoped cluster across stage runs. `num_cpus`/`num_gpus` size the
    embedded cluster only (a joined cluster has its own resources). Callers that get True
    should `ray.shutdown()` when done.
    """
    import ray

    if ray.is_initialized():
        return False
    # Inside a job submitted with `pipeline submit` (Ray Jobs API), RAY_ADDRESS names the
    # cluster the job runs on: join it instead of starting an embedded one.
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=log_to_driver, configure_logging=False)
        return True
    for name, value in EMBEDDED_ENV.items():
        os.environ.setdefault(name, value)
    ray.init(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        include_dashboard=include_dashboard,
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",
        log_to_driver=log_to_driver,
        configure_logging=False,
    )
    return True


def shutdown_ray(started: bool) -> None:
    """`ray.shutdown()` when `started` (the value `init_ray` returned), else nothing."""
    if started:
        import ray

        ray.shutdown()
