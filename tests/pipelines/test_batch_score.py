"""Batch scoring on Ray Data: scores equal the in-process model's, row accounting with
rejects, bad input stopped before any work, a run against a registered alias, top-K."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from pipelines.batch_score import run_score
from pipelines.candidates import write_candidates
from recsys_moe.config import ScoringConfig
from recsys_moe.registry import ModelNotFound
from recsys_moe.scorer import RequestError, Scorer

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def model(scoring_model):
    return scoring_model


@pytest.fixture(scope="module")
def candidates(model):
    cfg, _, _, tmp = model
    return write_candidates(cfg.features.store_dir, tmp / "cands", 30_000, null_fraction=0.01,
                            part_rows=10_000)  # fmt: skip


def test_scores_equal_in_process_model_and_rows_add_up(model, candidates, tmp_path):
    cfg, bundle, _, _ = model
    s = run_score(cfg, model=str(bundle), input_path=candidates, output=tmp_path / "out",
                  progress=False)  # fmt: skip
    inp = pl.read_parquet(candidates)
    assert s["rows_in"] == inp.height == 30_000
    assert s["rows_rejected"] == inp["user_id"].null_count() > 0
    assert s["rows_out"] + s["rows_rejected"] == s["rows_in"]

    out = pl.read_parquet(tmp_path / "out" / "scores")
    assert out.height == s["rows_out"]
    for col in ("score_click", "score_like", "score_conversion", "score", "segment",
                "cold_user", "cold_item", "model_version", "hour", "device", "ts"):  # fmt: skip
        assert col in out.columns, col
    assert set(out["model_version"].unique()) == {"local"}
    assert out["cold_user"].sum() == s["rows_cold_user"] > 0
    # the same rows through the in-process scorer
    scorer = Scorer.from_dir(bundle)
    key = ["user_id", "item_id", "domain", "hour", "device"]
    out = out.sort(key)
    ref = scorer.score_frame(out.select(inp.columns), ScoringConfig())
    np.testing.assert_allclose(
        out.select(ref.columns[:3]).to_numpy(), ref.select(ref.columns[:3]).to_numpy(), rtol=1e-5,
        atol=1e-6,
    )  # fmt: skip
    np.testing.assert_allclose(out["score"].to_numpy(), ref["score"].to_numpy(), rtol=1e-5)
    assert (out["segment"] == ref["segment"]).all()

    rejects = pl.read_parquet(tmp_path / "out" / "rejects")
    assert rejects.height == s["rows_rejected"]
    assert set(rejects["reject_reason"].unique()) == {"null user_id"}
    assert rejects.drop("reject_reason").columns == inp.columns
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["rows_out"] == s["rows_out"]


def test_registered_alias_and_top_k(model, candidates, tmp_path, monkeypatch):
    cfg, _, uri, _ = model
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    s = run_score(cfg, model="models:/recsys_moe_default@champion", input_path=candidates,
                  output=tmp_path / "out", top_k=3, progress=False)  # fmt: skip
    assert s["model_version"] == "1"
    out = pl.read_parquet(tmp_path / "out" / "scores")
    assert set(out["model_version"].unique()) == {"1"}
    top = pl.read_parquet(tmp_path / "out" / "top_k.parquet")
    per_user = top.group_by("user_id").agg(pl.len(), pl.col("score").is_sorted(descending=True))
    assert per_user["len"].max() <= 3 and per_user["score"].all()
    best = out.group_by("user_id").agg(pl.col("score").max()).sort("user_id")
    first = top.filter(pl.col("rank") == 1).sort("user_id")
    np.testing.assert_allclose(first["score"].to_numpy(), best["score"].to_numpy())


def test_bad_input_fails_before_any_work(model, tmp_path):
    cfg, bundle, uri, _ = model
    pl.DataFrame({"user_id": [1], "domain": ["feed"]}).write_parquet(tmp_path / "missing.parquet")
    with pytest.raises(RequestError, match="item_id"):
        run_score(cfg, model=str(bundle), input_path=tmp_path / "missing.parquet",
                  output=tmp_path / "o1", progress=False)  # fmt: skip
    pl.DataFrame({"user_id": ["a"], "item_id": [1], "domain": ["feed"]}).write_parquet(
        tmp_path / "types.parquet"
    )
    with pytest.raises(RequestError, match="user_id"):
        run_score(cfg, model=str(bundle), input_path=tmp_path / "types.parquet",
                  output=tmp_path / "o2", progress=False)  # fmt: skip
    with pytest.raises(RequestError, match="no such file"):
        run_score(cfg, model=str(bundle), input_path=tmp_path / "nope", output=tmp_path / "o3",
                  progress=False)  # fmt: skip
    with pytest.raises(ModelNotFound, match="no model models:/recsys_moe_default@nope"):
        import os

        os.environ["MLFLOW_TRACKING_URI"] = uri
        try:
            run_score(cfg, model="models:/recsys_moe_default@nope", input_path=tmp_path,
                      output=tmp_path / "o4", progress=False)  # fmt: skip
        finally:
            del os.environ["MLFLOW_TRACKING_URI"]
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
