from __future__ import annotations

import pytest
import torch
from torch import nn

from recsys_moe.model.experts import GroupedExperts, LoopExperts, StackedExperts


@pytest.mark.parametrize(
    ("E", "d_in", "hidden", "B"),
    [(1, 5, [7], 3), (4, 16, [32, 8], 64), (3, 13, [11, 5, 3], 17), (8, 40, [64, 32], 1)],
)
def test_stacked_equals_loop_outputs_and_grads(E, d_in, hidden, B):
    torch.manual_seed(0)
    fast = StackedExperts(n_experts=E, d_in=d_in, hidden=hidden)
    ref = LoopExperts(n_experts=E, d_in=d_in, hidden=hidden).load_stacked(fast)
    x = torch.randn(B, d_in, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y_ref = fast(x), ref(x2)
    assert y.shape == (B, E, hidden[-1])
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    for layer, (w, b) in enumerate(zip(fast.weights, fast.biases, strict=True)):
        for e in range(E):
            lin = [m for m in ref.experts[e] if isinstance(m, nn.Linear)][layer]
            torch.testing.assert_close(w.grad[e], lin.weight.grad.T, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(b.grad[e], lin.bias.grad, rtol=1e-5, atol=1e-6)


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
