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


def train_single(cfg, output, progress: bool = True) -> dict:
    """One process, no Ray and no MLflow: the library's ``fit`` on the store, test metrics,
    the bundle written to ``output``. The quality benchmarks compare models with it on
    equal terms."""
    import json
    import os
    import time
    from pathlib import Path

    import torch

    from features.store import load_manifest, read_examples
    from pipelines.train import oracle_metrics, slice_metrics, table
    from recsys_moe.bundle import write_bundle
    from recsys_moe.model.ranker import RankingModel
    from recsys_moe.training import evaluate_model, fit

    torch.set_num_threads(max(1, min(os.cpu_count() or 1, 4)))
    store = cfg.features.store_dir
    manifest = load_manifest(store)
    spec = InputSpec.from_manifest(manifest)
    train = ExampleTensors(spec, read_examples(store, "train"))
    valid = ExampleTensors(spec, read_examples(store, "valid"))
    test_df = read_examples(store, "test")
    test = ExampleTensors(spec, test_df)
    torch.manual_seed(cfg.training.seed)
    model = RankingModel(spec, cfg.model)
    started = time.perf_counter()
    res = fit(model, train, valid, cfg.training,
              metric=cfg.training.promote_metric.removeprefix("valid/"), progress=progress)  # fmt: skip
    users = test_df[manifest["keys"]["user_id"]].to_numpy()
    test_metrics, preds = evaluate_model(model, test, users=users)
    test_metrics |= slice_metrics(store, manifest, test, preds)  # cold users, segments
    oracle = oracle_metrics(cfg, test_df, test, spec)
    out = write_bundle(model, output, manifest, store=store,
                       extra={"config": cfg.to_dict(), "valid": res.valid, "test": test_metrics})  # fmt: skip
    summary = {
        "model_dir": str(Path(out).resolve()),
        "best_epoch": res.best_epoch,
        "train_rows": len(train),
        "seconds": round(time.perf_counter() - started, 1),
        "samples_per_s": round(res.samples_per_s),
        "valid": res.valid,
        "test": test_metrics,
        "oracle": oracle,
        "router": res.router,
    }
    (Path(out) / "metrics.json").write_text(json.dumps(summary, indent=2, default=float))
    if progress:
        print(table(spec, test_metrics, oracle), flush=True)
    return summary
