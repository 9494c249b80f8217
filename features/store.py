"""The feature store directory: reading it, writing it (pure Polars; ``pipelines/build_features``
runs the distributed stages and calls :func:`write_store`), and growing it by a domain.

Layout::

    <store>/manifest.json              schema, vocab sizes, normalisation stats, splits, fingerprint
    <store>/examples/split=<s>/*.parquet   training examples per split (train / valid / test)
    <store>/tables/{users,items,user_domain,item_domain}.parquet   online lookup tables
    <store>/vocab/<feature>.parquet    value -> index (0 = out of vocabulary)
    <store>/rejects/interactions.parquet   rows excluded by validation, with the reason
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import polars as pl

from features import examples as ex
from features.history import merge_snapshots, snapshot_aggregates
from features.spec import CAT, GRAINS, LABEL, NUM, SEGMENT, SPLIT, FeatureSpec

MANIFEST = "manifest.json"
TABLE_NAMES = ("users", "items", "user_domain", "item_domain")
FORMAT_VERSION = 1


def confined(root: str | Path, relative: str) -> Path:
    """``root / relative``, refused (ValueError naming the file) when it would resolve
    outside ``root``: an absolute path, ``..`` or a link pointing elsewhere. Manifests
    name their files; a crafted one must not make a reader leave its folder."""
    base = Path(root).resolve()
    path = (base / relative).resolve()
    if not path.is_relative_to(base):
        raise ValueError(f"{relative!r} resolves outside {base}; refusing to read it")
    return path


def load_manifest(store: str | Path) -> dict[str, Any]:
    p = Path(store) / MANIFEST
    if not p.is_file():
        raise FileNotFoundError(
            f"{p} not found: build the feature store first (`recsys-moe features`)"
        )
    return json.loads(p.read_text())


def spec_from_manifest(manifest: dict[str, Any]) -> FeatureSpec:
    return FeatureSpec(**manifest["spec"])


def example_files(store: str | Path, split: str) -> list[str]:
    files = sorted(str(p) for p in (Path(store) / "examples" / f"split={split}").glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{store}: no examples for split {split!r}")
    return files


def read_examples(store: str | Path, split: str) -> pl.DataFrame:
    return pl.read_parquet(example_files(store, split))


def held_out_split(manifest: dict[str, Any]) -> str:
    """The split a trained model is reported on: ``test``, or ``valid`` where the store
    was built without one (``features.test_fraction = 0``)."""
    return "test" if manifest["splits"]["rows"].get("test", 0) else "valid"


def read_vocabs(store: str | Path, manifest: dict[str, Any]) -> dict[str, pl.DataFrame]:
    return {
        f["name"]: pl.read_parquet(confined(store, f["vocab_file"]))
        for f in manifest["features"]["categorical"]
    }


def read_tables(store: str | Path) -> dict[str, pl.DataFrame]:
    return {
        name: pl.read_parquet(confined(store, f"tables/{name}.parquet")) for name in TABLE_NAMES
    }


def numeric_stats(manifest: dict[str, Any]) -> dict[str, dict[str, float]]:
    return {
        f["name"]: {"mean": f["mean"], "std": f["std"]} for f in manifest["features"]["numeric"]
    }


# ------------------------------------------------------------------ writing a store


def block_statistics(df: pl.DataFrame, spec: FeatureSpec) -> dict[str, Any]:
    """Exact partial statistics of one block of item-stage rows (merged by the caller)."""
    return {
        "vocab": ex.vocab_counts(df, spec),
        "moments": ex.numeric_moments(df, spec),
        "snapshots": {g: snapshot_aggregates(df, spec, g) for g in GRAINS}
        if spec.history_features
        else {},
        "counts": df.group_by(SPLIT, spec.domain).len(),
    }


def build_tables(
    spec: FeatureSpec,
    users: pl.DataFrame,
    items: pl.DataFrame,
    snapshots: dict[str, list[pl.DataFrame]],
    key_types: dict[str, pl.DataType],
) -> dict[str, pl.DataFrame]:
    """Online lookup tables: attributes + end-of-log aggregates, one row per key."""
    out: dict[str, pl.DataFrame] = {}
    for name, grain, attrs, key in (
        ("users", "user", users, spec.user_id),
        ("items", "item", items, spec.item_id),
    ):
        if spec.history_features:
            agg = merge_snapshots(snapshots[grain], spec, grain)
            out[name] = attrs.join(agg, on=key, how="full", coalesce=True).sort(key)
        else:
            out[name] = attrs.sort(key)
    for name, grain in (("user_domain", "userdom"), ("item_domain", "itemdom")):
        if spec.history_features:
            out[name] = merge_snapshots(snapshots[grain], spec, grain)
        else:
            out[name] = pl.DataFrame(schema={k: key_types[k] for k in spec.grain_keys(grain)})
    return out


def merge_counts(parts: list[pl.DataFrame], spec: FeatureSpec) -> dict[str, dict[str, int]]:
    """Rows per split x domain from per-block counts."""
    c = (
        pl.concat(parts)
        .group_by(SPLIT, spec.domain)
        .agg(pl.col("len").sum())
        .sort(SPLIT, spec.domain)
    )
    out: dict[str, dict[str, int]] = {}
    for split, dom, n in c.iter_rows():
        out.setdefault(split, {})[str(dom)] = int(n)
    return out


def _source(spec: FeatureSpec, f: str) -> str:
    if f in (spec.user_id, spec.item_id):
        return "id"
    if f == spec.domain:
        return "domain"
    if f == SEGMENT:
        return "derived"
    if f in spec.user_categorical:
        return "user"
    return "item" if f in spec.item_categorical else "context"


def write_store(
    store: Path,
    spec: FeatureSpec,
    *,
    vocabs: dict[str, pl.DataFrame],
    stats: dict[str, dict[str, float]],
    tables: dict[str, pl.DataFrame],
    counts: dict[str, dict[str, int]],
    splits: dict[str, int],
    tasks: list[dict[str, Any]],
    header: dict[str, Any],
) -> dict[str, Any]:
    """Write vocabularies, lookup tables and ``manifest.json`` (the examples are written
    by the caller). ``splits``: the time boundaries; ``tasks``: one dict per task with its
    ``name`` (column and prior are added here); ``header``: what the caller records about
    the run (name, config, fingerprint, inputs, validation, timings, versions)."""
    (store / "vocab").mkdir(parents=True, exist_ok=True)
    (store / "tables").mkdir(parents=True, exist_ok=True)
    cat_meta = []
    for f in spec.categorical:
        vocabs[f].write_parquet(store / "vocab" / f"{f}.parquet")
        cat_meta.append(
            {
                "name": f,
                "column": CAT + f,
                "source": _source(spec, f),
                "vocab_size": vocabs[f].height + 1,
                "oov_index": 0,
                "multi_valued": f in spec.multi_valued,
                "vocab_file": f"vocab/{f}.parquet",
            }
        )
    num_meta = [{"name": f, "column": NUM + f, **stats[f]} for f in spec.numeric]
    for name, t in tables.items():
        t.write_parquet(store / "tables" / f"{name}.parquet")
    manifest = {
        "format_version": FORMAT_VERSION,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **header,
        "spec": spec.to_dict(),
        "keys": {
            "user_id": spec.user_id,
            "item_id": spec.item_id,
            "domain": spec.domain,
            "timestamp": spec.timestamp,
        },
        "tasks": [
            {**t, "column": LABEL + t["name"], "prior": spec.priors[t["name"]]} for t in tasks
        ],
        "domains": vocabs[spec.domain].sort("index")["value"].cast(pl.String).to_list(),
        "features": {"categorical": cat_meta, "numeric": num_meta},
        "splits": {
            **splits,
            "rows": {s: sum(counts.get(s, {}).values()) for s in ("train", "valid", "test")},
            "rows_per_domain": counts,
        },
        "tables": {
            name: {"file": f"tables/{name}.parquet", "rows": t.height} for name, t in tables.items()
        },
    }
    (store / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return manifest


# ------------------------------------------------------------------ growing a store


def grow_vocab(parent: pl.DataFrame, counts: pl.DataFrame, min_count: int) -> pl.DataFrame:
    """Parent vocabulary + the new values (count >= min_count), appended after it: every
    existing index keeps its meaning."""
    dtype = parent.schema["value"]
    add = (
        counts.with_columns(pl.col("value").cast(dtype))
        .filter(pl.col("count") >= min_count)
        .join(parent.select("value"), on="value", how="anti")
        .sort(["count", "value"], descending=[True, False])
    )
    start = int(parent["index"].max() or 0) + 1
    add = add.with_columns(
        pl.int_range(start, start + pl.len(), dtype=parent.schema["index"]).alias("index")
    )
    return pl.concat([parent, add.select(parent.columns)], how="vertical_relaxed")


def grow_table(parent: pl.DataFrame, new: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    """The parent's rows unchanged + the rows of keys it does not have."""
    add = new.join(parent.select(keys), on=keys, how="anti")
    for c in parent.columns:
        if c not in add.columns:
            add = add.with_columns(pl.lit(None, dtype=parent.schema[c]).alias(c))
    add = add.select([pl.col(c).cast(parent.schema[c]) for c in parent.columns])
    return pl.concat([parent, add]).sort(keys)


def child_manifest(
    parent: dict[str, Any],
    vocabs: dict[str, pl.DataFrame],
    tables: dict[str, pl.DataFrame],
    domain: str,
    extension: dict[str, Any],
) -> dict[str, Any]:
    """The manifest of a store grown by one domain: vocabulary sizes, domains and tables
    updated, the growth recorded under ``extensions`` (``extension``: inputs, splits, ...)."""
    out = copy.deepcopy(parent)
    for f in out["features"]["categorical"]:
        f["vocab_size"] = vocabs[f["name"]].height + 1
    out["domains"] = [*parent["domains"], domain]
    out["tables"] = {
        name: {"file": f"tables/{name}.parquet", "rows": t.height} for name, t in tables.items()
    }
    out.setdefault("extensions", []).append(
        {
            "domain": domain,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **extension,
        }
    )
    return out
