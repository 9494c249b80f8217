"""Domain slices: the part of a trained model one domain actually uses.

In STAR-style models (``arch = "star"``) every domain's gates may only pick the shared
experts and the domain's own; the other domains' experts get exactly zero weight. A
*domain slice* is a copy of the model that keeps only the experts the domain's gates can
reach and only that domain's gate rows, so a ranker serving one domain computes
``S + P`` experts instead of ``S + K * P``. For MMoE every gate can reach every expert, so
the slice keeps them all (and only saves the other domains' gate columns).

A slice scores rows of its own domain exactly like the full model (same weights, the
masked-out experts contributed exact zeros); it must not be given other domains' rows.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from recsys_moe.model.experts import StackedExperts
from recsys_moe.model.ranker import RankingModel
from recsys_moe.model.routing import GateBank


def active_experts(model: RankingModel, domain: int) -> list[int]:
    """The experts domain index ``domain``'s gates can give weight to (all, for a model
    without domain slices)."""
    if not model.supports_domain_slices:
        return list(range(getattr(model.experts, "n_experts", 0)))
    return model.core.reachable_experts(domain)


def _slice_experts(experts: StackedExperts, keep: torch.Tensor) -> StackedExperts:
    out = copy.deepcopy(experts)
    out.n_experts = len(keep)
    out.weights = nn.ParameterList(
        [nn.Parameter(w.detach()[keep].clone()) for w in experts.weights]
    )
    out.biases = nn.ParameterList([nn.Parameter(b.detach()[keep].clone()) for b in experts.biases])
    return out


def _slice_gates(gates: GateBank, domain: int, keep: torch.Tensor) -> GateBank:
    """Gate rows of one domain over the kept experts (a one-domain GateBank)."""
    k = domain if gates.K > 1 else 0
    O, K, E = gates.O, gates.K, gates.E
    out = copy.deepcopy(gates)
    out.K, out.E = 1, len(keep)

    def cut(t: torch.Tensor) -> torch.Tensor:  # (..., K*O*E) -> (..., O*E')
        lead = t.shape[:-1]
        return t.detach().reshape(*lead, K, O, E)[..., k, :, :][..., keep].reshape(*lead, -1)

    out.w = nn.Parameter(cut(gates.w).clone())
    out.b = nn.Parameter(cut(gates.b).clone())
    if gates.noise is not None:
        out.noise = nn.Parameter(cut(gates.noise).clone())
    out.mask = gates.mask[k : k + 1][:, :, keep].clone()
    return out


@torch.no_grad()
def domain_slice(model: RankingModel, domain: int) -> RankingModel:
    """A copy of ``model`` computing only the experts and gates domain index ``domain`` uses
    (the model itself, unchanged, where nothing can be cut: shared-bottom, PLE, a domain
    extended after training)."""
    if not model.supports_domain_slices or model.core.extension_of(domain) is not None:
        return model
    keep = torch.tensor(active_experts(model, domain), dtype=torch.long)
    return with_experts(
        model,
        _slice_experts(model.experts, keep),
        _slice_gates(model.gates, domain, keep),
        keep.tolist(),
    )


def with_experts(
    model: RankingModel, experts: nn.Module, gates: GateBank, active: list[int]
) -> RankingModel:
    """A one-domain copy of ``model`` sharing embeddings, towers and buffers, whose core
    has its own ``experts`` and ``gates`` (``active``: the global ids of those experts)."""
    core = copy.copy(model.core)
    core._modules = dict(model.core._modules)
    core._modules["experts"] = experts
    core._modules["gates"] = gates
    out = model.with_core(core)
    out.active = active
    return out


__all__ = ["active_experts", "domain_slice", "with_experts"]
