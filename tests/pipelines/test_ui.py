"""`make ui`: the MLflow UI over a tracking store, opened in headless Chromium.

The test logs a run with metrics into a temporary store, starts the UI the way `make ui`
does (pipelines.ui), opens the experiment's runs page in headless Chromium and checks the
run and its metrics appear in the rendered page. Chromium (Debian's `chromium` package) is
installed by the set-up when missing; the screenshot is kept in tests/artifacts/.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from recsys_moe.cluster import free_port

pytestmark = pytest.mark.slow

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
]  # fmt: skip


def chromium() -> str:
    """The chromium binary, installed with apt-get when missing (skip if that is impossible)."""
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        pytest.skip("chromium is missing and cannot be installed here (needs apt-get as root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in ([apt, "update", "-qq"], [apt, "install", "-y", "-qq", "chromium"]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if r.returncode:
            pytest.skip(f"installing chromium failed: {r.stderr[-500:]}")
    return shutil.which("chromium")


def _browse(binary: str, url: str, screenshot: Path | None = None) -> str:
    """The page's DOM after scripts ran (and optionally a screenshot)."""
    with tempfile.TemporaryDirectory() as profile:
        args = [binary, *FLAGS, f"--user-data-dir={profile}", "--window-size=1400,900",
                "--virtual-time-budget=15000"]  # fmt: skip
        if screenshot is not None:
            r = subprocess.run([*args, f"--screenshot={screenshot}", url], capture_output=True,
                               timeout=120)  # fmt: skip
            assert screenshot.exists(), r.stderr[-1000:]
        r = subprocess.run([*args, "--dump-dom", url], capture_output=True, text=True, timeout=120)
        return r.stdout


def test_mlflow_ui_shows_runs_and_metrics(tmp_path):
    import mlflow

    binary = chromium()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment(
        "recsys-moe-ui-test", artifact_location=(tmp_path / "a").as_uri()
    )
    run = client.create_run(exp, run_name="ui-check-run")
    for step, v in enumerate([0.71, 0.73, 0.74]):
        client.log_metric(run.info.run_id, "valid/auc_mean", v, step=step)
    client.log_param(run.info.run_id, "model.arch", "mmoe")
    client.set_terminated(run.info.run_id)

    from pipelines.ui import command

    port = free_port()
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        cmd, env = command("127.0.0.1", port)
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI") if old is None else os.environ.update(
            MLFLOW_TRACKING_URI=old
        )
    assert "--workers" in cmd and cmd[cmd.index("--host") + 1] == "127.0.0.1"
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("the MLflow UI did not come up")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "mlflow_ui_runs.png"
        dom = _browse(binary, f"{base}/#/experiments/{exp}/runs", shot)
        assert "ui-check-run" in dom
        assert shot.stat().st_size > 10_000
        # the run's page lists its params and metrics (latest value)
        run_shot = ARTIFACTS / "mlflow_ui_run.png"
        run_dom = _browse(binary, f"{base}/#/experiments/{exp}/runs/{run.info.run_id}", run_shot)
        assert "valid/auc_mean" in run_dom and "0.74" in run_dom
        assert "model.arch" in run_dom and "mmoe" in run_dom
    finally:
        server.terminate()
        server.wait(timeout=30)
