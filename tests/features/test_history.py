"""No label leakage: a feature of an example sees only events strictly before it."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from features.examples import Boundaries, item_stage, prepare, user_stage
from features.spec import FeatureSpec
from recsys_moe.config import config_from_dict


@pytest.fixture(scope="module")
def frame():
    """A log with many events per key and deliberate timestamp ties."""
    rng = np.random.default_rng(0)
    n = 3_000
    inter = pl.DataFrame(
        {
            "user_id": rng.integers(0, 40, n),
            "item_id": rng.integers(0, 25, n),
            "domain": rng.choice(["a", "b"], n),
            "ts": np.sort(rng.integers(0, 600, n)),  # ~5 events per second: many ties
            "click": rng.integers(0, 2, n),
            "buy": rng.integers(0, 2, n),
        }
    ).with_row_index("eid")
    cfg = config_from_dict(
        {
            "data": {"tasks": [{"name": "click"}, {"name": "buy"}], "passthrough": ["eid"]},
            "features": {"smoothing_strength": 5.0},
        }
    )
    spec = FeatureSpec.from_config(cfg.data, cfg.features).with_priors({"click": 0.5, "buy": 0.5})
    return inter, spec


def features(inter, spec):
    schema = dict(inter.schema)
    users = pl.DataFrame({"user_id": list(range(40))})
    items = pl.DataFrame({"item_id": list(range(25))})
    df = prepare(inter, spec, schema, Boundaries(400, 500))
    return item_stage(user_stage(df, users, spec), items, spec).sort("eid")


def test_point_in_time_brute_force(frame):
    inter, spec = frame
    feats = features(inter, spec)
    rng = np.random.default_rng(1)
    for eid in rng.choice(inter.height, 60, replace=False):
        row = inter.row(int(eid), named=True)
        past = inter.filter(pl.col("ts") < row["ts"])
        up = past.filter(pl.col("user_id") == row["user_id"])
        udp = up.filter(pl.col("domain") == row["domain"])
        ip = past.filter(pl.col("item_id") == row["item_id"])
        got = feats.row(int(eid), named=True)
        assert got["hist_user_cnt"] == pytest.approx(math.log1p(up.height), rel=1e-6)
        assert got["hist_userdom_cnt"] == pytest.approx(math.log1p(udp.height), rel=1e-6)
        assert got["hist_item_cnt"] == pytest.approx(math.log1p(ip.height), rel=1e-6)
        exp = (up["click"].sum() + 0.5 * 5.0) / (up.height + 5.0)
        assert got["hist_user_rate_click"] == pytest.approx(exp, rel=1e-6)
        exp = (ip["buy"].sum() + 0.5 * 5.0) / (ip.height + 5.0)
        assert got["hist_item_rate_buy"] == pytest.approx(exp, rel=1e-6)
        if up.height:
            gap = (row["ts"] - up["ts"].max()) / 86400.0
            assert got["hist_user_recency"] == pytest.approx(math.log1p(gap), rel=1e-5)
        seg = (
            "power"
            if up.height >= spec.power_min
            else "casual"
            if up.height >= spec.casual_min
            else "cold"
        )
        assert got["user_segment"] == seg


def test_future_labels_do_not_change_past_features(frame):
    inter, spec = frame
    cut = 300
    flipped = inter.with_columns(
        [
            pl.when(pl.col("ts") >= cut).then(1 - pl.col(t)).otherwise(pl.col(t)).alias(t)
            for t in ("click", "buy")
        ]
    )
    a = features(inter, spec).filter(pl.col("ts") < cut)
    b = features(flipped, spec).filter(pl.col("ts") < cut)
    hist = [c for c in a.columns if c.startswith("hist_")]
    assert a.select(hist).equals(b.select(hist))
    # ...and same-second events are excluded: flipping labels at exactly `cut` leaves rows at `cut` unchanged
    at = features(inter, spec).filter(pl.col("ts") == cut).select(hist)
    at_flipped = features(flipped, spec).filter(pl.col("ts") == cut).select(hist)
    assert at.equals(at_flipped)
    # while later rows do see the flipped labels (the check above can fail)
    later = features(inter, spec).filter(pl.col("ts") > cut + 50).select("hist_user_rate_click")
    later_flipped = (
        features(flipped, spec).filter(pl.col("ts") > cut + 50).select("hist_user_rate_click")
    )
    assert not later.equals(later_flipped)
