"""Helpers for the quality scripts: spec/tensors for dense-only experiments, tables."""

from __future__ import annotations

import numpy as np
import polars as pl

from recsys_moe.model.inputs import DenseFeature, ExampleTensors, InputSpec, SparseFeature, Task


def dense_spec(n_features: int, tasks: list[tuple[str, str]]) -> InputSpec:
    """An input spec with only numeric features (already standardised) and one domain.

    The single categorical feature is the (constant) domain, so the model's embedding
    part is a bias and all signal comes through the dense features.
    """
    return InputSpec(
        sparse=[SparseFeature("domain", "cat__domain", 2, False)],
        dense=[DenseFeature(f"x{i}", f"num__x{i}", 0.0, 1.0) for i in range(n_features)],
        tasks=[Task(name, kind, "", 1.0, f"label__{name}") for name, kind in tasks],
        domain_column="cat__domain",
        domains=["all"],
    )


def dense_tensors(spec: InputSpec, x: np.ndarray, y: np.ndarray) -> ExampleTensors:
    cols = {"cat__domain": np.ones(len(x), dtype=np.int32)}
    cols |= {f.column: x[:, i].astype(np.float32) for i, f in enumerate(spec.dense)}
    cols |= {t.column: y[:, i].astype(np.float32) for i, t in enumerate(spec.tasks)}
    return ExampleTensors(spec, pl.DataFrame(cols))


def fmt_mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.4f} ± {np.std(values):.4f}"


BENCH_OUT = "bench/out"


def train_as_cli(
    cfg, output, progress: bool = True, *, tracking: str | None = None, **run: object
) -> dict:
    """What ``recsys-moe train`` runs (:func:`pipelines.train.run_training`, the default
    worker layout, Ray Train, the same test metrics and bundle), without the registry: the
    run goes to a bench-local MLflow store and checkpoints under ``bench/out``, never to
    the user's. The quality benchmarks judge models with it, so their figures are the
    ones a user gets. ``tracking``: another bench-local MLflow store; ``run``: more of
    run_training's arguments (``register=True``, ``warm_start=...``). Returns the run's
    summary plus ``train_rows``."""
    import dataclasses
    import os
    from pathlib import Path

    from features.store import load_manifest
    from pipelines.train import run_training

    out = Path(BENCH_OUT).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = cfg.replace(
        training=dataclasses.replace(cfg.training, checkpoint_dir=str(out / "checkpoints"))
    )
    user_uri = os.environ.get("MLFLOW_TRACKING_URI")
    # even where one is set
    os.environ["MLFLOW_TRACKING_URI"] = tracking or f"sqlite:///{out}/mlflow.db"
    try:
        summary = run_training(cfg, workers=cfg.training.workers, output=output,
                               progress=progress, **{"register": False, **run})  # fmt: skip
    finally:
        if user_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = user_uri
    manifest = load_manifest(cfg.features.store_dir)
    summary["train_rows"] = int(manifest["splits"]["rows"]["train"])
    return summary
