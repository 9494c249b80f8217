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


def test_batch_normed_experts_are_torch_rechubs_mlp_in_training_and_evaluation():
    """batch_norm=True: each expert is Linear -> BatchNorm -> ReLU per layer (torch-rechub's
    MLP): the same outputs and running statistics in training; in evaluation (the norms
    folded into the weights without autograd, eager with it) the same outputs, and a
    change of the statistics after evaluation is seen by the next one."""
    torch.manual_seed(3)
    E, d, hidden = 3, 6, [9, 4]
    fast = StackedExperts(n_experts=E, d_in=d, hidden=hidden, batch_norm=True)
    mlps = []
    for e in range(E):
        layers = []
        for i, (a, b) in enumerate(zip([d, *hidden[:-1]], hidden, strict=True)):
            lin = nn.Linear(a, b)
            with torch.no_grad():
                lin.weight.copy_(fast.weights[i][e].T)
                lin.bias.copy_(fast.biases[i][e])
            layers += [lin, nn.BatchNorm1d(b), nn.ReLU()]
        mlps.append(nn.Sequential(*layers))

    def reference(x):
        return torch.stack([m(x) for m in mlps], dim=1)

    x = torch.randn(32, d) * 2 + 1
    for _ in range(3):  # training: batch statistics, running ones updated alike
        fast.train(), [m.train() for m in mlps]
        torch.testing.assert_close(fast(x), reference(x), rtol=1e-5, atol=1e-5)
    for i, h in enumerate(hidden):
        got = fast.norms[i].running_var.view(E, h)
        want = torch.stack([mlps[e][3 * i + 1].running_var for e in range(E)])
        torch.testing.assert_close(got, want)
    fast.eval(), [m.eval() for m in mlps]
    y = torch.randn(5, d)
    torch.testing.assert_close(fast(y), reference(y), rtol=1e-5, atol=1e-5)  # eager
    with torch.no_grad():
        torch.testing.assert_close(fast(y), reference(y), rtol=1e-5, atol=1e-5)  # folded
        fast.norms[0].running_mean.add_(0.5)
        for e in range(E):
            mlps[e][1].running_mean.add_(0.5)
        torch.testing.assert_close(fast(y), reference(y), rtol=1e-5, atol=1e-5)
