"""Shared fixtures: one Ray instance per session, small synthetic configs, the shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# Ray reads it when first imported (test modules import ray at collection): the local
# instance of the tests runs with token authentication, as every command's does
os.environ.setdefault("RAY_AUTH_MODE", "token")
# The suite's Triton tests are interpreter tests, on every machine: CPU tensors through
# Triton's interpreter. The variable must be set before anything imports triton
# (triton.language's helpers are decorated at import). The compiled kernels are tested on
# CUDA tensors by the `gpu` test, in a process of its own without the interpreter.
os.environ["TRITON_INTERPRET"] = "1"
# the commands' log files (recsys_moe.console) go to a temporary folder, not logs/
if "RECSYS_MOE_LOG_DIR" not in os.environ:
    import tempfile

    os.environ["RECSYS_MOE_LOG_DIR"] = tempfile.mkdtemp(prefix="recsys-moe-test-logs-")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("RECSYS_MOE_SHARED_DATA", REPO.parent / "shared" / "data"))


# the user's own state in the repository: the suite must leave it exactly as it found it
USER_STATE = ("mlruns", "models", "checkpoints", "data", "mlflow.db", "logs")


def _user_state() -> dict[str, tuple[int, int]]:
    """Every file under the repository's state folders: path -> (size, mtime_ns)."""
    out = {}
    for name in USER_STATE:
        root = REPO / name
        paths = [root] if root.is_file() else root.rglob("*") if root.exists() else []
        for p in paths:
            if p.is_file():
                st = p.stat()
                out[str(p.relative_to(REPO))] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="session", autouse=True)
def user_state_untouched():
    """Fails the run if any test created, changed or removed anything in the repository's
    mlruns/, models/, checkpoints/ or data/ (tests write under temporary folders only, with
    their own MLflow store)."""
    before = _user_state()
    yield
    after = _user_state()
    changed = sorted({k for k in before.keys() | after.keys() if before.get(k) != after.get(k)})
    assert not changed, f"the test suite changed the user's state in the repository: {changed[:20]}"


def small_config_dict(tmp: Path, n_rows: int = 20_000, **features) -> dict:
    """The default config, shrunk, with every path under ``tmp``."""
    import tomllib

    raw = tomllib.loads((REPO / "configs" / "default.toml").read_text())
    raw["synthetic"].update(n_rows=n_rows, n_users=800, n_items=300, chunk_rows=7_000, days=10)
    raw["data"]["raw_dir"] = str(tmp / "raw")
    # a test split (the shipped configs have none): tests check test metrics
    raw["features"].update(store_dir=str(tmp / "store"), partitions=3, test_fraction=0.1)
    raw["features"].update(features)
    return raw


def _toml_value(v) -> str:
    import json

    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(v) if isinstance(v, str) else repr(v)


