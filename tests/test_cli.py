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


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


def small_toml(tmp_path: Path) -> Path:
    text = (REPO / "configs" / "default.toml").read_text()
    for key, value in {
        "n_rows": "6000",
        "n_users": "300",
        "n_items": "100",
        "epochs": "1",
        "batch_size": "512",
    }.items():
        text = re.sub(rf"^{key} = .*$", f"{key} = {value}", text, flags=re.M)
    text = text.replace('"data/raw/default"', f'"{tmp_path / "raw"}"')
    text = text.replace('"data/features/default"', f'"{tmp_path / "store"}"')
    p = tmp_path / "small.toml"
    p.write_text(text)
    return p


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
    cfg = small_toml(tmp_path)
    r = subprocess.run(
        [sys.executable, "-m", "pipelines.generate", "--config", str(cfg), "--no-progress"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "oracle AUC" in r.stdout and "raw log:" in r.stdout
    r = cli("features", "--config", str(cfg), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert f"feature store: {tmp_path / 'store'}" in r.stdout
    assert (tmp_path / "store" / "manifest.json").is_file()
    r = cli("train", "--config", str(cfg), "--no-progress", "--output", str(tmp_path / "model"))
    assert r.returncode == 0, r.stderr
    assert "oracle" in r.stdout and f"model: {tmp_path / 'model'}" in r.stdout
    assert (tmp_path / "model" / "model.safetensors").is_file()
