from __future__ import annotations

import math

import numpy as np
import pytest

from recsys_moe import metrics as M


def test_binary_metrics_hand_computed():
    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8])
    m = M.binary_metrics(y, p)
    assert m["auc"] == pytest.approx(0.75)  # 3 of 4 (pos, neg) pairs ordered correctly
    ll = -(math.log(0.9) + math.log(0.6) + math.log(0.35) + math.log(0.8)) / 4
    assert m["logloss"] == pytest.approx(ll)
    assert m["calibration"] == pytest.approx(np.mean(p) / 0.5)
    # ECE, 10 bins: bins 1 (0.1), 4 (0.4), 3 (0.35), 8 (0.8): |0-.1|+|0-.4|+|1-.35|+|1-.8| over 4
    assert m["ece"] == pytest.approx((0.1 + 0.4 + 0.65 + 0.2) / 4)


def test_single_class_has_no_auc():
    m = M.binary_metrics(np.array([1, 1]), np.array([0.3, 0.6]))
    assert "auc" not in m and "logloss" in m


def test_regression_and_grouped_auc():
    assert M.regression_metrics(np.array([1.0, 3.0]), np.array([2.0, 3.0]))[
        "rmse"
    ] == pytest.approx(math.sqrt(0.5))
    y = np.array([0, 1, 0, 1, 1, 1])
    p = np.array([0.2, 0.8, 0.9, 0.1, 0.5, 0.6])
    g = np.array([1, 1, 2, 2, 3, 3])  # user 3 has one class only: ignored
    assert M.grouped_auc(y, p, g) == pytest.approx((1.0 * 2 + 0.0 * 2) / 4)


def test_evaluate_keys_per_task_and_domain():
    rng = np.random.default_rng(0)
    n = 500
    labels = rng.integers(0, 2, (n, 2)).astype(float)
    preds = rng.random((n, 2))
    dom = rng.integers(1, 3, n)
    out = M.evaluate(labels, preds, dom, [("click", "binary"), ("watch", "regression")], ["a", "b"])
    assert {
        "click/a/auc",
        "click/b/auc",
        "click/all/auc",
        "watch/a/rmse",
        "auc_mean",
        "auc_worst_domain",
    } <= set(out)
    assert out["auc_worst_domain"] == min(out["click/a/auc"], out["click/b/auc"])
