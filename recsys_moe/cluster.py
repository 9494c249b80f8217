"""Starting or joining Ray the same way in every entry point.

Local by default (an embedded instance sized to this machine); when ``RAY_ADDRESS`` is set
the job joins that cluster and ships this repository's code with ``working_dir`` so the
``recsys_moe``, ``features`` and ``pipelines`` packages import on every node.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Ray reads RAY_AUTH_MODE once, when it is imported: a local instance (no RAY_ADDRESS)
# starts with token authentication unless the user chose otherwise. Import this module
# before anything imports ray (the CLI and the tests do).
if not os.environ.get("RAY_ADDRESS"):
    os.environ.setdefault("RAY_AUTH_MODE", "token")

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
# in Ray's log folder), the GC is frozen after start-up: fewer threads and copies per
# request (bench/serve_floor.py measures it; bench/RESULTS.md). Read when Ray's processes
# start: a cluster joined through RAY_ADDRESS needs them in the environment of `ray start`.
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


LOOPBACK = "127.0.0.1"


def init_ray(
    num_cpus: int | None = None, dashboard: bool = False, log_to_driver: bool = True
) -> None:
    """Connect to ``RAY_ADDRESS`` if set, else start a local instance; no-op if already up.

    A local instance is closed to the network as far as Ray lets it be: token
    authentication on (``RAY_AUTH_MODE=token``, Ray generates the token under ``~/.ray/``;
    gcs_server, raylet and the workers still listen on every interface, and the token is
    what guards them), the node's address and the dashboard on 127.0.0.1. A user who sets
    ``RAY_AUTH_MODE`` themselves decides. On a cluster (``RAY_ADDRESS``) the cluster's own
    settings apply: export its ``RAY_AUTH_MODE`` and token (``RAY_AUTH_TOKEN`` or
    ``RAY_AUTH_TOKEN_PATH``) before the command; TLS between nodes is the operator's.

    ``dashboard``: start the dashboard with a local instance; Ray Train's controller polls
    the state API it serves and warns every few seconds without it.
    """
    if ray.is_initialized():
        return
    with _keep_sigterm_handler():
        _init(num_cpus, dashboard, log_to_driver)


@contextmanager
def _keep_sigterm_handler() -> Iterator[None]:
    """ray.init replaces a driver's SIGTERM handler with sys.exit(15); the command's own
    (pipelines/cli.py: unwind like Ctrl-C) is put back."""
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and before is not None:
            signal.signal(signal.SIGTERM, before)


def _init(num_cpus: int | None, dashboard: bool, log_to_driver: bool) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
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
                dashboard_host=LOOPBACK,
                _node_ip_address=LOOPBACK,
                runtime_env={"env_vars": WORKER_ENV},
                log_to_driver=log_to_driver,
            )
