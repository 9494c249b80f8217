"""The command line, as a user types it (subprocesses, real files)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}


def cli(*args: str, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args],
        cwd=cwd,
        env=env or ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


def shrunk_toml(tmp_path: Path, config: str, name: str, **values: str) -> Path:
    """``configs/<config>.toml`` with the given keys set (wherever they are) and its data
    and store folders under ``tmp_path``, written as ``<name>.toml``."""
    text = (REPO / "configs" / f"{config}.toml").read_text()
    for key, value in values.items():
        text = re.sub(rf"^{key} = .*$", f"{key} = {value}", text, flags=re.M)
    text = text.replace(f'"data/raw/{config}"', f'"{tmp_path / "raw"}"')
    text = text.replace(f'"data/features/{config}"', f'"{tmp_path / "store"}"')
    p = tmp_path / f"{name}.toml"
    p.write_text(text)
    return p


def small_toml(tmp_path: Path) -> Path:
    return shrunk_toml(tmp_path, "default", "small", n_rows="6000", n_users="300",
                       n_items="100", epochs="1", batch_size="512")  # fmt: skip


def test_help_lists_commands():
    r = cli("--help")
    assert r.returncode == 0 and "generate" in r.stdout and "features" in r.stdout


def test_extend_bad_model_is_a_clear_error(tmp_path):
    r = cli(
        "extend", "--model", str(tmp_path / "nope"), "--domain", "live", "--data", str(tmp_path)
    )
    assert r.returncode == 2 and "expected models:/" in r.stderr and "Traceback" not in r.stderr
    assert "extend" in cli("--help").stdout


def test_unknown_command():
    r = cli("frobnicate")
    assert r.returncode == 2 and "unknown command 'frobnicate'" in r.stderr


def test_bad_config_is_a_clear_error(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[features]\npartitons = 3\n")
    r = cli("generate", "--config", str(p))
    assert r.returncode == 2
    assert "error:" in r.stderr and "partitons" in r.stderr and "Traceback" not in r.stderr


def test_missing_raw_log_is_a_clear_error(tmp_path):
    r = cli("features", "--config", str(small_toml(tmp_path)))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_generate_features_train(tmp_path):
    """The three stages as a user runs them, in a working directory of its own with its own
    MLflow store (so nothing lands in the repository's mlruns/, checkpoints/ or models/)."""
    cfg = small_toml(tmp_path)
    env = {**ENV, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    r = subprocess.run(
        [sys.executable, "-m", "pipelines.generate", "--config", str(cfg), "--no-progress"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "oracle AUC" in r.stdout and "raw log:" in r.stdout
    r = cli("features", "--config", str(cfg), "--no-progress", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert f"feature store: {tmp_path / 'store'}" in r.stdout
    assert (tmp_path / "store" / "manifest.json").is_file()
    r = cli("train", "--config", str(cfg), "--no-progress", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert "oracle" in r.stdout and f"model: {tmp_path / 'models' / 'small'}" in r.stdout
    # the shipped default builds no test split: trained on all but the validation window
    assert "no test split (trained on every row before the validation window)" in r.stdout
    assert (tmp_path / "models" / "small" / "model.safetensors").is_file()
    assert "MLflow run: " in r.stdout and str(tmp_path / "mlflow.db") in r.stdout
    # quiet by default: the command's lines on the terminal, the libraries' in the log file
    # it names at the end, which its MLflow run holds too
    shown = r.stdout + r.stderr
    log = Path(re.search(r"library logs: (\S+)", r.stdout).group(1))
    text = log.read_text()
    assert "Started a local Ray instance" in text and "Started a local Ray" not in shown
    assert "[train] epoch 0:" in shown and "[train] epoch 0:" in text
    assert len(shown.splitlines()) <= 40, shown
    import mlflow

    run_id = re.search(r"MLflow run: (\w+)", r.stdout).group(1)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert [a.path for a in client.list_artifacts(run_id, "logs")] == [f"logs/{log.name}"]

    # the retrain as `make retrain` runs it: a store of the newest days grown from the
    # champion, trained from its weights, registered behind the same gate
    window = ("--set", f"features.store_dir={tmp_path / 'retrain'}")
    r = cli("features", "--config", str(cfg), "--no-progress", "--window-days", "3",
            "--grow-from", *window, cwd=tmp_path, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (
        "window: the newest 3 day(s)" in r.stdout and "grown from recsys_moe_small v1" in r.stdout
    )
    r = cli("train", "--config", str(cfg), "--no-progress", "--warm-start", "--alias",
            "challenger", *window, cwd=tmp_path, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "warm start from recsys_moe_small v1" in r.stdout
    assert "registered: recsys_moe_small version 2" in r.stdout and "@challenger" in r.stdout
    assert client.get_model_version("recsys_moe_small", "2").tags["parent.version"] == "1"
    # a challenger to prove on live traffic: the champion stays where it was
    by_alias = client.get_model_version_by_alias
    assert [str(by_alias("recsys_moe_small", a).version) for a in ("champion", "challenger")] == [
        "1", "2"]  # fmt: skip
    r = cli("train", "--config", str(cfg), "--no-progress", "--warm-start", "models:/nope@x",
            *window, cwd=tmp_path, env=env)  # fmt: skip
    assert r.returncode == 2 and "--warm-start models:/nope@x" in r.stderr
    assert "Traceback" not in r.stderr


def _string_id_toml(tmp_path: Path) -> Path:
    """configs/sparse.toml (string ids, arriving users and items), shrunk."""
    return shrunk_toml(tmp_path, "sparse", "strings", n_rows="8000", n_users="400",
                       n_items="120", epochs="1", chunk_rows="2000", batch_size="512")  # fmt: skip


@pytest.mark.slow
def test_string_id_log_through_every_command(tmp_path):
    """A log with string ids ("u17", "i4") through generate, features, train (metrics
    included), candidates, score, extend and serve, as a user runs them."""
    import json

    import polars as pl
    import requests

    cfg = _string_id_toml(tmp_path)
    env = {**ENV, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}

    def run(*args):
        r = cli(*args, "--config", str(cfg), cwd=tmp_path, env=env)
        assert r.returncode == 0, (args, r.stdout[-2000:], r.stderr[-3000:])
        return r

    run("generate", "--no-progress")
    inter = pl.read_parquet(str(tmp_path / "raw" / "interactions" / "*.parquet"))
    assert inter["user_id"].dtype == pl.String and inter["user_id"][0].startswith("u")
    run("features", "--no-progress")
    r = run("train", "--no-progress")
    assert "registered: recsys_moe_strings version 1" in r.stdout and "cold_user" in r.stdout
    run("candidates", "--rows", "3000", "--output", str(tmp_path / "cands"))
    r = run("score", "--input", str(tmp_path / "cands"), "--output", str(tmp_path / "scored"),
            "--no-progress")  # fmt: skip
    summary = json.loads((tmp_path / "scored" / "summary.json").read_text())
    assert summary["rows_out"] == 3000 and summary["rows_cold_user"] > 0
    live = tmp_path / "live"
    (live / "interactions").mkdir(parents=True)
    inter.filter(pl.col("domain") == "video").with_columns(
        pl.lit("live").alias("domain")
    ).write_parquet(live / "interactions" / "part-0.parquet")
    for t in ("users.parquet", "items.parquet"):
        (live / t).write_bytes((tmp_path / "raw" / t).read_bytes())
    r = run("extend", "--domain", "live", "--data", str(live), "--no-progress")
    assert "extended models:/recsys_moe_strings@champion with domain 'live'" in r.stdout
    # the service over the trained bundle: string ids in, string ids out
    port = 18000 + os.getpid() % 1000
    serve = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "serve", "--port", str(port), "--model",
         str(tmp_path / "models" / "strings")],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert serve.poll() is None, serve.stdout.read()[-3000:]
            import time

            time.sleep(1)
        user = inter["user_id"][0]
        items = inter["item_id"].unique().head(5).to_list()
        body = {"user_id": user, "domain": "feed", "candidates": [*items, "i-never-seen"]}
        got = requests.post(f"{url}/rank", json=body, timeout=30)
        assert got.status_code == 200, got.text
        ranked = got.json()["items"]
        assert {i["item_id"] for i in ranked} == set(body["candidates"])
        assert next(i for i in ranked if i["item_id"] == "i-never-seen")["cold_item"]
    finally:
        serve.send_signal(2)
        try:
            serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            serve.kill()
