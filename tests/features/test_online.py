"""The online path (pre-encoded arrays) equals the Polars path (joins + encode) bit for
bit: test-split rows, unknown users, items, domains and context values, multi-valued
attributes, integer and string ids."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from features.examples import encode
from features.history import recency, recency_values
from features.online import OnlineFeatures, assemble, caster
from features.spec import MAX_RECENCY_DAYS
from features.store import numeric_stats, read_examples, read_tables, read_vocabs


def _as_strings(tables, vocabs, spec):
    """The same store with string ids ("u17", "i4"): every id column, tables and vocabs."""
    ids = {spec.user_id: "u", spec.item_id: "i"}

    def cast(df: pl.DataFrame, col: str, prefix: str) -> pl.DataFrame:
        return df.with_columns((pl.lit(prefix) + pl.col(col).cast(pl.String)).alias(col))

    tables = {k: t for k, t in tables.items()}
    for name, t in tables.items():
        for col, prefix in ids.items():
            if col in t.columns:
                tables[name] = t = cast(t, col, prefix)
    vocabs = {**vocabs, **{c: cast(vocabs[c], "value", p) for c, p in ids.items() if c in vocabs}}
    return tables, vocabs


@pytest.mark.parametrize("ids", ["int", "string"])
def test_online_arrays_equal_the_polars_path(small_store, ids):
    cfg, manifest = small_store
    store = cfg.features.store_dir
    from features.store import spec_from_manifest

    spec = spec_from_manifest(manifest)
    tables, vocabs = read_tables(store), read_vocabs(store, manifest)
    stats = numeric_stats(manifest)
    test = read_examples(store, "test")
    if ids == "string":
        tables, vocabs = _as_strings(tables, vocabs, spec)
        test = test.with_columns(
            (pl.lit("u") + pl.col(spec.user_id).cast(pl.String)).alias(spec.user_id),
            (pl.lit("i") + pl.col(spec.item_id).cast(pl.String)).alias(spec.item_id),
        )
    online = OnlineFeatures(tables, vocabs, stats, spec)
    unknown_user = "u-never" if ids == "string" else 10**9
    unknown_item = "i-never" if ids == "string" else 10**9 + 1
    rng = np.random.default_rng(0)
    rows = test.sample(12, seed=1).iter_rows(named=True)
    cases = []
    for r in rows:  # a known user and some known items at the row's own time
        items = [r[spec.item_id], *test[spec.item_id].sample(7, seed=int(rng.integers(99)))]
        items = list(dict.fromkeys(items))
        cases.append((r[spec.user_id], r[spec.domain], items, r[spec.timestamp],
                      {"hour": 9, "device": "ios"}))  # fmt: skip
    known = cases[0][2]
    cases += [
        (unknown_user, "feed", [*known, unknown_item], 1_700_000_000, {"hour": 3}),
        (cases[1][0], "mars", [unknown_item], 0, {"device": "toaster", "hour": None}),
        (cases[2][0], "video", known, 2**40, {}),  # recency clipped at its maximum
    ]
    hour = vocabs["hour"]["value"].dtype
    for user, domain, items, ts, ctx in cases:
        got = online.encode(user, domain, items, ts, ctx)
        n = len(items)
        req = pl.DataFrame(
            {spec.user_id: [user] * n, spec.item_id: items, spec.domain: [domain] * n,
             spec.timestamp: [ts] * n, "hour": [ctx.get("hour")] * n,
             "device": [ctx.get("device")] * n},
            schema_overrides={"hour": hour, "device": pl.String,
                              spec.user_id: tables["users"].schema[spec.user_id],
                              spec.item_id: tables["items"].schema[spec.item_id]},
        )  # fmt: skip
        ref = encode(assemble(req, tables, spec), spec, vocabs, stats, keep_split=False)
        want = {c for c in ref.columns if c.startswith(("cat__", "num__"))}
        assert set(got.columns) == want
        for col, v in got.columns.items():
            r = ref[col]
            if isinstance(v, tuple):  # multi-valued: (values, lengths)
                assert v[1].tolist() == r.list.len().to_list(), col
                assert v[0].tolist() == r.explode().drop_nulls().to_list(), col
            else:
                exact = r.to_numpy().astype(v.dtype)
                assert np.array_equal(exact, v), (col, exact[:4], v[:4])
                assert exact.tobytes() == np.ascontiguousarray(v).tobytes(), col
        assert got.cold_user == (user == unknown_user)
        assert got.cold_items.tolist() == [i == unknown_item for i in items]
    assert online.encode(unknown_user, "feed", [unknown_item], 0).user_segment == "cold"
    if ids == "int":  # a string id that is not a number, for integer ids: said, not OOV
        with pytest.raises(ValueError, match="cannot read 'abc'"):
            online.encode("abc", "feed", known, 0)
        assert caster(pl.Int64, "x")("17") == 17 and caster(pl.String, "x")(17) == "17"


def test_recency_numbers_equal_the_expression():
    """The request-time recency formula on numbers equals training's Polars expression
    bit for bit, over times seconds to years apart, in the future, and never seen."""
    rng = np.random.default_rng(0)
    last = np.concatenate([rng.integers(0, 2**31, 5000), [0, 1_700_000_000, 2**35]])
    seen = rng.random(len(last)) > 0.1
    now = 1_700_000_000
    want = pl.DataFrame({"last": last, "seen": seen}).select(
        recency(pl.lit(now, dtype=pl.Int64), pl.when(pl.col("seen")).then(pl.col("last")))
    )
    got = recency_values(now, last, seen)
    assert got.dtype == np.float32
    assert got.tobytes() == want.to_series().to_numpy().tobytes()
    assert got[~seen].max() == np.float32(np.log1p(MAX_RECENCY_DAYS))
