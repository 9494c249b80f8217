"""The raw-log contract: find, read and validate ``interactions`` / ``users`` / ``items``.

A raw log is a folder holding, for each table, ``<table>.parquet``, ``<table>.csv`` or a
``<table>/`` folder of Parquet/CSV parts. :func:`validate_raw_log` checks it with lazy
Polars scans (columns only, streaming) before any distributed work starts, and raises a
:class:`RawLogError` that names the file, the column and how many rows are affected.

Row-level problems (null id/domain/timestamp, labels outside {0, 1}) either stop the
run (``on_bad_rows = "error"``) or, with ``on_bad_rows = "reject"``, those rows are
excluded, counted per reason and written to the feature store's ``rejects/`` folder by
the pipeline: nothing is dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from recsys_moe.config import DataConfig

TABLES = ("interactions", "users", "items")
REJECT_REASON = "_reject_reason"


class RawLogError(ValueError):
    """The raw log breaks the contract; the message says which file, column and rows."""


@dataclass
class TableFiles:
    name: str
    paths: list[Path]
    format: str  # "parquet" | "csv"

    @property
    def where(self) -> str:
        return str(self.paths[0]) if len(self.paths) == 1 else f"{self.paths[0].parent}/"


@dataclass
class ValidationReport:
    """What validation found; kept in the feature store's manifest."""

    rows: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    unknown_users: int = 0
    unknown_items: int = 0
    schema: dict[str, str] = field(default_factory=dict)

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    def lines(self) -> list[str]:
        out = [f"{t}: {n:,} rows" for t, n in self.rows.items()]
        for reason, n in self.rejected.items():
            out.append(f"rejected {n:,} interaction rows: {reason}")
        if self.unknown_users:
            out.append(f"{self.unknown_users:,} interactions have a user absent from users (kept, attributes unknown)")
        if self.unknown_items:
            out.append(f"{self.unknown_items:,} interactions have an item absent from items (kept, attributes unknown)")
        return out


def find_table(raw_dir: str | Path, name: str, fmt: str = "auto") -> TableFiles:
    """Locate one table of the raw log.

    Raises:
        RawLogError: no file, or a folder with no Parquet/CSV parts.
    """
    root = Path(raw_dir)
    if not root.is_dir():
        raise RawLogError(f"raw log folder {root} does not exist (run `recsys-moe generate` or set data.raw_dir)")
    fmts = ["parquet", "csv"] if fmt == "auto" else [fmt]
    for f in fmts:
        single = root / f"{name}.{f}"
        if single.is_file():
            return TableFiles(name, [single], f)
    folder = root / name
    if folder.is_dir():
        for f in fmts:
            parts = sorted(p for p in folder.rglob(f"*.{f}") if p.is_file())
            if parts:
                return TableFiles(name, parts, f)
        raise RawLogError(f"{folder}/: no {' or '.join(fmts)} files inside")
    expected = ", ".join([f"{name}.{f}" for f in fmts] + [f"{name}/"])
    raise RawLogError(f"{root}: missing table {name!r} (expected one of {expected})")


def scan_table(tf: TableFiles) -> pl.LazyFrame:
    """A lazy Polars scan of a table (all parts)."""
    if tf.format == "parquet":
        return pl.scan_parquet([str(p) for p in tf.paths])
    return pl.scan_csv([str(p) for p in tf.paths], infer_schema_length=10_000)


def read_table(tf: TableFiles) -> pl.DataFrame:
    return scan_table(tf).collect()


def _is_numeric(dtype: pl.DataType) -> bool:
    return dtype.is_numeric() or dtype == pl.Boolean


def _check_columns(tf: TableFiles, schema: pl.Schema, required: list[str]) -> None:
    missing = [c for c in required if c not in schema]
    if missing:
        raise RawLogError(
            f"{tf.where}: missing column(s) {missing} in table {tf.name!r}; "
            f"it has {list(schema.names())}. Fix the file or the [data] section of the config."
        )


def _check_numeric(tf: TableFiles, schema: pl.Schema, cols: list[str], what: str) -> None:
    for c in cols:
        if not _is_numeric(schema[c]):
            raise RawLogError(
                f"{tf.where}: column {c!r} ({what}) must be numeric, found dtype {schema[c]}"
            )


def bad_row_reason(cfg: DataConfig) -> pl.Expr:
    """Per interaction row: the first contract violation as a string, or null for a good row."""
    checks: list[tuple[pl.Expr, str]] = [
        (pl.col(cfg.user_id).is_null(), f"null {cfg.user_id}"),
        (pl.col(cfg.item_id).is_null(), f"null {cfg.item_id}"),
        (pl.col(cfg.domain).is_null(), f"null {cfg.domain}"),
        (pl.col(cfg.timestamp).is_null(), f"null {cfg.timestamp}"),
    ]
    for t in cfg.tasks:
        checks.append((pl.col(t.name).is_null() | pl.col(t.name).cast(pl.Float64).is_nan(), f"null label {t.name}"))
        if t.kind == "binary":
            checks.append((~pl.col(t.name).cast(pl.Float64).is_in([0.0, 1.0]), f"label {t.name} outside {{0,1}}"))
    expr = pl.lit(None, dtype=pl.String)
    for cond, reason in reversed(checks):
        expr = pl.when(cond).then(pl.lit(reason)).otherwise(expr)
    return expr


