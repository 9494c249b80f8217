"""Gates and routing.

All gate logits of a layer come from ONE GEMM: ``x @ W`` with ``W: [d_in, G * E]``. A gate
is one (task, domain) pair (MMoE), one task, or a single gate shared by every task; each
example then reads the gates of its own domain. A boolean mask ``[G, E]`` says which
experts a gate may use (PLE's shared + task experts, the domain's own experts).

Routing turns logits into combine weights ``(B, T, E)`` (zeros where an expert is not used):

- ``softmax``: dense MMoE weights;
- ``topk``: the k best experts, weights renormalised over them; each expert takes at most
  ``capacity = ceil(capacity_factor * B * k / E)`` tokens per gate, the lowest-scored
  assignments beyond it are dropped (weight 0) and counted. Capacity applies in training
  only: at inference every token keeps its k experts, so a score never depends on what
  else is in the batch (a ranking service must not change a score with its batch);
- ``noisy_topk``: top-k on logits plus learned Gaussian noise (training only);
- ``expert_choice``: each expert picks its ``capacity = ceil(capacity_factor * B / E)``
  best tokens (load exactly balanced). It depends on the batch, so at inference
  (``eval()``) it falls back to token-choice top-k on the same scores.

Regularisers (returned, the trainer weighs them): the Switch-Transformer load-balancing
loss ``E * sum_e f_e * P_e`` (f = fraction of assignments, P = mean probability; 1.0 when
uniform) and the router z-loss ``mean(logsumexp(logits)^2)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from recsys_moe.model.experts import batch_norm_rows, freeze_frozen_norms

NEG_INF = float("-inf")


@dataclass
class RouteOut:
    """Combine weights and everything observability and losses need."""

    weights: torch.Tensor  # (B, T, E) combine weights
    probs: torch.Tensor  # (B, T, E) router probabilities (softmax over allowed experts)
    aux_loss: torch.Tensor  # scalar (0 when not asked for: route(losses=False))
    z_loss: torch.Tensor  # scalar (likewise)
    dropped_fraction: torch.Tensor  # scalar, share of top-k assignments dropped by capacity


@dataclass
class GateLayer:
    """The routing of one gate layer, for losses and observability."""

    name: str  # "gates", "level0", ...
    outputs: list[str]  # what each gate output feeds: task names, or "shared"
    route: RouteOut
    # (B,) bool: the rows these gates routed (the others belong to an extension added
    # later by `recsys-moe extend`, which routes them itself); None: every row
    rows: torch.Tensor | None = None
    # (B,) the gate row (routing key) each row used, where it is not the row's domain
    # (gates keyed by domain x user segment); None: the domain
    keys: torch.Tensor | None = None


class GateBank(nn.Module):
    """Gate logits for O outputs x K domains over E experts; one GEMM (or one einsum when
    every output reads its own input, as in PLE)."""

    def __init__(
        self,
        *,
        d_in: int,
        n_outputs: int,
        n_domains: int,
        n_experts: int,
        per_output_input: bool = False,
        mask: torch.Tensor | None = None,
        noisy: bool = False,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        self.O, self.K, self.E = n_outputs, n_domains, n_experts
        n_in = n_outputs if per_output_input else 1
        width = n_domains * n_experts * (1 if per_output_input else n_outputs)
        self.w = nn.Parameter(torch.randn(n_in, d_in, width) * 0.01)
        self.b = nn.Parameter(torch.zeros(n_in, width))
        self.noise = nn.Parameter(torch.zeros(n_in, d_in, width)) if noisy else None
        full = torch.ones(n_domains, n_outputs, n_experts, dtype=torch.bool)
        self.register_buffer(
            "mask", full if mask is None else mask.expand_as(full).clone(), persistent=False
        )
        self.per_output_input = per_output_input
        # batch_norm: every gate logit normalised over the batch before routing (running
        # statistics in eval mode), Linear -> BatchNorm -> softmax as torch-rechub's gates;
        # one channel per logit, laid out as the bias (..., K*O*E)
        self.norm = nn.BatchNorm1d(n_in * width) if batch_norm else None

    def train(self, mode: bool = True) -> GateBank:
        super().train(mode)
        freeze_frozen_norms(self.norm)
        return self

    @property
    def offset(self) -> torch.Tensor:
        """The per-logit offset (..., K*O*E): the norm's bias where the gates are normed
        (the linear bias is normalised away), else the linear bias."""
        return self.norm.bias if self.norm is not None else self.b

    def channels(self) -> list[tuple[torch.Tensor, str]]:
        """Every tensor with one entry per logit along its last axis ``(..., K*O*E)``, and
        its kind: "w" (weights), "b" (an offset), "scale" (the norm's gain) or "stat" (the
        norm's running statistics); what slicing, revival and growth cut or copy."""
        out = [(self.w, "w"), (self.b, "b")]
        if self.noise is not None:
            out.append((self.noise, "w"))
        if self.norm is not None:
            n = self.norm
            out += [(n.weight, "scale"), (n.bias, "b"), (n.running_mean, "stat"),
                    (n.running_var, "stat")]  # fmt: skip
        return out

    def _normed(self, z: torch.Tensor) -> torch.Tensor:
        return z if self.norm is None else batch_norm_rows(self.norm, z)

    def _project(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        b: torch.Tensor | None,
        domain: torch.Tensor,
        norm: bool = False,
    ) -> torch.Tensor:
        B = x.shape[0]
        if self.per_output_input:  # x: (B, O, d)
            z = torch.einsum("bod,odw->bow", x, w)  # (B, O, K*E)
            z = z if b is None else z + b
            z = self._normed(z) if norm else z
            z = z.view(B, self.O, self.K, self.E).transpose(1, 2)  # (B, K, O, E)
        else:  # x: (B, d)
            z = x @ w[0] if b is None else x @ w[0] + b[0]  # all gates: one GEMM
            z = self._normed(z) if norm else z
            z = z.view(B, self.K, self.O, self.E)
        idx = domain.view(B, 1, 1, 1).expand(B, 1, self.O, self.E)
        return z.gather(1, idx).squeeze(1)  # (B, O, E): the example's own domain's gates

    def forward(
        self, x: torch.Tensor, domain: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        logits = self._project(x, self.w, self.b, domain, norm=True)
        std = None
        if self.noise is not None:
            std = F.softplus(self._project(x, self.noise, None, domain))
        return logits, std, self.mask[domain]


def _masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the allowed experts (last axis), computed expert-major: on CPU,
    torch.softmax over a short last axis (E = 8) vectorises poorly, over the leading
    axis of the transposed copy it runs across rows; the order of every sum is fixed, so
    a row's weights do not depend on where its tensor sits in memory."""
    z = logits.masked_fill(~mask, NEG_INF)
    return torch.softmax(z.movedim(-1, 0).contiguous(), dim=0).movedim(0, -1)


def z_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits.masked_fill(~mask, NEG_INF), dim=-1).pow(2).mean()


def load_balancing_loss(
    assign: torch.Tensor, probs: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Switch loss per gate, averaged: ``E_allowed * sum_e f_e * P_e`` (1.0 when uniform).

    assign: (B, O, E) 0/1 assignments (before capacity drops); probs: (B, O, E).
    """
    n_allowed = mask.float().sum(-1).mean(0)  # (O,)
    f = assign.float().mean(0) / assign.float().sum(-1).mean(0).clamp_min(1e-9).unsqueeze(
        -1
    )  # (O, E)
    p = probs.mean(0)  # (O, E)
    return (n_allowed * (f * p).sum(-1)).mean()


def apply_capacity(scores: torch.Tensor, assign: torch.Tensor, capacity: int) -> torch.Tensor:
    """Keep at most ``capacity`` assignments per (gate, expert), highest scores first.

    scores, assign: (B, O, E) -> kept assignments (B, O, E) bool.
    """
    B = scores.shape[0]
    if capacity >= B:
        return assign
    s = scores.masked_fill(~assign, NEG_INF)
    top = s.topk(capacity, dim=0).indices  # (C, O, E): best tokens per expert
    keep = torch.zeros_like(assign)
    keep.scatter_(0, top, True)
    return keep & assign


def route(
    logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: str,
    top_k: int = 2,
    capacity_factor: float = 1.25,
    noise_std: torch.Tensor | None = None,
    training: bool = False,
    losses: bool = True,
) -> RouteOut:
    """Combine weights from gate logits. logits, mask: (B, O, E). Routing is computed in
    float32 whatever the logits' dtype (bf16 under ``training.precision``). ``losses``
    False skips the regularisers (their coefficients are 0): aux_loss and z_loss are 0."""
    logits = logits.float()
    B, _, E = logits.shape
    zero = logits.new_zeros(())
    zl = z_loss(logits, mask) if losses else zero
    n_allowed = int(mask[0].sum(-1).min().item()) if B else E
    if mode == "softmax":
        probs = _masked_softmax(logits, mask)
        if not losses:
            return RouteOut(probs, probs, zero, zl, zero)
        assign = F.one_hot(probs.argmax(-1), E).bool()
        return RouteOut(probs, probs, load_balancing_loss(assign, probs, mask), zl, zero)
    if mode == "noisy_topk" and training and noise_std is not None:
        logits = logits + torch.randn_like(logits) * noise_std
    probs = _masked_softmax(logits, mask)
    if mode == "expert_choice" and training:
        capacity = min(B, math.ceil(capacity_factor * B / max(n_allowed, 1)))
        allowed = mask.clone()
        keep = apply_capacity(probs, allowed, capacity)
        weights = probs * keep
        return RouteOut(weights, probs, zero, zl, zero)
    if mode not in ("topk", "noisy_topk", "expert_choice"):
        raise ValueError(f"unknown routing mode {mode!r}")
    k = min(top_k, n_allowed)
    top = logits.masked_fill(~mask, NEG_INF).topk(k, dim=-1).indices  # (B, O, k)
    assign = torch.zeros_like(mask).scatter_(-1, top, True)
    aux = load_balancing_loss(assign, probs, mask) if losses else zero
    if training:
        capacity = math.ceil(capacity_factor * B * k / max(n_allowed, 1))
        kept = apply_capacity(probs, assign, capacity)
    else:
        kept = assign
    dropped = (assign & ~kept).sum().float() / assign.sum().clamp_min(1).float()
    sel = probs * assign
    weights = sel / sel.sum(-1, keepdim=True).clamp_min(1e-9) * kept  # renormalised over the k
    return RouteOut(weights, probs, aux, zl, dropped)
