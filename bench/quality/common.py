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
