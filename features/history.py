"""History features: per user / item (and per domain) activity counts, smoothed label
rates and recency. Pure Polars functions, no Ray.

Two ways to get the same aggregate columns (``_agg_<grain>_n``, ``_agg_<grain>_s_<task>``,
``_agg_<grain>_last``):

- :func:`add_prior_aggregates` for training examples: point in time, using only events
  *strictly before* the example's timestamp (events at the same second are excluded, so
  there is no label leakage). Exact for a frame that holds every event of each key, which
  is why the pipeline partitions by key before calling it.
- :func:`snapshot_aggregates` for the online lookup tables: everything in the log, one row
  per key; partial results of several blocks merge exactly with :func:`merge_snapshots`.

:func:`derive_history` turns aggregates and a timestamp into the model's features; serving
calls it with the request time, so training and serving share one formula.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl

from features.spec import AGG, GRAINS, MAX_RECENCY_DAYS, SEGMENT, FeatureSpec


def _sum_dtype(kind: str) -> pl.DataType:
    # integer sums of 0/1 labels are exact whatever the order of summation
    return pl.Int64 if kind == "binary" else pl.Float64


def add_prior_aggregates(df: pl.DataFrame, spec: FeatureSpec, grain: str) -> pl.DataFrame:
    """Add ``grain``'s aggregates over events strictly before each row's timestamp.

    Args:
        df: interactions holding *all* events of every key it contains.
    Returns:
        ``df`` with ``spec.agg_cols(grain)`` added (count 0 and null last-seen for a first event).
    """
    keys = spec.grain_keys(grain)
    ts = spec.timestamp
    n, *sums, last = spec.agg_cols(grain)
    per_ts = (
        df.group_by([*keys, ts])
        .agg(
            pl.len().cast(pl.Int64).alias("_n"),
            *(
                pl.col(t).cast(_sum_dtype(k)).sum().alias(f"_s{i}")
                for i, (t, k) in enumerate(zip(spec.tasks, spec.task_kinds, strict=True))
            ),
        )
        .sort([*keys, ts])
    )
    per_ts = per_ts.select(
        *keys,
        ts,
        (pl.col("_n").cum_sum().over(keys) - pl.col("_n")).alias(n),
        *(
            (pl.col(f"_s{i}").cum_sum().over(keys) - pl.col(f"_s{i}")).alias(s)
            for i, s in enumerate(sums)
        ),
        pl.col(ts).shift(1).over(keys).alias(last),
    )
    return df.join(per_ts, on=[*keys, ts], how="left", maintain_order="left")


def snapshot_aggregates(df: pl.DataFrame, spec: FeatureSpec, grain: str) -> pl.DataFrame:
    """One row per key of ``grain`` with count, label sums and last timestamp over ``df``."""
    keys = spec.grain_keys(grain)
    n, *sums, last = spec.agg_cols(grain)
    return df.group_by(keys).agg(
        pl.len().cast(pl.Int64).alias(n),
        *(
            pl.col(t).cast(_sum_dtype(k)).sum().alias(s)
            for t, k, s in zip(spec.tasks, spec.task_kinds, sums, strict=True)
        ),
        pl.col(spec.timestamp).max().alias(last),
    )


def merge_snapshots(parts: list[pl.DataFrame], spec: FeatureSpec, grain: str) -> pl.DataFrame:
    """Merge per-block :func:`snapshot_aggregates` results into exact global ones."""
    keys = spec.grain_keys(grain)
    n, *sums, last = spec.agg_cols(grain)
    return (
        pl.concat(parts)
        .group_by(keys)
        .agg(pl.col(n).sum(), *(pl.col(s).sum() for s in sums), pl.col(last).max())
        .sort(keys)
    )


def segment_expr(count: pl.Expr, spec: FeatureSpec) -> pl.Expr:
    """cold / casual / power from the number of events seen so far."""
    return (
        pl.when(count >= spec.power_min)
        .then(pl.lit("power"))
        .when(count >= spec.casual_min)
        .then(pl.lit("casual"))
        .otherwise(pl.lit("cold"))
    )


def grain_features(spec: FeatureSpec, grain: str) -> list[pl.Expr]:
    """The time-independent history features of one grain: log count and one smoothed
    label rate per task, from that grain's aggregate columns (nulls = never seen)."""
    m = spec.smoothing_strength
    n, *sums, _last = spec.agg_cols(grain)
    count = pl.col(n).fill_null(0)
    out = [count.cast(pl.Float64).log1p().cast(pl.Float32).alias(f"hist_{grain}_cnt")]
    for t, s in zip(spec.tasks, sums, strict=True):
        prior = spec.priors[t]
        rate = (pl.col(s).fill_null(0).cast(pl.Float64) + prior * m) / (count + m)
        if m == 0:
            rate = pl.when(count > 0).then(rate).otherwise(pl.lit(prior))
        out.append(rate.cast(pl.Float32).alias(f"hist_{grain}_rate_{t}"))
    return out


def recency(now: pl.Expr, last: pl.Expr) -> pl.Expr:
    """log1p of the days since ``last`` (clipped to [0, MAX_RECENCY_DAYS]; never seen =
    the maximum), as float32. :func:`recency_values` is the same formula on numbers."""
    days = ((now - last).cast(pl.Float64) / 86400.0).clip(0.0, MAX_RECENCY_DAYS)
    return days.fill_null(MAX_RECENCY_DAYS).log1p().cast(pl.Float32)


def recency_values(now: int, last: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """:func:`recency` for one request time over int64 last-seen times (``seen`` False =
    never seen), bit-identical to it: float64 arithmetic and the C library's log1p
    (``math.log1p``, the function Polars calls), then float32."""
    days = np.clip((now - last).astype(np.float64) / 86400.0, 0.0, MAX_RECENCY_DAYS)
    days = np.where(seen, days, MAX_RECENCY_DAYS)
    return np.array([math.log1p(d) for d in days.tolist()], dtype=np.float64).astype(np.float32)


def derive_history(df: pl.DataFrame, spec: FeatureSpec, now: pl.Expr | None = None) -> pl.DataFrame:
    """Turn aggregate columns into features and drop the aggregates.

    Args:
        df: a frame with ``spec.agg_cols(g)`` for every grain (nulls = never seen).
        now: the time to measure recency from; defaults to the row's own timestamp.
    Returns:
        ``df`` with ``spec.history_numeric`` (float32) and ``user_segment`` added.
    """
    now = pl.col(spec.timestamp) if now is None else now
    exprs: list[pl.Expr] = [e for grain in GRAINS for e in grain_features(spec, grain)]
    for who in ("user", "item"):
        exprs.append(recency(now, pl.col(f"{AGG}{who}_last")).alias(f"hist_{who}_recency"))
    exprs.append(segment_expr(pl.col(f"{AGG}user_n").fill_null(0), spec).alias(SEGMENT))
    agg_cols = [c for g in GRAINS for c in spec.agg_cols(g)]
    return df.with_columns(exprs).drop(agg_cols)
