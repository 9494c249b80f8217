"""Experts as stacked parameters, computed with batched ops; a loop reference beside them.

Every expert reads the same input, so the first layer of all ``E`` experts is ONE GEMM
of width ``E * h``; later layers are one batched matmul over the expert axis.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn


def _init_stacked(w: torch.Tensor, b: torch.Tensor) -> None:
    # nn.Linear's default init, per expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    bound = 1.0 / math.sqrt(w.shape[-2])
    nn.init.uniform_(w, -bound, bound)
    nn.init.uniform_(b, -bound, bound)


class StackedExperts(nn.Module):
    """``E`` MLP experts with weights ``[E, in, out]`` per layer, ReLU between layers.

    Args:
        n_experts: E.
        d_in: input width.
        hidden: layer widths; the last is the expert output width H.
        dropout: dropout after every hidden activation (training only).
        last_activation: apply ReLU after the last layer too (experts feed gates and towers).
    """

    def __init__(
        self,
        *,
        n_experts: int,
        d_in: int,
        hidden: list[int],
        dropout: float = 0.0,
        last_activation: bool = True,
    ) -> None:
        super().__init__()
        widths = [d_in, *hidden]
        self.n_experts, self.d_in, self.d_out = n_experts, d_in, widths[-1]
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.empty(n_experts, a, b)) for a, b in itertools.pairwise(widths)]
        )
        self.biases = nn.ParameterList(
            [nn.Parameter(torch.empty(n_experts, b)) for b in widths[1:]]
        )
        for w, b in zip(self.weights, self.biases, strict=True):
            _init_stacked(w, b)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.last_activation = last_activation

    def forward(self, x: torch.Tensor, need: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, d_in) -> (B, E, H). ``need`` (the experts each row was routed to) is for
        :class:`~recsys_moe.distributed.expert_parallel.ExpertParallel`'s interface: here
        every expert is one GEMM anyway, so all are computed."""
        E = self.n_experts
        w0, b0 = self.weights[0], self.biases[0]
        h = x @ w0.permute(1, 0, 2).reshape(self.d_in, -1) + b0.reshape(-1)  # (B, E*h1): one GEMM
        h = h.view(x.shape[0], E, -1)  # (B, E, h1)
        n = len(self.weights)
        for i in range(1, n):
            h = self.dropout(torch.relu(h))
            h = torch.einsum("beh,eho->beo", h, self.weights[i]) + self.biases[i]  # (B, E, h_i)
        return torch.relu(h) if self.last_activation else h


class GroupedExperts(nn.Module):
    """``G`` groups of ``P`` experts where group ``g`` reads its own input (PLE levels).

    x: (B, G, d_in) -> (B, G, P, H); one einsum per layer for all groups and experts.
    """

    def __init__(
        self, *, n_groups: int, per_group: int, d_in: int, hidden: list[int], dropout: float = 0.0
    ) -> None:
        super().__init__()
        widths = [d_in, *hidden]
        self.n_groups, self.per_group, self.d_out = n_groups, per_group, widths[-1]
        self.weights = nn.ParameterList(
            [
                nn.Parameter(torch.empty(n_groups, per_group, a, b))
                for a, b in itertools.pairwise(widths)
            ]
        )
        self.biases = nn.ParameterList(
            [nn.Parameter(torch.empty(n_groups, per_group, b)) for b in widths[1:]]
        )
        for w, b in zip(self.weights, self.biases, strict=True):
            _init_stacked(w, b)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.einsum("bgi,gpio->bgpo", x, self.weights[0]) + self.biases[0]  # (B, G, P, h1)
        for i in range(1, len(self.weights)):
            h = self.dropout(torch.relu(h))
            h = torch.einsum("bgpi,gpio->bgpo", h, self.weights[i]) + self.biases[i]
        return torch.relu(h)


class LoopExperts(nn.Module):
    """The reference: one ``nn.Sequential`` MLP per expert, evaluated in a Python loop."""

    def __init__(
        self, *, n_experts: int, d_in: int, hidden: list[int], last_activation: bool = True
    ) -> None:
        super().__init__()
        widths = [d_in, *hidden]
        self.experts = nn.ModuleList()
        for _ in range(n_experts):
            layers: list[nn.Module] = []
            for i, (a, b) in enumerate(itertools.pairwise(widths)):
                layers.append(nn.Linear(a, b))
                if i < len(widths) - 2 or last_activation:
                    layers.append(nn.ReLU())
            self.experts.append(nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([e(x) for e in self.experts], dim=1)  # (B, E, H)

    @torch.no_grad()
    def load_stacked(self, stacked: StackedExperts) -> LoopExperts:
        """Copy a :class:`StackedExperts`' weights, expert by expert."""
        for e, mlp in enumerate(self.experts):
            linears = [m for m in mlp if isinstance(m, nn.Linear)]
            for lin, w, b in zip(linears, stacked.weights, stacked.biases, strict=True):
                lin.weight.copy_(w[e].T)
                lin.bias.copy_(b[e])
        return self
