"""A tiny model and batch with no feature store, for multi-process tests (importable by
spawned processes)."""

from __future__ import annotations

import numpy as np
import polars as pl

from recsys_moe.config import ModelConfig
from recsys_moe.model.inputs import DenseFeature, ExampleTensors, InputSpec, SparseFeature, Task

SPEC = InputSpec(
    sparse=[
        SparseFeature("user_id", "cat__user_id", 50, False),
        SparseFeature("item_id", "cat__item_id", 40, False),
        SparseFeature("domain", "cat__domain", 4, False),
        SparseFeature("tags", "cat__tags", 12, True),
        SparseFeature("user_segment", "cat__user_segment", 4, False, "derived"),
    ],
    dense=[
        DenseFeature("price", "num__price", 1.0, 2.0),
        DenseFeature("cnt", "num__cnt", 0.0, 1.0),
    ],
    tasks=[
        Task("click", "binary", "", 1.0, "label__click"),
        Task("like", "binary", "", 0.5, "label__like"),
        Task("conversion", "binary", "click", 1.0, "label__conversion"),
    ],
    domain_column="cat__domain",
    domains=["feed", "search", "video"],
)


def model_config(**kw) -> ModelConfig:
    base = dict(
        arch="mmoe",
        embedding_dim=8,
        n_experts=4,
        expert_hidden=[16, 8],
        tower_hidden=[8],
        interactions=["user_id*item_id"],
        aux_loss_coef=0.0,
    )
    return ModelConfig(**{**base, **kw})


def examples(n: int, seed: int = 1) -> ExampleTensors:
    rng = np.random.default_rng(seed)
    click = rng.integers(0, 2, n)
    df = pl.DataFrame(
        {
            "cat__user_id": rng.integers(0, 50, n),
            "cat__item_id": rng.integers(0, 40, n),
            "cat__domain": rng.integers(1, 4, n),
            "cat__tags": [list(rng.integers(0, 12, rng.integers(0, 4))) for _ in range(n)],
            "cat__user_segment": rng.integers(1, 4, n),
            "num__price": rng.normal(1, 2, n),
            "num__cnt": rng.normal(0, 1, n),
            "label__click": click.astype(np.float32),
            "label__like": rng.integers(0, 2, n).astype(np.float32),
            "label__conversion": (click * rng.integers(0, 2, n)).astype(np.float32),
        },
        schema_overrides={"cat__tags": pl.List(pl.Int64)},
    )
    return ExampleTensors(SPEC, df)
