"""Training examples: the per-partition stages, global statistics and encoding.

The distributed pipeline (``pipelines/build_features``) and the single-process
reference (:func:`build_examples_reference`) call the same functions; only the
partitioning differs. Every function here is a pure Polars transform.

Stages, in order:
  1. :func:`prepare` (any block): canonical dtypes, epoch-second timestamps, list columns,
     the split column. Bad rows are removed beforehand (they are counted and written
     to ``rejects/`` by the pipeline).
  2. :func:`user_stage` (a partition holding every event of its users): user and
     user x domain point-in-time aggregates, user attributes.
  3. :func:`item_stage` (a partition holding every event of its items): item and
     item x domain aggregates, item attributes, then the derived history features.
  4. global statistics over the training window: :func:`vocab_counts` /
     :func:`merge_vocabs` and :func:`numeric_moments` / :func:`merge_moments`.
  5. :func:`encode`: vocabulary indices and mean-filled floats under the store's names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import polars as pl

from features.history import add_prior_aggregates, derive_history
from features.spec import CAT, LABEL, NUM, SPLIT, FeatureSpec


@dataclass(frozen=True)
class Boundaries:
    """Time split: train ts < valid_start <= valid ts < test_start <= test ts. With
    ``since`` (a store of the newest window, ``features.window_days``), rows before it
    are ``context``: they feed the point-in-time history features and the lookup tables,
    never an example, a vocabulary or a statistic."""

    valid_start: int
    test_start: int
    since: int | None = None


CONTEXT = "context"  # the split of rows before the window (never written as examples)


def split_expr(ts: str, b: Boundaries) -> pl.Expr:
    first = pl.when(pl.col(ts) < b.since).then(pl.lit(CONTEXT)) if b.since is not None else pl
    return (
        first.when(pl.col(ts) < b.valid_start)
        .then(pl.lit("train"))
        .when(pl.col(ts) < b.test_start)
        .then(pl.lit("valid"))
        .otherwise(pl.lit("test"))
    )


def compute_boundaries(
    ts: pl.LazyFrame | pl.DataFrame, col: str, valid_fraction: float, test_fraction: float
) -> Boundaries:
    """Split boundaries at the timestamp quantiles (exact: ``lower`` interpolation);
    ``test_fraction = 0``: no test split (it starts after the last timestamp)."""
    q = ts.select(
        pl.col(col).quantile(1.0 - valid_fraction - test_fraction, "lower").alias("v"),
        pl.col(col).quantile(1.0 - test_fraction, "lower").alias("t"),
        pl.col(col).max().alias("last"),
    )
    row = (q.collect() if isinstance(q, pl.LazyFrame) else q).row(0)
    v, t = int(row[0]), int(row[1])
    if test_fraction == 0:
        t = int(row[2]) + 1
    return Boundaries(valid_start=v, test_start=max(t, v + 1))


def to_list_column(col: str, sep: str, dtype: pl.DataType) -> pl.Expr:
    """A multi-valued categorical as a list column (strings are split on ``sep``)."""
    if isinstance(dtype, pl.List):
        return pl.col(col)
    return (
        pl.col(col)
        .cast(pl.String)
        .str.split(sep)
        .list.eval(pl.element().filter(pl.element() != ""))
        .alias(col)
    )


def timestamp_seconds(col: str, dtype: pl.DataType) -> pl.Expr:
    """Timestamps as int64 epoch seconds, whatever the stored type (int, float, datetime, date)."""
    if dtype == pl.Date:
        return pl.col(col).cast(pl.Datetime("ms")).dt.epoch("s")
    if isinstance(dtype, pl.Datetime):
        return pl.col(col).dt.epoch("s")
    return pl.col(col).cast(pl.Int64)


def prepare(
    df: pl.DataFrame, spec: FeatureSpec, schema: dict[str, pl.DataType], b: Boundaries
) -> pl.DataFrame:
    """Canonical dtypes, int64 epoch-second timestamps, list columns and the split column."""
    df = df.select([pl.col(c).cast(schema[c]) for c in schema if c in df.columns])
    df = df.with_columns(
        timestamp_seconds(spec.timestamp, schema[spec.timestamp]).alias(spec.timestamp)
    )
    multi = [c for c in spec.context_categorical if c in spec.multi_valued]
    if multi:
        df = df.with_columns([to_list_column(c, spec.list_separator, df.schema[c]) for c in multi])
    return df.with_columns(split_expr(spec.timestamp, b).alias(SPLIT))


def prepare_attributes(
    df: pl.DataFrame,
    spec: FeatureSpec,
    key: str,
    cat: list[str],
    num: list[str],
    key_dtype: pl.DataType,
) -> pl.DataFrame:
    """A users / items table reduced to its declared columns, ids in the interactions' dtype."""
    df = df.select(pl.col(key).cast(key_dtype), *cat, *(pl.col(c).cast(pl.Float64) for c in num))
    multi = [c for c in cat if c in spec.multi_valued]
    if multi:
        df = df.with_columns([to_list_column(c, spec.list_separator, df.schema[c]) for c in multi])
    return df


