"""Online feature assembly: request rows + the feature store's lookup tables -> the same
feature columns the training examples have, computed with the same functions.

Two ways, one result:

- :func:`assemble` (then ``features.examples.encode``): Polars joins over any number of
  rows. Batch scoring uses it.
- :class:`OnlineFeatures`: the tables turned once into pre-encoded arrays; a request (one
  user, one domain, its candidates) costs dictionary look-ups and array gathers, no data
  frame. The ranking service uses it. Its columns equal the first way's bit for bit
  (tests/features/test_online.py).

Unknown users and items are not errors: their attributes are null (encoded as the
out-of-vocabulary index, numerics as the training mean) and their history is empty
(count 0, the task prior as rate, maximal recency).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from features.examples import encode_categorical
from features.history import derive_history, grain_features, recency_values, segment_expr
from features.spec import AGG, CAT, NUM, SEGMENT, FeatureSpec


def assemble(
    requests: pl.DataFrame, tables: dict[str, pl.DataFrame], spec: FeatureSpec
) -> pl.DataFrame:
    """Join the lookup tables onto request rows and derive the history features.

    Args:
        requests: one row per (user, item, domain, timestamp [, context]) to score;
            the timestamp is "now" for recency.
        tables: ``users``, ``items``, ``user_domain``, ``item_domain`` as written by the
            feature pipeline (attributes + raw aggregates).
    Returns:
        the rows with every raw feature column, ready for ``features.examples.encode``.
    """
    df = requests.join(tables["users"], on=spec.user_id, how="left", maintain_order="left")
    df = df.join(tables["items"], on=spec.item_id, how="left", maintain_order="left")
    if spec.history_features:
        df = df.join(
            tables["user_domain"], on=[spec.user_id, spec.domain], how="left", maintain_order="left"
        )
        df = df.join(
            tables["item_domain"], on=[spec.item_id, spec.domain], how="left", maintain_order="left"
        )
        df = derive_history(df, spec)
    return df


# ------------------------------------------------------------- pre-encoded arrays


def user_segment(spec: FeatureSpec) -> pl.Expr:
    """A user's serving segment (cold / casual / power) from the users lookup table's
    event count (never seen: cold); the request encoder and the service's router both
    read it from here."""
    return segment_expr(pl.col(f"{AGG}user_n").fill_null(0), spec).alias(SEGMENT)


def caster(dtype: pl.DataType, what: str) -> Callable[[Any], Any]:
    """A function reading one request value as ``dtype`` the way a strict Polars cast
    reads it (``"17"`` -> 17 for an integer column, 17 -> ``"17"`` for a string column);
    a value it cannot read raises ``ValueError`` naming ``what``."""
    if dtype.is_integer():

        def to_int(v: Any) -> int:
            if isinstance(v, int) and not isinstance(v, bool):
                return v
            if isinstance(v, float) and v.is_integer():
                return int(v)
            if isinstance(v, str) and v.strip().lstrip("+-").isdigit():
                return int(v)
            raise ValueError(f"{what}: cannot read {v!r} as {dtype}")

        return to_int
    if dtype.is_float():

        def to_float(v: Any) -> float:
            if isinstance(v, bool):
                raise ValueError(f"{what}: cannot read {v!r} as {dtype}")
            try:
                return float(v)
            except (TypeError, ValueError):
                raise ValueError(f"{what}: cannot read {v!r} as {dtype}") from None

        return to_float
    return lambda v: v if isinstance(v, str) else str(v)


@dataclass(frozen=True)
class _Table:
    """A lookup table as arrays: one row per key, and a last row for an unknown key."""

    rows: dict[Any, int]
    columns: dict[str, Any]  # column -> np.ndarray, or a list of int64 arrays (multi-valued)
    unknown: int

    @classmethod
    def build(cls, table: pl.DataFrame, keys: list[str], steps: list[list[pl.Expr]]) -> _Table:
        """``steps``: expressions applied in order (a later step may read an earlier one's
        output); their outputs are the columns kept."""
        df = pl.concat([table, table.clear(1)])  # the unknown key: every column null
        names: list[str] = []
        for step in steps:
            df = df.with_columns(step)
            names += [e.meta.output_name() for e in step]
        columns: dict[str, Any] = {}
        for c in names:
            s = df[c]
            if isinstance(s.dtype, pl.List):
                columns[c] = [np.asarray(v, dtype=np.int64) for v in s.to_list()]
            elif c.startswith(AGG):  # a last-seen time: int64 and a seen mask
                columns[c] = (s.fill_null(0).to_numpy(), s.is_not_null().to_numpy())
            else:
                columns[c] = s.to_numpy()
        ids: Sequence[Any] = (
            table[keys[0]].to_list()
            if len(keys) == 1
            else list(zip(*(table[k].to_list() for k in keys), strict=True))
        )
        return cls(dict(zip(ids, range(len(ids)), strict=True)), columns, table.height)

    def row(self, key: Any) -> int:
        return self.rows.get(key, self.unknown)


@dataclass
class RequestFeatures:
    """The encoded columns of one request's rows (the store's ``cat__`` / ``num__``
    names): int64 arrays, ``(values, lengths)`` for multi-valued features, float32
    numerics; and what the response reports."""

    columns: dict[str, Any]
    n: int
    user_segment: str
    cold_user: bool
    cold_items: np.ndarray


class OnlineFeatures:
    """The store's lookup tables turned once into pre-encoded arrays, so that a request
    (one user, one domain, its candidate items) is encoded with dictionary look-ups and
    array gathers, no data frame: the same columns, bit for bit, as
    ``encode(assemble(rows, tables, spec), ...)`` gives for those rows.

    Per table one row per known key and one for an unknown key (what ``assemble``'s left
    join gives it): vocabulary indices, mean-filled numerics, the time-independent
    history features (log count, smoothed rates) and the user segment. Only recency
    depends on the request time: :func:`features.history.recency_values`, the same
    formula as training's, per request.
    """

    def __init__(
        self,
        tables: dict[str, pl.DataFrame],
        vocabs: dict[str, pl.DataFrame],
        stats: dict[str, dict[str, float]],
        spec: FeatureSpec,
    ) -> None:
        self.spec = s = spec
        users, items = tables["users"], tables["items"]
        self.user_key = caster(users.schema[s.user_id], s.user_id)
        self.item_key = caster(items.schema[s.item_id], s.item_id)
        dom_table = tables.get("user_domain")
        dom_type = dom_table.schema[s.domain] if dom_table is not None else None
        self.domain_key = caster(dom_type or vocabs[s.domain]["value"].dtype, s.domain)
        hist = s.history_features

        def encoded(df: pl.DataFrame, key: str, cat: list[str], num: list[str]) -> list[pl.Expr]:
            names = ([key] if s.use_id_features else []) + cat
            return [
                *(encode_categorical(df, f, vocabs[f]) for f in names),
                *(_numeric(f, stats) for f in num),
            ]

        u_steps = [encoded(users, s.user_id, s.user_categorical, s.user_numeric)]
        i_steps = [encoded(items, s.item_id, s.item_categorical, s.item_numeric)]
        if hist:
            seg_vocab = vocabs[SEGMENT]
            u_steps += [
                [*_named(grain_features(s, "user")),
                 user_segment(s),
                 pl.col(f"{AGG}user_last")],
                [encode_categorical(pl.DataFrame({SEGMENT: ["cold"]}), SEGMENT, seg_vocab)],
            ]  # fmt: skip
            i_steps.append([*_named(grain_features(s, "item")), pl.col(f"{AGG}item_last")])
        self.users = _Table.build(users, [s.user_id], u_steps)
        self.items = _Table.build(items, [s.item_id], i_steps)
        if hist:
            ud = [_named(grain_features(s, "userdom"))]
            idm = [_named(grain_features(s, "itemdom"))]
            self.user_domain = _Table.build(tables["user_domain"], [s.user_id, s.domain], ud)
            self.item_domain = _Table.build(tables["item_domain"], [s.item_id, s.domain], idm)
        self.domains = _vocab_index(vocabs[s.domain])
        self.context = {c: _vocab_index(vocabs[c]) for c in s.context_categorical}
        self.context_key = {c: caster(vocabs[c]["value"].dtype, c) for c in s.context_categorical}
        self.context_mean = {c: np.float32(stats[c]["mean"]) for c in s.context_numeric}
        # where each model column comes from, in the store's column order
        self.plan = [*((CAT + f, self._source(f)) for f in s.categorical),
                     *((NUM + f, self._source(f)) for f in s.numeric)]  # fmt: skip

    def _source(self, f: str) -> str:
        s = self.spec
        if f == s.domain:
            return "domain"
        if f in s.context_categorical or f in s.context_numeric:
            return "context"
        if f.startswith("hist_") and f.endswith("_recency"):
            return f"recency_{f.split('_')[1]}"
        for grain in ("userdom", "itemdom", "user", "item"):
            if f.startswith(f"hist_{grain}_"):
                return grain
        if f in (s.user_id, SEGMENT, *s.user_categorical, *s.user_numeric):
            return "user"
        return "item"

    def encode(
        self,
        user_id: Any,
        domain: Any,
        items: Sequence[Any],
        timestamp: int,
        context: dict[str, Any] | None = None,
    ) -> RequestFeatures:
        """The encoded rows of (user, item, domain, timestamp, context) for each item.
        Raises ``ValueError`` for an id or context value of the wrong type."""
        s, n = self.spec, len(items)
        user = self.user_key(user_id)
        dom = self.domain_key(domain)
        keys = [self.item_key(i) for i in items]
        u = self.users.row(user)
        rows = np.fromiter((self.items.row(k) for k in keys), dtype=np.int64, count=n)
        ctx = context or {}
        cols: dict[str, Any] = {}
        gathered: dict[str, tuple[_Table, Any]] = {"user": (self.users, u),
                                                  "item": (self.items, rows)}  # fmt: skip
        if s.history_features:
            ud = self.user_domain.row((user, dom))
            idm = np.fromiter(
                (self.item_domain.row((k, dom)) for k in keys), dtype=np.int64, count=n
            )
            gathered |= {"userdom": (self.user_domain, ud), "itemdom": (self.item_domain, idm)}
        for col, source in self.plan:
            f = col[len(CAT) :] if col.startswith(CAT) else col[len(NUM) :]
            if source == "domain":
                cols[col] = np.full(n, self.domains.get(dom, 0), dtype=np.int64)
            elif source == "context":
                cols[col] = self._context(f, ctx.get(f), n)
            elif source.startswith("recency_"):
                table, at = gathered[source[len("recency_") :]]
                last, seen = table.columns[f"{AGG}{source[len('recency_') :]}_last"]
                cols[col] = np.broadcast_to(
                    recency_values(timestamp, np.atleast_1d(last[at]), np.atleast_1d(seen[at])),
                    (n,),
                ).copy()
            else:
                table, at = gathered[source]
                cols[col] = _take(table.columns[col], at, n)
        segment = str(self.users.columns[SEGMENT][u]) if s.history_features else "cold"
        cold_items = rows == self.items.unknown
        return RequestFeatures(cols, n, segment, u == self.users.unknown, cold_items)

    def _context(self, f: str, v: Any, n: int) -> Any:
        s = self.spec
        if f in s.context_numeric:
            x = self.context_mean[f] if v is None else np.float32(self.context_key[f](v))
            return np.full(n, x, dtype=np.float32)
        index = self.context[f]
        if f in s.multi_valued:
            parts = [] if v is None else [p for p in str(v).split(s.list_separator) if p]
            one = np.array([index.get(self.context_key[f](p), 0) for p in parts], dtype=np.int64)
            return np.tile(one, n), np.full(n, len(one), dtype=np.int64)
        code = 0 if v is None else index.get(self.context_key[f](v), 0)
        return np.full(n, code, dtype=np.int64)


def _numeric(f: str, stats: dict[str, dict[str, float]]) -> pl.Expr:
    """The store's numeric encoding (``features.examples.encode``): mean-filled float32."""
    return pl.col(f).cast(pl.Float64).fill_null(stats[f]["mean"]).cast(pl.Float32).alias(NUM + f)


