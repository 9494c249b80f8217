from __future__ import annotations

import numpy as np
import polars as pl
from sklearn.metrics import roc_auc_score

from recsys_moe.config import SyntheticConfig
from recsys_moe.data.synthetic import TASKS, generate


def read(out):
    inter = pl.read_parquet(str(out / "interactions" / "*.parquet"))
    truth = pl.read_parquet(str(out / "truth" / "*.parquet"))
    return inter, truth


def test_deterministic_and_seeded(tmp_path):
    cfg = SyntheticConfig(n_rows=9_000, n_users=500, n_items=200, chunk_rows=4_000)
    generate(cfg, tmp_path / "a", progress=False)
    generate(cfg, tmp_path / "b", progress=False)
    generate(SyntheticConfig(**{**cfg.__dict__, "seed": 8}), tmp_path / "c", progress=False)
    a, b, c = read(tmp_path / "a")[0], read(tmp_path / "b")[0], read(tmp_path / "c")[0]
    assert a.equals(b)
    assert not a.equals(c)
    for t in ("users", "items"):
        assert pl.read_parquet(tmp_path / "a" / f"{t}.parquet").equals(
            pl.read_parquet(tmp_path / "b" / f"{t}.parquet")
        )


def test_streams_in_bounded_chunks(tmp_path):
    cfg = SyntheticConfig(n_rows=10_001, n_users=300, n_items=100, chunk_rows=2_500)
    generate(cfg, tmp_path, progress=False)
    parts = sorted((tmp_path / "interactions").glob("*.parquet"))
    sizes = [pl.read_parquet(p).height for p in parts]
    assert len(parts) == 5 and max(sizes) <= 2_500 and sum(sizes) == 10_001
    inter = read(tmp_path)[0]
    assert inter["ts"].is_sorted() and inter["event_id"].to_list() == list(range(10_001))


def test_structure_and_oracle_auc(small_log):
    cfg, meta = small_log
    from pathlib import Path

    inter, truth = read(Path(cfg.data.raw_dir))
    df = inter.join(truth.drop("domain"), on="event_id")
    # funnel: conversion implies click
    assert (df.filter(pl.col("conversion") == 1)["click"] == 1).all()
    # Zipf popularity: the top 5% of items take a large share of impressions
    counts = np.sort(df["item_id"].value_counts()["count"].to_numpy())[::-1]
    assert counts[: max(1, len(counts) // 20)].sum() / counts.sum() > 0.3
    # heavy-tailed user activity
    u = df["user_id"].value_counts()["count"].to_numpy()
    assert u.max() > 8 * np.median(u)
    # the streamed (binned) oracle AUC equals the exact AUC of the stored probabilities
    for task in TASKS:
        for dom in cfg.synthetic.domains:
            sub = df.filter(pl.col("domain") == dom)
            exact = roc_auc_score(sub[task].to_numpy(), sub[f"p_{task}"].to_numpy())
            assert abs(exact - meta["oracle_auc"][task][dom]) < 2e-3
            assert 0.6 < exact < 0.95


def test_task_correlation_differs_by_domain(small_log):
    cfg, _ = small_log
    from pathlib import Path

    _, truth = read(Path(cfg.data.raw_dir))
    corr = {
        dom: np.corrcoef(sub["p_click"].to_numpy(), sub["p_like"].to_numpy())[0, 1]
        for (dom,), sub in truth.group_by("domain")
    }
    assert max(corr.values()) - min(corr.values()) > 0.2, corr


def test_string_ids_and_late_arrivals(tmp_path):
    """string_ids writes "u<n>" / "i<n>" everywhere; with arrival_fraction users and items
    first appear during the log, never before their arrival, and the rest from the start."""
    cfg = SyntheticConfig(n_rows=20_000, n_users=400, n_items=150, chunk_rows=2_000,
                          string_ids=True, arrival_fraction=0.4)  # fmt: skip
    generate(cfg, tmp_path, progress=False)
    inter = read(tmp_path)[0]
    users = pl.read_parquet(tmp_path / "users.parquet")
    assert inter["user_id"].dtype == pl.String and inter["item_id"].dtype == pl.String
    assert users["user_id"].str.starts_with("u").all()
    assert set(inter["user_id"].unique()) <= set(users["user_id"])
    first = inter.group_by("user_id").agg(pl.col("ts").min()).sort("ts")["ts"].to_numpy()
    start, end = inter["ts"].min(), inter["ts"].max()
    # a share of users first shows up in the second half: arrivals, not just inactivity
    assert (first > start + (end - start) / 2).mean() > 0.1
    plain = SyntheticConfig(n_rows=20_000, n_users=400, n_items=150, chunk_rows=2_000)
    generate(plain, tmp_path / "plain", progress=False)
    late = pl.read_parquet(str(tmp_path / "plain" / "interactions" / "*.parquet"))
    first_plain = late.group_by("user_id").agg(pl.col("ts").min())["ts"].to_numpy()
    assert (first_plain > start + (end - start) / 2).mean() < (
        first > start + (end - start) / 2
    ).mean()


def _domain_taste_agreement(cfg: SyntheticConfig) -> float:
    """How alike the same users rank the same items in two domains: the correlation of
    the user-item preference term in domain 0 and domain 1, over users x items."""
    from recsys_moe.data.synthetic import build_world

    world, _, _ = build_world(cfg)
    scores = [(world.user_latent @ world.domain_transform[k].T) @ world.item_latent.T
              for k in (0, 1)]  # fmt: skip
    return float(np.corrcoef(scores[0].ravel(), scores[1].ravel())[0, 1])


def test_domain_divergence_sets_how_far_tastes_differ_between_domains():
    base = SyntheticConfig(n_rows=1_000, n_users=300, n_items=200)
    same = _domain_taste_agreement(SyntheticConfig(**{**base.__dict__, "domain_divergence": 0.0}))
    default = _domain_taste_agreement(base)
    apart = _domain_taste_agreement(SyntheticConfig(**{**base.__dict__, "domain_divergence": 1.5}))
    assert same > 0.999 and same > default + 0.05 > apart + 0.1, (same, default, apart)


def test_drift_moves_items_up_and_down_across_the_log(tmp_path):
    """With drift, items whose trend is up gain impressions and click probability from the
    log's first fifth to its last; without it, the same items do neither."""
    from recsys_moe.data.synthetic import build_world

    base = dict(n_rows=60_000, n_users=800, n_items=300, chunk_rows=5_000)
    gains = {}
    for drift in (0.0, 2.0):
        cfg = SyntheticConfig(**base, drift=drift)
        generate(cfg, tmp_path / str(drift), progress=False)
        inter, truth = read(tmp_path / str(drift))
        df = inter.join(truth.drop("domain"), on="event_id")
        trend = build_world(cfg)[0].item_trend
        rising = np.flatnonzero(trend > 1.0).tolist()
        fifth = len(df) // 5
        first, last = df.head(fifth), df.tail(fifth)
        share = [f["item_id"].is_in(rising).mean() for f in (first, last)]
        p = [f.filter(pl.col("item_id").is_in(rising))["p_click"].mean() for f in (first, last)]
        gains[drift] = (share[1] / share[0], p[1] / p[0])
    assert 0.9 < gains[0.0][0] < 1.1 and 0.9 < gains[0.0][1] < 1.1, gains
    assert gains[2.0][0] > 1.5 and gains[2.0][1] > 1.2, gains