def interaction_columns(cfg: DataConfig) -> list[str]:
    return [
        cfg.user_id,
        cfg.item_id,
        cfg.domain,
        cfg.timestamp,
        *cfg.task_names,
        *cfg.context_categorical,
        *cfg.context_numeric,
        *cfg.passthrough,
    ]


def validate_raw_log(cfg: DataConfig) -> tuple[dict[str, TableFiles], ValidationReport]:
    """Check the raw log against the contract before any work is done.

    Returns:
        the located tables and a report (row counts, rejected rows per reason,
        interactions with unknown users / items).

    Raises:
        RawLogError: a missing file or column, a wrong dtype, duplicate ids in users/items,
            an empty log, or (with ``on_bad_rows = "error"``) any bad interaction row.
    """
    tables = {name: find_table(cfg.raw_dir, name, cfg.format) for name in TABLES}
    inter, users, items = tables["interactions"], tables["users"], tables["items"]
    report = ValidationReport()

    lf = scan_table(inter)
    schema = lf.collect_schema()
    _check_columns(inter, schema, interaction_columns(cfg))
    _check_numeric(inter, schema, cfg.task_names, "a label")
    _check_numeric(inter, schema, cfg.context_numeric, "context_numeric")
    ts_type = schema[cfg.timestamp]
    if not (_is_numeric(ts_type) or ts_type.is_temporal()):
        raise RawLogError(
            f"{inter.where}: timestamp column {cfg.timestamp!r} must be epoch seconds or a datetime, "
            f"found dtype {ts_type}"
        )
    report.schema = {c: str(schema[c]) for c in interaction_columns(cfg)}

    for tf, key, cat, num in (
        (users, cfg.user_id, cfg.user_categorical, cfg.user_numeric),
        (items, cfg.item_id, cfg.item_categorical, cfg.item_numeric),
    ):
        tlf = scan_table(tf)
        tschema = tlf.collect_schema()
        _check_columns(tf, tschema, [key, *cat, *num])
        _check_numeric(tf, tschema, num, f"{tf.name} numeric")
        if tschema[key] != schema[key] and not (_is_numeric(tschema[key]) and _is_numeric(schema[key])):
            raise RawLogError(
                f"{tf.where}: id column {key!r} has dtype {tschema[key]} but interactions has "
                f"{schema[key]}; ids must have the same type in both tables"
            )
        stats = tlf.select(
            pl.len().alias("n"),
            pl.col(key).null_count().alias("nulls"),
            (pl.len() - pl.col(key).n_unique()).alias("dups"),
        ).collect()
        n, nulls, dups = stats.row(0)
        if nulls:
            raise RawLogError(f"{tf.where}: {nulls:,} row(s) with a null {key!r} in table {tf.name!r}")
        if dups:
            dup_ids = tlf.group_by(key).len().filter(pl.col("len") > 1).head(5).collect()[key].to_list()
            raise RawLogError(
                f"{tf.where}: {dups:,} duplicate {key!r} row(s) in table {tf.name!r} "
                f"(e.g. {dup_ids}); each id must appear once"
            )
        report.rows[tf.name] = n

    counts = (
        lf.select(bad_row_reason(cfg).alias(REJECT_REASON))
        .group_by(REJECT_REASON)
        .len()
        .collect()
    )
    total = int(counts["len"].sum())
    if total == 0:
        raise RawLogError(f"{inter.where}: the interaction log is empty")
    report.rows = {"interactions": total, **report.rows}
    bad = counts.filter(pl.col(REJECT_REASON).is_not_null()).sort(REJECT_REASON)
    report.rejected = dict(zip(bad[REJECT_REASON].to_list(), bad["len"].to_list(), strict=True))
    if report.rejected and cfg.on_bad_rows == "error":
        detail = "; ".join(f"{n:,} row(s) with {r}" for r, n in report.rejected.items())
        raise RawLogError(
            f"{inter.where}: {detail}. Fix the log, or set data.on_bad_rows = \"reject\" "
            "to write them to the feature store's rejects/ folder and go on"
        )
    if report.rejected_total == total:
        raise RawLogError(f"{inter.where}: every one of the {total:,} interaction rows is invalid")

    good = lf.filter(bad_row_reason(cfg).is_null())
    for tf, key, attr in ((users, cfg.user_id, "unknown_users"), (items, cfg.item_id, "unknown_items")):
        known = scan_table(tf).select(pl.col(key).cast(schema[key]))
        n_unknown = good.select(key).join(known, on=key, how="anti").select(pl.len()).collect().item()
        setattr(report, attr, int(n_unknown))
    return tables, report