def write_toml(raw: dict, path: Path) -> Path:
    """A config dict (sections of scalars, lists and lists of tables) as a TOML file."""
    lines = []
    for section, body in raw.items():
        if not isinstance(body, dict):
            lines.append(f"{section} = {_toml_value(body)}")
            continue
        tables = {
            k: v for k, v in body.items() if isinstance(v, list) and v and isinstance(v[0], dict)
        }
        lines.append(f"[{section}]")
        lines += [
            f"{k} = {_toml_value(v)}" for k, v in body.items() if k not in tables and v is not None
        ]
        for k, items in tables.items():
            for item in items:
                lines.append(f"[[{section}.{k}]]")
                lines += [f"{a} = {_toml_value(b)}" for a, b in item.items() if b is not None]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (never `ray stop`)."""
    import ray

    from recsys_moe.cluster import init_ray

    # as `recsys-moe serve` starts it: token authentication on, loopback, Serve's settings
    # and its HAProxy ingress (the serving tests run the service on this instance)
    init_ray(num_cpus=2, log_to_driver=False, serve=True)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def small_log(tmp_path_factory):
    """A small synthetic raw log (20k rows) and its config, generated once."""
    from recsys_moe.config import config_from_dict
    from recsys_moe.data.synthetic import generate

    tmp = tmp_path_factory.mktemp("small")
    cfg = config_from_dict(small_config_dict(tmp))
    meta = generate(cfg.synthetic, cfg.data.raw_dir, progress=False)
    return cfg, meta


@pytest.fixture(scope="session")
def small_store(small_log, ray_session):
    """The feature store of the small log, built once by the Ray pipeline."""
    from pipelines.build_features import build_features

    cfg, _ = small_log
    manifest = build_features(cfg, progress=False)
    return cfg, manifest


def need_shared(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (real data lives in ../shared/data, never in this repo)")
    return path


@pytest.fixture(scope="session")
def scoring_model(small_store, tmp_path_factory):
    """A small STAR model (shared + per-domain experts) trained in-process for one epoch,
    bundled, logged and registered as version 1 ``@champion`` in a temporary MLflow store.

    Returns ``(cfg, bundle, tracking_uri, tmp)``; scoring and serving tests share it.
    """
    import dataclasses

    import torch

    from features.store import load_manifest, read_examples
    from recsys_moe.bundle import write_bundle
    from recsys_moe.model.inputs import ExampleTensors, InputSpec
    from recsys_moe.model.observe import RouterMonitor
    from recsys_moe.model.ranker import RankingModel
    from recsys_moe.training import evaluate_model, fit

    cfg, _ = small_store
    tmp = tmp_path_factory.mktemp("scoring")
    store = cfg.features.store_dir
    manifest = load_manifest(store)
    spec = InputSpec.from_manifest(manifest)
    torch.manual_seed(0)
    mcfg = dataclasses.replace(
        cfg.model, arch="star", shared_experts=2, specific_experts=1, expert_hidden=[16, 8]
    )
    m = RankingModel(spec, mcfg)
    fit(m, ExampleTensors(spec, read_examples(store, "train")),
        ExampleTensors(spec, read_examples(store, "valid")),
        dataclasses.replace(cfg.training, epochs=1, batch_size=512), progress=False)  # fmt: skip
    # the training-time routing serving compares with, as `recsys-moe train` bundles it
    mon = RouterMonitor(spec.domains)
    evaluate_model(m, ExampleTensors(spec, read_examples(store, "test")), monitor=mon)
    bundle = write_bundle(m, tmp / "bundle", manifest, store=store,
                          extra={"router_load": mon.load_shares()})  # fmt: skip
    uri = f"sqlite:///{tmp}/mlflow.db"
    assert register_bundle(cfg, bundle, uri, 0.6, "scoring-test")["promoted"]
    return cfg, bundle, uri, tmp


def register_bundle(
    cfg, bundle, uri: str, metric: float, run_name: str, force: bool = False
) -> dict:
    """Log ``bundle`` in a run of the MLflow store ``uri`` and register it behind the
    promotion gate, as `recsys-moe train` does (``metric``: its recorded valid_score;
    ``force``: move the alias whatever the comparison says); returns the summary."""
    import mlflow

    from features.store import read_examples
    from pipelines.train import challenge_rows
    from recsys_moe import registry, tracking

    old = mlflow.get_tracking_uri()
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        with tracking.Tracker.open(cfg, run_name) as tracker:
            tracker.log_model(bundle, read_examples(cfg.features.store_dir, "test").head(5))
            rows = challenge_rows(bundle, cfg.features.store_dir)
            return registry.register_and_promote(
                tracker,
                cfg,
                {"promote_metric": "valid/auc_mean", "valid_score": f"{metric:.6f}"},
                lambda version: registry.challenge(
                    bundle, rows, name=cfg.model_name, alias=cfg.serving.model_alias,
                    metric="valid/auc_mean", force=force, uri=uri,
                ),
            )  # fmt: skip
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
        mlflow.set_tracking_uri(old)


def live_log(cfg, out) -> str:
    """A raw log folder with the small log's video events relabelled as domain "live"."""
    import shutil

    import polars as pl

    raw = Path(cfg.data.raw_dir)
    inter = pl.read_parquet(raw / "interactions")
    live = inter.filter(pl.col("domain") == "video").with_columns(pl.lit("live").alias("domain"))
    (out / "interactions").mkdir(parents=True)
    live.write_parquet(out / "interactions" / "part-0.parquet")
    for t in ("users.parquet", "items.parquet"):
        shutil.copy(raw / t, out / t)
    return str(out)
