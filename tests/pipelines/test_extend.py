"""``recsys-moe extend`` end to end on a registered STAR model: a new domain ("live", the
small log's video events under a new name) is added from its own raw log; existing
domains' scores stay bit-identical through the bundles, the new version is registered with
its lineage and promoted only through the gates; bad inputs are refused before any work."""

from __future__ import annotations

import shutil

import polars as pl
import pytest

from recsys_moe.config import ExtendConfig
from tests.conftest import live_log, register_bundle

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def extended(scoring_model, tmp_path_factory):
    import os

    from pipelines.extend import run_extend

    cfg, bundle, _, _ = scoring_model
    tmp = tmp_path_factory.mktemp("extend")
    uri = f"sqlite:///{tmp}/mlflow.db"
    parent = register_bundle(cfg, bundle, uri, 0.6, "parent")
    assert parent["promoted"]
    data = live_log(cfg, tmp / "live")
    ecfg = cfg.replace(
        extend=ExtendConfig(epochs=4, batch_size=256, lr=0.01, min_auc=0.5, probe_rows=300)
    )
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        s = run_extend(ecfg, model=f"models:/{parent['name']}@champion", domain="live",
                       data_dir=data, output=tmp / "child", progress=False)  # fmt: skip
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    return s, cfg, bundle, uri, data, tmp


def test_existing_domains_unchanged_and_new_domain_learned(extended):
    s, *_ = extended
    assert s["changed_parent_tensors"] == []
    assert s["probe_rows"] >= 300 and s["existing_max_abs_diff"] == 0.0
    assert s["gates"]["existing_unchanged"]
    assert s["rows"]["train"] > 0 and s["rows"]["valid"] > 0
    # far fewer parameters trained than the model holds
    assert 0 < s["trainable_params"] < s["total_params"] / 3
    # training learned the new domain's rows: a later epoch's mean loss is below the
    # first's (at lr 0.01 on this tiny log it can rise again after its low); whether an
    # epoch beats the start (the parent's unknown-domain model exactly:
    # tests/model/test_grow.py) on ~500 validation rows of this tiny log is not certain
    # (in one suite order none did), nor whether it beats the parent's own scores: the
    # kept state and the gate must only agree with what happened
    losses = [h["train/loss"] for h in s["history"]]
    assert min(losses[1:]) < losses[0], losses
    if s["best_epoch"] >= 0:
        assert s["valid"]["auc_mean"] > s["valid_at_start"]
    else:
        assert s["valid"]["auc_mean"] == pytest.approx(s["valid_at_start"], abs=1e-9)
    beats = s["best_epoch"] >= 0 and s["valid"]["auc_mean"] > s["parent_valid"]["auc_mean"]
    assert s["gates"]["beats_parent"] == beats
    assert s["promoted"] == all(s["gates"].values())


def test_child_bundle_scores_the_new_domain_and_old_ones_as_the_parent(extended):
    from recsys_moe.scorer import Scorer

    s, _cfg, bundle, *_ = extended
    parent, child = Scorer.from_dir(bundle), Scorer.from_dir(s["bundle"])
    assert child.model.spec.domains == [*parent.model.spec.domains, "live"]
    users = parent.tables["users"]["user_id"].head(20).to_list()
    items = parent.tables["items"]["item_id"].head(20).to_list()
    rows = pl.DataFrame({"user_id": users, "item_id": items, "domain": ["feed"] * 10 + ["search"] * 10,
                         "ts": [1_700_000_000] * 20})  # fmt: skip
    assert (child.score(rows) == parent.score(rows)).all()
    live = rows.with_columns(pl.lit("live").alias("domain"))
    assert not (child.score(live) == parent.score(live)).all()
    assert child.domain_index("live") == len(parent.model.spec.domains) + 1


def test_lineage_and_promotion_in_mlflow(extended):
    import mlflow

    s, _cfg, _bundle, uri, *_ = extended
    client = mlflow.MlflowClient(uri)
    r = s["registry"]
    assert r["version"] == 2 and r["promoted"] == all(s["gates"].values())
    mv = client.get_model_version(r["name"], "2")
    assert mv.tags["parent.version"] == "1" and mv.tags["extend.domain"] == "live"
    parent_run = client.get_model_version(r["name"], "1").run_id
    run = client.get_run(r["run_id"])
    assert run.data.tags["mlflow.parentRunId"] == parent_run
    assert run.data.tags["parent.run_id"] == parent_run
    assert "valid/auc_mean" in run.data.metrics and "existing_max_abs_diff" in run.data.metrics
    champ = client.get_model_version_by_alias(r["name"], "champion")
    assert str(champ.version) == ("2" if r["promoted"] else "1")


