"""Starting or joining Ray the same way in every entry point.

Local by default (an embedded instance sized to this machine); when ``RAY_ADDRESS`` is set
the job joins that cluster and ships this repository's code with ``working_dir`` so the
``recsys_moe``, ``features`` and ``pipelines`` packages import on every node.
"""

from __future__ import annotations

import os
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
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=dashboard,
            runtime_env={"env_vars": WORKER_ENV},
            log_to_driver=True,
        )
