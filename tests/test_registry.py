"""Promotion compares like with like: the champion is scored on the challenger's own
validation rows by the same code; other data is refused unless forced; a score that is
not available never promotes silently."""

from __future__ import annotations

import json
import shutil

import polars as pl
import pytest

from recsys_moe import registry

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def rows(scoring_model):
    from pipelines.train import challenge_rows

    cfg, bundle, _, _ = scoring_model
    return challenge_rows(bundle, cfg.features.store_dir)


def _challenge(scoring_model, bundle, rows, force=False):
    cfg, _, uri, _ = scoring_model
    return registry.challenge(
        bundle, rows, name=cfg.model_name, alias=cfg.serving.model_alias,
        metric="valid/auc_mean", force=force, uri=uri,
    )  # fmt: skip


def test_the_champion_is_scored_on_the_challengers_rows(scoring_model, rows):
    _, bundle, _, _ = scoring_model
    d = _challenge(scoring_model, bundle, rows)  # the champion's own weights: a tie
    assert not d.promoted
    assert f"on the same {rows.height:,} validation rows" in d.reason and "<=" in d.reason


def test_other_data_is_refused_unless_forced(scoring_model, rows, tmp_path):
    _, bundle, _, _ = scoring_model
    other = tmp_path / "other"
    shutil.copytree(bundle, other)
    meta = json.loads((other / "model.json").read_text())
    meta["manifest"]["keys"]["timestamp"] = "event_time"  # the raw log's columns differ
    (other / "model.json").write_text(json.dumps(meta))
    d = _challenge(scoring_model, other, rows)
    assert not d.promoted and "models other data" in d.reason and "keys" in d.reason
    forced = _challenge(scoring_model, other, rows, force=True)
    assert forced.promoted and "forced" in forced.reason


def test_an_unavailable_score_never_promotes(scoring_model, rows):
    _, bundle, _, _ = scoring_model
    one_class = rows.with_columns(pl.lit(0).alias(c) for c in ("click", "like", "conversion"))
    d = _challenge(scoring_model, bundle, one_class)
    assert not d.promoted and "not available" in d.reason


def test_no_champion_promotes_and_says_so(scoring_model, rows, tmp_path):
    _, bundle, _, _ = scoring_model
    d = registry.challenge(bundle, rows, name="recsys_moe_nobody", alias="champion",
                           metric="valid/auc_mean", uri=f"sqlite:///{tmp_path}/empty.db")  # fmt: skip
    assert d.promoted and "no current champion" in d.reason


def test_a_registered_model_loads_without_unpickling(scoring_model, tmp_path):
    """models:/name@champion loads in a fresh process with every pickle loader disabled."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    cfg, _, uri, _ = scoring_model
    code = f"""
import pickle, cloudpickle
def refuse(*a, **k):
    raise AssertionError("a pickle was read")
pickle.load = pickle.loads = cloudpickle.load = cloudpickle.loads = refuse
import mlflow, polars as pl
mlflow.set_tracking_uri({uri!r})
model = mlflow.pyfunc.load_model("models:/{cfg.model_name}@champion")
rows = pl.DataFrame({{"user_id": [1, 2], "item_id": [3, 4], "domain": ["feed", "video"]}})
print(model.predict(rows.to_pandas()).shape)
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(2, 3)" in done.stdout
