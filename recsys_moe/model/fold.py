"""Folded first expert layer for inference (issue 5, item 4).

The first expert layer is linear in each pooled embedding: for feature f with table
``T_f`` (V_f, D) and the first layer's rows for it ``W1[:, f]`` (E, D, h1),
``pool(T_f[bag]) @ W1[:, f] = pool((T_f @ W1[:, f])[bag])``. So ``P_f = T_f @ W1[:, f]``
(V_f, E*h1) can be computed once, and at inference the embedding lookup plus the largest
GEMM of the model become one embedding-bag per feature over ``P_f``; only the crosses and
the dense features still go through a (small) GEMM. It trades FLOPs (``2 * F*D * E*h1``
per row) for gathered bytes (``4 * F * E*h1`` per row) and memory (``sum V_f * E*h1``
floats): it pays where the vocabularies are small and the first layer is wide relative to
D. ``bench/kernels.py`` measures it; the model does not use it by default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from recsys_moe.model.inputs import Batch
from recsys_moe.model.ranker import RankingModel


class FoldedFirstLayer:
    """The first layer's pre-activation (B, E, h1) of ``model.experts`` from a batch, with
    the embedding part folded into per-feature tables."""

    @torch.no_grad()
    def __init__(self, model: RankingModel) -> None:
        if model.input_norm is not None:
            raise ValueError(
                "a folded first layer needs a first layer linear in each embedding: "
                'model.input_norm = "none"'
            )
        ex = model.experts
        W1, self.b1 = ex.weights[0].detach(), ex.biases[0].detach()  # (E, d_in, h1), (E, h1)
        self.E, self.h1 = W1.shape[0], W1.shape[2]
        D = model.cfg.embedding_dim
        self.model = model
        self.tables, self.modes = [], []
        bags = model.embedding.ebc.embedding_bags
        for i, f in enumerate(model.spec.sparse):
            T = bags[f"t_{f.name}"].weight.detach()  # (V, D)
            w = W1[:, i * D : (i + 1) * D, :]  # (E, D, h1)
            self.tables.append(torch.einsum("vd,edh->veh", T, w).reshape(T.shape[0], -1))
            self.modes.append("mean" if f.multi_valued else "sum")
        start = len(model.spec.sparse) * D
        self.rest = W1[:, start:, :].permute(1, 0, 2).reshape(W1.shape[1] - start, -1)
        self.names = [f.name for f in model.spec.sparse]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tables)

    @torch.no_grad()
    def __call__(self, batch: Batch) -> torch.Tensor:
        kjt = batch.sparse
        out = None
        for name, table, mode in zip(self.names, self.tables, self.modes, strict=True):
            jt = kjt[name]
            part = F.embedding_bag(jt.values(), table, jt.offsets()[:-1], mode=mode)
            out = part if out is None else out + part
        rest = self._rest_inputs(batch)
        if rest.shape[1]:
            out = out + rest @ self.rest
        return out.view(-1, self.E, self.h1) + self.b1

    def _rest_inputs(self, batch: Batch) -> torch.Tensor:
        """The crosses and dense features (what follows the embeddings in x)."""
        m = self.model
        parts = []
        if m._cross.shape[1]:
            emb = m.embedding(batch.sparse)
            sides = m.cross_sides(emb.view(emb.shape[0], -1, m.cfg.embedding_dim))
            parts.append((sides[0] * sides[1]).flatten(1))
        parts.append(batch.dense)
        return torch.cat(parts, dim=1)


@torch.no_grad()
def first_layer_reference(model: RankingModel, batch: Batch) -> torch.Tensor:
    """The unfolded first-layer pre-activation (B, E, h1)."""
    x = model.inputs(batch)
    return torch.einsum("bd,edh->beh", x, model.experts.weights[0]) + model.experts.biases[0]


__all__ = ["FoldedFirstLayer", "first_layer_reference"]
