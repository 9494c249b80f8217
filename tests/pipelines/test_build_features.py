"""The Ray pipeline against the single-process reference, and the store it writes."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from features.examples import encode
from features.online import assemble
from features.spec import CAT, NUM
from features.store import (
    numeric_stats,
    read_examples,
    read_tables,
    read_vocabs,
    spec_from_manifest,
)
from pipelines.build_features import build_features, build_reference
from recsys_moe.config import config_from_dict

pytestmark = pytest.mark.ray

SPLITS = ("train", "valid", "test")


def all_examples(store) -> pl.DataFrame:
    return pl.concat(
        [read_examples(store, s).with_columns(pl.lit(s).alias("split")) for s in SPLITS],
        how="vertical",
    )


def test_ray_pipeline_equals_single_process_reference(small_store):
    cfg, manifest = small_store
    ref, vocabs, stats, _ = build_reference(cfg)
    got = all_examples(cfg.features.store_dir).select(ref.columns)
    assert got.schema == ref.schema
    assert got.sort("event_id").equals(ref.sort("event_id"))
    store_vocabs = read_vocabs(cfg.features.store_dir, manifest)
    for f, v in vocabs.items():
        assert store_vocabs[f].equals(v), f
    for f, s in stats.items():
        m = numeric_stats(manifest)[f]
        assert m["mean"] == pytest.approx(s["mean"], rel=1e-9, abs=1e-12)
        assert m["std"] == pytest.approx(s["std"], rel=1e-9)


def test_manifest(small_store, small_log):
    cfg, manifest = small_store
    assert (
        manifest["splits"]["rows"]["train"]
        + manifest["splits"]["rows"]["valid"]
        + manifest["splits"]["rows"]["test"]
        == cfg.synthetic.n_rows
    )
    assert sorted(manifest["domains"]) == sorted(cfg.synthetic.domains)
    assert [t["name"] for t in manifest["tasks"]] == ["click", "like", "conversion"]
    assert manifest["tasks"][2]["funnel_parent"] == "click"
    cats = {f["name"]: f for f in manifest["features"]["categorical"]}
    assert cats["tags"]["multi_valued"] and cats["user_id"]["source"] == "id"
    assert all(f["vocab_size"] >= 2 for f in cats.values())
    assert len(manifest["fingerprint"]) == 32
    b = manifest["splits"]
    tr = read_examples(cfg.features.store_dir, "train")
    te = read_examples(cfg.features.store_dir, "test")
    assert tr["ts"].max() < b["valid_start"] <= b["test_start"] <= te["ts"].min()
    # multi-valued feature stored as a list of indices
    assert tr.schema[CAT + "tags"] == pl.List(pl.Int32)
    assert tr[NUM + "price"].null_count() == 0


def test_fingerprint_changes_with_input(small_log, tmp_path, ray_session):
    cfg, _ = small_log
    from pipelines.build_features import fingerprint, plan_features

    a = fingerprint(plan_features(cfg))
    raw2 = tmp_path / "raw2"
    import shutil

    shutil.copytree(cfg.data.raw_dir, raw2)
    users = pl.read_parquet(raw2 / "users.parquet")
    users.with_columns(pl.col("tenure_days") + 1).write_parquet(raw2 / "users.parquet")
    cfg2 = cfg.replace(data=cfg.data.__class__(**{**cfg.data.__dict__, "raw_dir": str(raw2)}))
    assert fingerprint(plan_features(cfg2)) != a


def test_lookup_tables_and_online_parity(small_store):
    """Features assembled online from the tables equal the point-in-time features of an
    event appended after the end of the log (same code path, no training/serving skew)."""
    cfg, manifest = small_store
    store = cfg.features.store_dir
    spec = spec_from_manifest(manifest)
    tables = read_tables(store)
    ex = all_examples(store)
    counts = ex.group_by("user_id").len()
    t = tables["users"].join(counts, on="user_id")
    assert (t["_agg_user_n"] == t["len"]).all()

    # requests: existing users/items in each domain, an unknown user and an unknown item
    last = int(ex["ts"].max()) + 3600
    req = pl.DataFrame(
        {
            "user_id": [5, 7, 99_999, 11],
            "item_id": [3, 4, 5, 88_888],
            "domain": ["feed", "video", "search", "feed"],
            "ts": [last] * 4,
            "hour": [10, 11, 12, 13],
            "device": ["ios", "web", "android", "tablet?"],
        },
        schema_overrides={"hour": pl.Int8},
    )
    online = assemble(req, tables, spec)

    # reference: append the request rows to the raw log as events and run the offline path
    raw = pl.read_parquet(str(Path(cfg.data.raw_dir) / "interactions" / "*.parquet"))
    appended = req.with_columns(
        pl.lit(-1, dtype=pl.Int64).alias("event_id"),
        *(pl.lit(0, dtype=pl.Int8).alias(t) for t in spec.tasks),
    ).select(raw.columns)
    ref_cfg = config_from_dict(
        {
            **cfg.to_dict(),
            "data": {**cfg.to_dict()["data"], "raw_dir": str(Path(store).parent / "raw_app")},
        }
    )
    out = Path(ref_cfg.data.raw_dir)
    (out / "interactions").mkdir(parents=True)
    pl.concat([raw, appended]).write_parquet(out / "interactions" / "part.parquet")
    for name in ("users", "items"):
        pl.read_parquet(Path(cfg.data.raw_dir) / f"{name}.parquet").write_parquet(
            out / f"{name}.parquet"
        )
    from features.examples import Boundaries, item_stage, prepare, user_stage
    from pipelines.build_features import plan_features

    plan = plan_features(ref_cfg)
    df = prepare(pl.concat([raw, appended]), spec, plan.schema, Boundaries(0, 1))
    df = item_stage(user_stage(df, plan.users, spec), plan.items, spec)
    offline = df.filter(pl.col("event_id") == -1).sort("user_id")
    vocabs, stats = read_vocabs(store, manifest), numeric_stats(manifest)
    a = encode(online.sort("user_id"), spec, vocabs, stats, keep_split=False).drop(
        "event_id", strict=False
    )
    b = encode(offline.drop(spec.tasks), spec, vocabs, stats, keep_split=False).drop(
        "event_id", strict=False
    )
    a = a.select(b.columns)
    assert a.equals(b)
    unknown = a.filter(pl.col("user_id") == 99_999)
    assert unknown[CAT + "user_id"][0] == 0 and unknown["cat__user_segment"][0] > 0
    assert a.filter(pl.col("item_id") == 88_888)[CAT + "item_id"][0] == 0


def test_rejects_are_written_and_counted(tmp_path, ray_session):
    from tests.data.test_schema import DATA

    raw = tmp_path / "raw"
    raw.mkdir()
    n = 200
    inter = pl.DataFrame(
        {
            "user_id": [i % 7 if i % 50 else None for i in range(n)],
            "item_id": [i % 5 for i in range(n)],
            "domain": ["a" if i % 3 else "b" for i in range(n)],
            "ts": list(range(n)),
            "device": ["ios"] * n,
            "click": [i % 2 if i % 40 else 3 for i in range(n)],
            "buy": [0] * n,
        }
    )
    inter.write_parquet(raw / "interactions.parquet")
    pl.DataFrame({"user_id": list(range(6)), "age": ["x"] * 6}).write_parquet(raw / "users.parquet")
    pl.DataFrame({"item_id": list(range(5)), "cat": ["p"] * 5}).write_parquet(raw / "items.parquet")
    cfg = config_from_dict(
        {
            "data": {**DATA, "raw_dir": str(raw), "on_bad_rows": "reject"},
            "features": {
                "store_dir": str(tmp_path / "store"),
                "partitions": 2,
                "valid_fraction": 0.2,
                "test_fraction": 0.2,
            },
        }
    )
    manifest = build_features(cfg, progress=False)
    rejects = pl.read_parquet(tmp_path / "store" / "rejects" / "interactions.parquet")
    n_bad = rejects.height
    assert n_bad == 4 + 5 - 1  # ids null at i%50==0 (4), labels 3 at i%40==0 (5), i=0 counted once
    assert set(rejects["_reject_reason"].unique()) == {"null user_id", "label click outside {0,1}"}
    assert sum(manifest["splits"]["rows"].values()) == n - n_bad
    assert manifest["validation"]["rejected_total"] == n_bad
    assert manifest["validation"]["unknown_users"] == sum(
        1 for i in range(n) if i % 50 and i % 40 and i % 7 == 6
    )
    ex = all_examples(tmp_path / "store")
    assert ex.height == n - n_bad
    unknown = ex.filter(pl.col("user_id") == 6)
    assert unknown.height > 0 and (unknown[CAT + "age"] == 0).all()
