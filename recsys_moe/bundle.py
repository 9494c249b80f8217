"""The model bundle: what a model folder holds, how it is written and how it is read.

A bundle holds everything scoring needs, so a served or batch-scored model can never
read features with another vocabulary than the one it was trained on::

    model.safetensors        the weights (tensors only: loading runs no pickled code)
    model.json               model config, extensions, the feature-store manifest, and
                             whatever the writer adds (run name, metrics, parent)
    vocab/<feature>.parquet  the vocabularies (paths named by the manifest)
    tables/<name>.parquet    the online lookup tables (users, items, user_domain, item_domain)

Training (``pipelines/train``), growing a model (``pipelines/extend``), the MLflow
model and the tests write bundles only through :func:`write_bundle`; scoring, serving
and the registry read them only through :func:`load_model`, :func:`read_meta`,
:func:`read_vocabs` and :func:`read_tables`. Every path a manifest names is resolved
inside the bundle folder (:func:`bundle_file`): a crafted manifest cannot make a reader
leave it.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import polars as pl
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from features import store
from features.store import confined
from recsys_moe.config import ModelConfig
from recsys_moe.model.inputs import InputSpec
from recsys_moe.model.ranker import Extension, RankingModel

WEIGHTS, META = "model.safetensors", "model.json"
VOCAB_DIR, TABLES_DIR = "vocab", "tables"


class BundleError(ValueError):
    """A folder is not a readable model bundle (the message names the file)."""


def bundle_file(bundle: str | Path, relative: str) -> Path:
    """``relative`` (as a manifest names it) inside ``bundle``; a path that would leave the
    folder (absolute, ``..``, a link pointing out) is a :class:`BundleError`."""
    try:
        return confined(bundle, relative)
    except ValueError as e:
        raise BundleError(str(e)) from None


def is_bundle(path: str | Path) -> bool:
    return (Path(path) / META).is_file()


def read_meta(bundle: str | Path) -> dict[str, Any]:
    """``model.json`` of a bundle."""
    p = Path(bundle) / META
    if not p.is_file():
        raise BundleError(f"{Path(bundle)} is not a model bundle (no {META})")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{p}: not valid JSON: {e}") from None


def _model_from_meta(meta: dict[str, Any]) -> RankingModel:
    return RankingModel(
        InputSpec.from_manifest(meta["manifest"]),
        # bundles written before model.input_norm existed computed without it
        ModelConfig(**{"input_norm": "none", **meta["model_config"]}),
        extensions=[Extension.from_dict(e) for e in meta.get("extensions", [])],
    )


def load_model(
    bundle: str | Path, pool_on_disk: bool = False
) -> tuple[RankingModel, dict[str, Any]]:
    """The bundle's model in eval mode, and its ``model.json``. ``pool_on_disk``: an MoE
    model's expert pool stays on the meta device, never read (a scorer that reads each
    domain's experts from the bundle, :mod:`recsys_moe.model.offload`); a model that
    needs its whole pool (domains added by ``extend`` read every parent expert; PLE,
    shared-bottom and batch-normed experts have no slices) is read whole."""
    from recsys_moe.model.cores import experts_on_meta

    meta = read_meta(bundle)
    weights = str(bundle_file(bundle, WEIGHTS))
    lazy = pool_on_disk and not meta.get("extensions")
    with experts_on_meta() if lazy else contextlib.nullcontext():
        model = _model_from_meta(meta)
    on_meta = {n for n, p in model.named_parameters() if p.is_meta}
    if not on_meta:
        model.load_state_dict(load_file(weights))
        return model.eval(), meta
    with safe_open(weights, framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys() if k not in on_meta}  # noqa: SIM118
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) != on_meta:
        raise BundleError(f"{weights}: weights do not match the model (missing {missing}, "
                          f"unexpected {unexpected})")  # fmt: skip
    return model.eval(), meta


def read_vocabs(bundle: str | Path, manifest: dict[str, Any]) -> dict[str, pl.DataFrame]:
    """The vocabularies (a bundle lays them out as a feature store does)."""
    try:
        return store.read_vocabs(bundle, manifest)
    except ValueError as e:
        raise BundleError(str(e)) from None


def read_tables(bundle: str | Path) -> dict[str, pl.DataFrame]:
    """The online lookup tables."""
    try:
        return store.read_tables(bundle)
    except ValueError as e:
        raise BundleError(str(e)) from None


def write_bundle(
    model: RankingModel,
    out: str | Path,
    manifest: dict[str, Any],
    *,
    store: str | Path | None = None,
    vocabs: dict[str, pl.DataFrame] | None = None,
    tables: dict[str, pl.DataFrame] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a complete bundle: weights, ``model.json`` and the vocabularies and lookup
    tables, copied from the feature ``store`` or given as frames (a grown model's)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS))
    meta = {
        "model_config": asdict(model.cfg),
        "manifest": manifest,
        "extensions": [asdict(e) for e in model.extension_specs],
        **(extra or {}),
    }
    (out / META).write_text(json.dumps(meta, indent=2, default=str))
    if store is not None:
        for sub in (VOCAB_DIR, TABLES_DIR):
            shutil.copytree(Path(store) / sub, out / sub, dirs_exist_ok=True)
    if vocabs is not None:
        for f in manifest["features"]["categorical"]:
            path = bundle_file(out, f["vocab_file"])
            path.parent.mkdir(parents=True, exist_ok=True)
            vocabs[f["name"]].write_parquet(path)
    if tables is not None:
        (out / TABLES_DIR).mkdir(exist_ok=True)  # the store's layout: store.TABLE_NAMES
        for name, t in tables.items():
            t.write_parquet(out / TABLES_DIR / f"{name}.parquet")
    return out


__all__ = [
    "META",
    "WEIGHTS",
    "BundleError",
    "bundle_file",
    "is_bundle",
    "load_model",
    "read_meta",
    "read_tables",
    "read_vocabs",
    "write_bundle",
]
