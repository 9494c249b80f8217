"""Reading a feature store directory written by ``pipelines/build_features``.

Layout::

    <store>/manifest.json              schema, vocab sizes, normalisation stats, splits, fingerprint
    <store>/examples/split=<s>/*.parquet   training examples per split (train / valid / test)
    <store>/tables/{users,items,user_domain,item_domain}.parquet   online lookup tables
    <store>/vocab/<feature>.parquet    value -> index (0 = out of vocabulary)
    <store>/rejects/interactions.parquet   rows excluded by validation, with the reason
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl

from features.spec import FeatureSpec

MANIFEST = "manifest.json"
TABLE_NAMES = ("users", "items", "user_domain", "item_domain")


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


def read_vocabs(store: str | Path, manifest: dict[str, Any]) -> dict[str, pl.DataFrame]:
    return {
        f["name"]: pl.read_parquet(Path(store) / f["vocab_file"])
        for f in manifest["features"]["categorical"]
    }


def read_tables(store: str | Path) -> dict[str, pl.DataFrame]:
    return {
        name: pl.read_parquet(Path(store) / "tables" / f"{name}.parquet") for name in TABLE_NAMES
    }


def numeric_stats(manifest: dict[str, Any]) -> dict[str, dict[str, float]]:
    return {
        f["name"]: {"mean": f["mean"], "std": f["std"]} for f in manifest["features"]["numeric"]
    }