def user_stage(df: pl.DataFrame, users: pl.DataFrame, spec: FeatureSpec) -> pl.DataFrame:
    """Stage 2: needs every event of each user in ``df``."""
    if spec.history_features:
        df = add_prior_aggregates(df, spec, "user")
        df = add_prior_aggregates(df, spec, "userdom")
    return df.join(users, on=spec.user_id, how="left", maintain_order="left")


def item_stage(df: pl.DataFrame, items: pl.DataFrame, spec: FeatureSpec) -> pl.DataFrame:
    """Stage 3: needs every event of each item in ``df``; ends with the derived features."""
    if spec.history_features:
        df = add_prior_aggregates(df, spec, "item")
        df = add_prior_aggregates(df, spec, "itemdom")
    df = df.join(items, on=spec.item_id, how="left", maintain_order="left")
    return derive_history(df, spec) if spec.history_features else df


# ------------------------------------------------------------ global statistics


def vocab_counts(df: pl.DataFrame, spec: FeatureSpec) -> dict[str, pl.DataFrame]:
    """Per categorical feature, value counts over the training rows of ``df`` (nulls excluded)."""
    train = df.filter(pl.col(SPLIT) == "train")
    out = {}
    for f in spec.categorical:
        col = train.get_column(f)
        if isinstance(col.dtype, pl.List):
            col = col.explode()
        out[f] = col.drop_nulls().value_counts(name="count").rename({f: "value"})
    return out


def merge_vocabs(
    parts: list[dict[str, pl.DataFrame]], spec: FeatureSpec, min_count: int, max_vocab: int
) -> dict[str, pl.DataFrame]:
    """Exact global vocabularies: index 0 is out-of-vocabulary; 1.. by count desc, value asc."""
    vocabs = {}
    for f in spec.categorical:
        counts = (
            pl.concat([p[f] for p in parts if p[f].height])
            if any(p[f].height for p in parts)
            else parts[0][f]
        )
        v = (
            counts.group_by("value")
            .agg(pl.col("count").sum())
            .filter(pl.col("count") >= min_count)
            .sort(["count", "value"], descending=[True, False])
            .head(max_vocab - 1)
            .with_columns(pl.int_range(1, pl.len() + 1, dtype=pl.Int32).alias("index"))
        )
        vocabs[f] = v
    return vocabs


def numeric_moments(df: pl.DataFrame, spec: FeatureSpec) -> pl.DataFrame:
    """Per numeric feature: count, sum, sum of squares over the training rows (float64)."""
    train = df.filter(pl.col(SPLIT) == "train")
    rows = [
        train.select(
            pl.lit(f).alias("feature"),
            pl.col(f).cast(pl.Float64).count().cast(pl.Int64).alias("n"),
            pl.col(f).cast(pl.Float64).sum().alias("s"),
            (pl.col(f).cast(pl.Float64) ** 2).sum().alias("ss"),
        )
        for f in spec.numeric
    ]
    schema = {"feature": pl.String, "n": pl.Int64, "s": pl.Float64, "ss": pl.Float64}
    return pl.concat(rows) if rows else pl.DataFrame(schema=schema)


