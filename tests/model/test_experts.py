from __future__ import annotations

import torch
from torch import nn

from recsys_moe.model.experts import GroupedExperts, StackedExperts


def test_single_expert_is_a_plain_mlp():
    torch.manual_seed(1)
    fast = StackedExperts(n_experts=1, d_in=6, hidden=[9, 4])
    mlp = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 4), nn.ReLU())
    with torch.no_grad():
        mlp[0].weight.copy_(fast.weights[0][0].T)
        mlp[0].bias.copy_(fast.biases[0][0])
        mlp[2].weight.copy_(fast.weights[1][0].T)
        mlp[2].bias.copy_(fast.biases[1][0])
    x = torch.randn(10, 6)
    torch.testing.assert_close(fast(x)[:, 0], mlp(x))


def test_grouped_experts_equal_per_group_stacked():
    torch.manual_seed(2)
    G, P, d, hidden = 3, 2, 7, [5, 4]
    grouped = GroupedExperts(n_groups=G, per_group=P, d_in=d, hidden=hidden)
    x = torch.randn(11, G, d)
    y = grouped(x)
    for g in range(G):
        s = StackedExperts(n_experts=P, d_in=d, hidden=hidden)
        with torch.no_grad():
            for i in range(len(hidden)):
                s.weights[i].copy_(grouped.weights[i][g])
                s.biases[i].copy_(grouped.biases[i][g])
        torch.testing.assert_close(y[:, g], s(x[:, g]), rtol=1e-5, atol=1e-6)
