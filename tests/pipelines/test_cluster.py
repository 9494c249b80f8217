"""Beyond one machine: a two-node Ray cluster on this machine (`ray start --head` plus a
second `ray start --address=...` with its own resources), features and a short training
run submitted to it with RAY_ADDRESS, exactly as a user would. Both nodes are stopped by
their own process ids at the end (never `ray stop`, which would kill every Ray here)."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO, small_config_dict, write_toml

pytestmark = [pytest.mark.slow, pytest.mark.ray]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster_pids(marker: str) -> list[int]:
    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(marker in a for a in p.info["cmdline"] or []):
                pids.append(p.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return pids


def _stop(pids: list[int]) -> None:
    procs = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            procs += [p, *p.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=20)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def test_two_node_cluster_runs_features_and_training(tmp_path):
    temp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths are bounded
    port = _free_port()
    # token authentication, as on a real cluster: every process of it (nodes and the job's
    # driver) is given the same token
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32), "PYTHONPATH": str(REPO)}  # fmt: skip
    common = ["--num-cpus=2", "--object-store-memory=300000000", "--disable-usage-stats"]
    started: list[int] = []
    try:
        subprocess.run(
            [BIN / "ray", "start", "--head", f"--port={port}", "--include-dashboard=false",
             f"--temp-dir={temp}", '--resources={"head_node": 1}', *common],
            env=env, check=True, capture_output=True, timeout=180,
        )  # fmt: skip
        subprocess.run(
            [BIN / "ray", "start", f"--address=127.0.0.1:{port}",
             '--resources={"second_node": 1}', *common],
            env=env, check=True, capture_output=True, timeout=180,
        )  # fmt: skip
        started = _cluster_pids(temp) + _cluster_pids(f"127.0.0.1:{port}")
        assert started

        raw = small_config_dict(tmp_path)
        raw["training"] = {
            **raw["training"], "epochs": 1, "batch_size": 512, "workers": 0,
            "placement_strategy": "SPREAD", "checkpoint_dir": str(tmp_path / "ckpt"),
        }  # fmt: skip
        raw["model"].update(n_experts=4, expert_hidden=[16, 8])
        cfg = write_toml(raw, tmp_path / "cluster.toml")
        run_env = {**env, "RAY_ADDRESS": f"127.0.0.1:{port}",
                   "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}  # fmt: skip
        cli = str(BIN / "recsys-moe")
        for args in (["generate"], ["features"], ["train", "--no-progress"]):
            r = subprocess.run(
                [cli, *args, "--config", str(cfg)], env=run_env, cwd=tmp_path,
                capture_output=True, text=True, timeout=900,
            )  # fmt: skip
            assert r.returncode == 0, (args, r.stdout[-3000:], r.stderr[-3000:])
        out = r.stdout + r.stderr
        assert "2 worker(s) on 2 node(s)" in out, out[-3000:]  # workers = 0: one per node
        assert "registered: recsys_moe_cluster version 1" in out
        assert (tmp_path / "store" / "manifest.json").exists()
    finally:
        _stop(sorted(set(started + _cluster_pids(temp))))
        time.sleep(1)
        assert not _cluster_pids(temp)
