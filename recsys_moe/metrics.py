"""Evaluation metrics per task x domain: AUC, logloss, calibration, ECE (binary), RMSE
(regression); overall and grouped (per-user) AUC. AUC and logloss come from scikit-learn.

All functions take numpy arrays and return plain dicts of floats, so training, batch
scoring and MLflow can log them as they are. Keys: ``"<task>/<domain>/<metric>"`` and
``"<task>/all/<metric>"``; a domain where a metric is undefined (one class only) is
omitted rather than reported as a made-up number.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import log_loss, roc_auc_score

EPS = 1e-7


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """ECE with equal-width probability bins: sum_b (n_b / n) |mean(y_b) - mean(p_b)|."""
    idx = np.minimum((p * bins).astype(np.int64), bins - 1)
    n = np.bincount(idx, minlength=bins)
    sy = np.bincount(idx, weights=y, minlength=bins)
    sp = np.bincount(idx, weights=p, minlength=bins)
    nz = n > 0
    return float(np.abs(sy[nz] - sp[nz]).sum() / max(len(y), 1))


def binary_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """AUC (when both classes occur), logloss, calibration (mean p / mean y), ECE, counts."""
    p = np.clip(p.astype(np.float64), EPS, 1 - EPS)
    out = {"n": float(len(y)), "positive_rate": float(y.mean()), "mean_pred": float(p.mean())}
    if len(y) == 0:
        return out
    if 0 < y.sum() < len(y):
        out["auc"] = float(roc_auc_score(y, p))
    out["logloss"] = float(log_loss(y, p, labels=[0, 1]))
    if y.mean() > 0:
        out["calibration"] = float(p.mean() / y.mean())
    out["ece"] = expected_calibration_error(y, p)
    return out


def regression_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    return {
        "n": float(len(y)),
        "rmse": float(math.sqrt(np.mean((p - y) ** 2))) if len(y) else float("nan"),
    }


def grouped_auc(y: np.ndarray, p: np.ndarray, groups: np.ndarray) -> float:
    """Impression-weighted mean of per-group AUC over groups with both classes (GAUC)."""
    # group codes: any id type (ints, strings, ids that look numeric but are strings)
    codes = np.unique(groups, return_inverse=True)[1].ravel()
    order = np.argsort(codes, kind="stable")
    g, y, p = codes[order], y[order], p[order]
    bounds = np.flatnonzero(g[1:] != g[:-1]) + 1
    total, weight = 0.0, 0
    for ys, ps in zip(np.split(y, bounds), np.split(p, bounds), strict=True):
        if 0 < ys.sum() < len(ys):
            total += roc_auc_score(ys, ps) * len(ys)
            weight += len(ys)
    return total / weight if weight else float("nan")


def evaluate(
    labels: np.ndarray,
    preds: np.ndarray,
    domains: np.ndarray,
    tasks: list[tuple[str, str]],
    domain_names: list[str],
    users: np.ndarray | None = None,
) -> dict[str, float]:
    """All metrics per task x domain and overall.

    Args:
        labels, preds: (n, T); domains: (n,) domain index into ``domain_names``
        (index 0 = out of vocabulary, named "oov"); tasks: (name, kind) pairs;
        users: (n,) user keys for grouped AUC, optional.
    Returns:
        {"<task>/<domain>/<metric>": value, ...} plus "auc_mean" (mean over binary tasks of
        the overall AUC) and "auc_worst_domain" (the lowest per-domain AUC of any task).
    """
    names = ["oov", *domain_names]
    out: dict[str, float] = {}
    per_domain_auc = []
    task_auc = []
    for t, (task, kind) in enumerate(tasks):
        y, p = labels[:, t].astype(np.float64), preds[:, t].astype(np.float64)
        fn = binary_metrics if kind == "binary" else regression_metrics
        for k in np.unique(domains):
            sel = domains == k
            for m, v in fn(y[sel], p[sel]).items():
                out[f"{task}/{names[k]}/{m}"] = v
            if f"{task}/{names[k]}/auc" in out:
                per_domain_auc.append(out[f"{task}/{names[k]}/auc"])
        for m, v in fn(y, p).items():
            out[f"{task}/all/{m}"] = v
        if kind == "binary" and f"{task}/all/auc" in out:
            task_auc.append(out[f"{task}/all/auc"])
            if users is not None:
                out[f"{task}/all/gauc"] = grouped_auc(y, p, users)
    if task_auc:
        out["auc_mean"] = float(np.mean(task_auc))
    if per_domain_auc:
        out["auc_worst_domain"] = float(np.min(per_domain_auc))
    return out


def evaluate_slices(
    labels: np.ndarray,
    preds: np.ndarray,
    tasks: list[tuple[str, str]],
    slices: dict[str, np.ndarray],
) -> dict[str, float]:
    """AUC (binary tasks) and row count of each slice of the rows (``slices``: name -> bool
    mask, e.g. cold users, a user segment): ``"<slice>/<task>/auc"``, ``"<slice>/n"``."""
    out: dict[str, float] = {}
    for name, mask in slices.items():
        out[f"{name}/n"] = float(mask.sum())
        for t, (task, kind) in enumerate(tasks):
            y = labels[mask, t]
            if kind == "binary" and 0 < y.sum() < len(y):
                out[f"{name}/{task}/auc"] = float(roc_auc_score(y, preds[mask, t]))
    return out
