"""Starting or joining Ray the same way in every entry point.

Local by default (an embedded instance sized to this machine); when ``RAY_ADDRESS`` is set
the job joins that cluster and ships this repository's code with ``working_dir`` so the
``recsys_moe``, ``features`` and ``pipelines`` packages import on every node.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import ray

REPO_ROOT = Path(__file__).resolve().parent.parent
# torch's spin-waiting OpenMP threads stall small ops on a shared 2-core box
WORKER_ENV = {
    "OMP_NUM_THREADS": "1",
    "OMP_WAIT_POLICY": "PASSIVE",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Ray Train otherwise prints every worker line twice (its own log + stdout)
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}
# Ray Serve's request path, tuned (Ray 2.60's throughput-optimised settings, less direct
# ingress: the HTTP proxy stays, so clients keep one address): replicas run user code
# and the router on their main event loop instead of extra threads, the proxy and
# handles talk gRPC, request-path logs are buffered and not copied to stderr (they stay
# in Ray's log folder), the GC is frozen after start-up. Measured by bench/serve_floor.py
# on 2 cores, concurrency 8: the no-op ranker's throughput 94 -> 139-164 req/s, p99
# 124-133 -> 76-97 ms (across runs). Read when Ray's processes start: a cluster joined
# through RAY_ADDRESS needs them in the environment of `ray start`.
SERVE_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
    "RAY_SERVE_LOG_TO_STDERR": "0",
    "RAY_SERVE_FREEZE_GC_ON_STARTUP": "1",
}


@contextmanager
def serve_env() -> Iterator[None]:
    """:data:`SERVE_ENV` in the environment while a local Ray starts (its processes inherit
    it), not after: in this process (the driver) handles keep Serve's defaults, which
    work outside an event loop. A variable already set wins."""
    added = [k for k in SERVE_ENV if k not in os.environ]
    os.environ.update({k: SERVE_ENV[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


SHIP_EXCLUDES = [
    "/.venv/",
    "/data/",
    "/mlruns/",
    "/models/",
    ".git/",
    "*.parquet",
    "bench/out/",
    ".pytest_cache/",
]


def init_ray(num_cpus: int | None = None, dashboard: bool = False) -> None:
    """Connect to ``RAY_ADDRESS`` if set, else start a local instance; no-op if already up.

    ``dashboard``: start the dashboard (on 127.0.0.1) with a local instance; Ray Train's
    controller polls the state API it serves and warns every few seconds without it.
    """
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = os.environ.get("RAY_ADDRESS")
    if address:
        runtime_env = {
            "working_dir": str(REPO_ROOT),
            "excludes": SHIP_EXCLUDES,
            "env_vars": WORKER_ENV,
        }
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        with serve_env():
            ray.init(
                num_cpus=num_cpus,
                include_dashboard=dashboard,
                runtime_env={"env_vars": WORKER_ENV},
                log_to_driver=True,
            )