def _named(exprs: list[pl.Expr]) -> list[pl.Expr]:
    return [e.alias(NUM + e.meta.output_name()) for e in exprs]


def _vocab_index(vocab: pl.DataFrame) -> dict[Any, int]:
    return dict(zip(vocab["value"].to_list(), vocab["index"].to_list(), strict=True))


def concat_columns(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The columns of several requests' :class:`RequestFeatures`, one after the other."""
    out: dict[str, Any] = {}
    for col, first in parts[0].items():
        if isinstance(first, tuple):
            out[col] = (np.concatenate([p[col][0] for p in parts]),
                        np.concatenate([p[col][1] for p in parts]))  # fmt: skip
        else:
            out[col] = np.concatenate([p[col] for p in parts])
    return out


def _take(column: Any, at: Any, n: int) -> Any:
    """Rows ``at`` (an int: one row repeated n times; an array: a gather) of a column."""
    if isinstance(column, list):  # multi-valued: (values, lengths)
        bags = [column[at]] * n if isinstance(at, int) else [column[i] for i in at.tolist()]
        lengths = np.fromiter((len(b) for b in bags), dtype=np.int64, count=n)
        values = np.concatenate(bags) if bags else np.zeros(0, dtype=np.int64)
        return values.astype(np.int64, copy=False), lengths
    if isinstance(at, int):
        return np.full(n, column[at], dtype=np.int64 if column.dtype.kind in "iu" else column.dtype)
    out = column[at]
    return out.astype(np.int64) if out.dtype.kind in "iu" else out
