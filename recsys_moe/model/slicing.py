"""Domain slices: the part of a trained model one domain (and user segment) actually uses.

In STAR-style models (``arch = "star"``) every domain's gates may only pick the shared
experts and the domain's own; the other domains' experts get exactly zero weight. A
*domain slice* is a copy of the model that keeps only the experts the domain's gates can
reach and only that domain's gate rows, so a ranker serving one domain computes
``S + P`` experts instead of ``S + K * P``. For MMoE every gate can reach every expert, so
the slice keeps them all (and only saves the other domains' gate columns).

With user-segment experts (``model.expert_groups``), a slice can also be narrowed to the
users of some segments: a ranker serving cold users computes the shared experts, the
domain's and the cold segment's own, not the power users'.

A slice scores rows of its own domain (and segments) exactly like the full model (same
weights, the masked-out experts contributed exact zeros); it must not be given other
domains' (or segments') rows.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from recsys_moe.model.experts import StackedExperts
from recsys_moe.model.ranker import RankingModel
from recsys_moe.model.routing import GateBank


def active_experts(
    model: RankingModel, domain: int, segments: list[int] | None = None
) -> list[int]:
    """The experts domain index ``domain``'s gates (for users of ``segments``, None: any)
    can give weight to (all, for a model without domain slices)."""
    if not model.supports_domain_slices:
        return list(range(getattr(model.experts, "n_experts", 0)))
    return model.core.reachable_experts(domain, segments)


def pool_like(experts: StackedExperts, weights: list, biases: list) -> StackedExperts:
    """An expert pool computed as ``experts`` is (implementation, flags) over the given
    per-layer parameters (leading dimension: the experts). Parameters are registered as
    given, so a pool built from another's own parameters shares their storage."""
    out = copy.copy(experts)
    out._parameters, out._buffers = dict(experts._parameters), dict(experts._buffers)
    out._modules = dict(experts._modules)
    out.weights, out.biases = nn.ParameterList(weights), nn.ParameterList(biases)
    out.n_experts = int(weights[0].shape[0])
    # the inference caches belong to the pool they were made from
    out._layout, out._layout_key, out._split, out._auto_choice = None, None, {}, {}
    return out


def _slice_experts(experts: StackedExperts, keep: torch.Tensor) -> StackedExperts:
    """The experts ``keep`` of ``experts``: the pool's own parameters where it keeps them
    all (an MMoE domain reaches every expert: its slices share one pool), else copies of
    the kept rows."""
    if keep.tolist() == list(range(experts.n_experts)):
        return pool_like(experts, list(experts.weights), list(experts.biases))
    return pool_like(
        experts,
        [nn.Parameter(w.detach()[keep].clone()) for w in experts.weights],
        [nn.Parameter(b.detach()[keep].clone()) for b in experts.biases],
    )


def slice_gates(gates: GateBank, rows: list[int] | None, keep: torch.Tensor) -> GateBank:
    """Gate rows ``rows`` (routing keys; None: all, indexed as before) over the kept
    experts; one row makes a one-domain GateBank."""
    O, K, E = gates.O, gates.K, gates.E
    rows = list(range(K)) if rows is None else rows
    out = copy.deepcopy(gates)
    out.K, out.E = len(rows), len(keep)
    idx = torch.tensor(rows)

    def cut(t: torch.Tensor) -> torch.Tensor:  # (..., K*O*E) -> (..., K'*O*E')
        lead = t.shape[:-1]
        return t.detach().reshape(*lead, K, O, E)[..., idx, :, :][..., keep].reshape(*lead, -1)

    for (src, _), (dst, _) in zip(gates.channels(), out.channels(), strict=True):
        dst.data = cut(src).clone()
    if out.norm is not None:
        out.norm.num_features = out.norm.weight.numel()
    out.mask = gates.mask[idx][:, :, keep].clone()
    return out


@torch.no_grad()
def domain_slice(
    model: RankingModel, domain: int, segments: list[int] | None = None
) -> RankingModel:
    """A copy of ``model`` computing only the experts and gates domain index ``domain``
    uses (the model itself, unchanged, where nothing can be cut: shared-bottom, PLE, a
    domain extended after training). With user-segment experts, ``segments`` (segment
    indices; None: all) narrows it to the routing keys of those users: shared experts,
    the domain's and those segments' own; it keeps every key's gate row, and must only
    score rows of those segments (its ``segment_scope``)."""
    plan = slice_plan(model, domain, segments)
    if plan is None:
        return model
    keep, rows = plan
    out = with_experts(
        model, _slice_experts(model.experts, keep), slice_gates(model.gates, rows, keep),
        keep.tolist(),
    )  # fmt: skip
    out.segment_scope = (
        None if segments is None or not model.core.segment_keyed else sorted(segments)
    )
    return out


def slice_plan(
    model: RankingModel, domain: int, segments: list[int] | None = None
) -> tuple[torch.Tensor, list[int] | None] | None:
    """What :func:`domain_slice` keeps: the experts (global ids) and the gate rows (None:
    all); None where nothing can be cut."""
    core = model.core
    if not model.supports_domain_slices or core.extension_of(domain) is not None:
        return None
    keep = torch.tensor(active_experts(model, domain, segments), dtype=torch.long)
    # gates keyed by segment keep all rows (the slice computes each row's key as the
    # full model does); keyed by domain alone, the one row of the domain
    return keep, (None if core.segment_keyed else core.keys_of(domain))


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


__all__ = [
    "active_experts",
    "domain_slice",
    "pool_like",
    "slice_gates",
    "slice_plan",
    "with_experts",
]