def test_bad_inputs_are_refused_before_any_work(extended, tmp_path):
    from pipelines.extend import ExtendError, extension_data
    from recsys_moe.data.schema import RawLogError
    from recsys_moe.scorer import Scorer

    _s, cfg, bundle, _uri, data, _ = extended
    parent = Scorer.from_dir(bundle)
    with pytest.raises(ExtendError, match="already in the model"):
        extension_data(parent, data, "feed", cfg.extend)
    with pytest.raises(ExtendError, match="no interactions of domain 'radio'"):
        extension_data(parent, data, "radio", cfg.extend)
    broken = tmp_path / "broken"
    shutil.copytree(data, broken)
    inter = pl.read_parquet(broken / "interactions").drop("item_id")
    inter.write_parquet(broken / "interactions" / "part-0.parquet")
    with pytest.raises(RawLogError, match="item_id"):
        extension_data(parent, broken, "live", cfg.extend)


def test_add_experts_to_an_existing_domain(extended, tmp_path):
    """``extend --add-experts 2 --domain search``: the parent's own feature store trains two
    new experts and the domain's gates; every other domain scores bit-identically through
    the bundles; a version with its lineage is registered and promoted only if search's
    validation AUC beats the parent's on the same rows."""
    import os

    import mlflow

    from pipelines.extend import ExtendError, run_extend
    from recsys_moe.scorer import Scorer

    s_new, cfg, bundle, uri, _data, _ = extended
    name = s_new["registry"]["name"]
    ecfg = cfg.replace(
        extend=ExtendConfig(epochs=3, batch_size=256, lr=0.01, min_auc=0.5, probe_rows=300)
    )
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        s = run_extend(ecfg, model=f"models:/{name}/1", domain="search", add_experts=2,
                       output=tmp_path / "grown", progress=False)  # fmt: skip
        with pytest.raises(ExtendError, match="not in the model"):
            run_extend(ecfg, model=f"models:/{name}/1", domain="radio", add_experts=1,
                       register=False, progress=False)  # fmt: skip
        with pytest.raises(ExtendError, match="not a feature store"):
            run_extend(ecfg, model=f"models:/{name}/1", domain="search", add_experts=1,
                       store=tmp_path, register=False, progress=False)  # fmt: skip
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    assert s["kind"] == "add_experts" and s["added_experts"] == 2
    assert s["changed_parent_tensors"] == [] and s["existing_max_abs_diff"] == 0.0
    assert s["probe_rows"] >= 300 and s["gates"]["existing_unchanged"]
    assert 0 < s["trainable_params"] < s["total_params"] / 3
    assert s["rows"]["train"] > 1000
    # starts exactly at the parent's scores for search (same rows), then learns
    assert s["valid_at_start"] == pytest.approx(s["parent_valid"]["auc_mean"], abs=1e-6)
    trained = s["best_epoch"] >= 0  # -1: no epoch beat the start, which is kept
    assert s["gates"]["beats_parent"] == (
        trained and s["valid"]["auc_mean"] > s["parent_valid"]["auc_mean"]
    )
    assert s["promoted"] == all(s["gates"].values())
    parent, child = Scorer.from_dir(bundle), Scorer.from_dir(s["bundle"])
    ext = child.model.extension_specs[-1]
    assert (
        ext.grows
        and ext.domain == "search"
        and child.model.spec.domains == parent.model.spec.domains
    )
    users = parent.tables["users"]["user_id"].head(30).to_list()
    items = parent.tables["items"]["item_id"].head(30).to_list()
    rows = pl.DataFrame({"user_id": users, "item_id": items,
                         "domain": ["feed"] * 10 + ["video"] * 10 + ["search"] * 10,
                         "ts": [1_700_000_000] * 30})  # fmt: skip
    same = (child.score(rows) == parent.score(rows)).all(axis=1)
    assert same[:20].all() and not same[20:].all()
    client = mlflow.MlflowClient(uri)
    mv = client.get_model_version(name, str(s["registry"]["version"]))
    assert mv.tags["extend.kind"] == "add_experts" and mv.tags["parent.version"] == "1"
    run = client.get_run(s["registry"]["run_id"])
    assert run.data.params["extend.added_experts"] == "2"
    assert run.data.tags["mlflow.parentRunId"] == client.get_model_version(name, "1").run_id