def merge_moments(parts: list[pl.DataFrame]) -> dict[str, dict[str, float]]:
    """Normalisation statistics {feature: {mean, std, count}} from per-block moments."""
    m = pl.concat(parts).group_by("feature", maintain_order=True).agg(pl.col("n", "s", "ss").sum())
    stats = {}
    for f, n, s, ss in m.iter_rows():
        mean = s / n if n else 0.0
        var = max(ss / n - mean * mean, 0.0) if n else 0.0
        std = math.sqrt(var)
        stats[f] = {"mean": mean, "std": std if std > 1e-12 else 1.0, "count": int(n)}
    return stats


# ------------------------------------------------------------------ encoding


def encode_categorical(df: pl.DataFrame, f: str, vocab: pl.DataFrame) -> pl.Expr:
    """Vocabulary index of feature ``f`` (0 for unknown / null); lists map element-wise."""
    dtype = df.schema[f]
    if isinstance(dtype, pl.List):
        inner = dtype.inner
        keys = vocab["value"].cast(inner)
        return (
            pl.col(f)
            .list.eval(
                pl.element().replace_strict(keys, vocab["index"], default=0, return_dtype=pl.Int32)
            )
            .fill_null(pl.lit([], dtype=pl.List(pl.Int32)))
            .alias(CAT + f)
        )
    keys = vocab["value"].cast(dtype)
    return (
        pl.col(f)
        .replace_strict(keys, vocab["index"], default=0, return_dtype=pl.Int32)
        .fill_null(0)
        .alias(CAT + f)
    )


def encode(
    df: pl.DataFrame,
    spec: FeatureSpec,
    vocabs: dict[str, pl.DataFrame],
    stats: dict[str, dict[str, float]],
    keep_split: bool = True,
) -> pl.DataFrame:
    """Stage 5: the store's columns (keys, ``cat__*``, ``num__*``, ``label__*``, split, passthrough)."""
    keys = [spec.user_id, spec.item_id, spec.domain, spec.timestamp]
    cats = [encode_categorical(df, f, vocabs[f]) for f in spec.categorical]
    nums = [
        pl.col(f).cast(pl.Float64).fill_null(stats[f]["mean"]).cast(pl.Float32).alias(NUM + f)
        for f in spec.numeric
    ]
    labels = [pl.col(t).cast(pl.Float32).alias(LABEL + t) for t in spec.tasks if t in df.columns]
    extra = [SPLIT] if keep_split and SPLIT in df.columns else []
    passthrough = [c for c in spec.passthrough if c in df.columns]
    return df.select(*keys, *cats, *nums, *labels, *extra, *passthrough)


# ------------------------------------------------------------------ reference


def build_examples_reference(
    interactions: pl.DataFrame,
    users: pl.DataFrame,
    items: pl.DataFrame,
    spec: FeatureSpec,
    schema: dict[str, pl.DataType],
    b: Boundaries,
    min_count: int,
    max_vocab: int,
) -> tuple[pl.DataFrame, dict[str, pl.DataFrame], dict[str, dict[str, float]]]:
    """The whole example pipeline in one process on one frame (bad rows already removed).

    Returns:
        (encoded examples, vocabularies, normalisation stats), which the distributed
        pipeline must reproduce exactly.
    """
    df = prepare(interactions, spec, schema, b)
    df = user_stage(df, users, spec)
    df = item_stage(df, items, spec)
    vocabs = merge_vocabs([vocab_counts(df, spec)], spec, min_count, max_vocab)
    stats = merge_moments([numeric_moments(df, spec)])
    return encode(examples_only(df), spec, vocabs, stats), vocabs, stats


def examples_only(df: pl.DataFrame) -> pl.DataFrame:
    """The rows that are examples: all but a window store's ``context`` rows."""
    return df.filter(pl.col(SPLIT) != CONTEXT)
