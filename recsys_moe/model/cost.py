"""What one forward pass costs per sample, counted from the weights (the model reporting
its own work, as nanoGPT's ``estimate_mfu``): ``bench/kernels.py`` divides it by measured
time for achieved GFLOP/s and GB/s against the machine's peaks."""

from __future__ import annotations

from recsys_moe.model.inputs import Batch
from recsys_moe.model.ranker import RankingModel


def forward_cost(model: RankingModel, batch: Batch) -> dict[str, float]:
    """Per-sample work of one forward pass of a dense (softmax-gated) MMoE ``model`` on
    ``batch``: GEMM FLOPs by part (2 per weight of every expert, gate and tower, since each
    sample passes through all of them; the combine's 2 * O * E * H; the crosses' selection
    matmul and product) and the embedding bytes gathered (float32 rows looked up)."""
    D = model.cfg.embedding_dim
    n_sel = model._cross.numel()  # 2 * P * F selection weights
    flops = {
        "experts": 2.0 * sum(w.numel() for w in model.experts.weights),
        "gates": 2.0 * model.gates.w.numel(),
        "combine": 2.0 * model.core.outputs * model.experts.n_experts * model.experts.d_out,
        "towers": 2.0
        * (sum(p.numel() for p in model.towers.mlp.weights) + model.towers.out_w.numel()),
        "crosses": 2.0 * n_sel * D + model._cross.shape[1] * D,
    }
    B = batch.labels.shape[0]
    lookups = batch.sparse.values().numel() / B
    tables = sum(p.numel() for p in model.embedding.parameters())
    return {**flops, "flops": sum(flops.values()), "gather_bytes": lookups * D * 4.0,
            "lookups": lookups, "table_params": float(tables), "B": float(B)}  # fmt: skip


__all__ = ["forward_cost"]
