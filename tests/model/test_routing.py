from __future__ import annotations

import math

import pytest
import torch

from recsys_moe.model.routing import GateBank, apply_capacity, load_balancing_loss, route, z_loss


def logits(B=256, O=2, E=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, O, E, generator=g), torch.ones(B, O, E, dtype=torch.bool)


@pytest.mark.parametrize("k", [1, 2])
def test_topk_picks_exactly_k(k):
    lg, mask = logits()
    r = route(lg, mask, mode="topk", top_k=k, training=False)
    assert ((r.weights > 0).sum(-1) == k).all()
    torch.testing.assert_close(r.weights.sum(-1), torch.ones(256, 2))
    # the k picked are the k largest logits
    picked = r.weights.topk(k, dim=-1).indices.sort(-1).values
    assert torch.equal(picked, lg.topk(k, dim=-1).indices.sort(-1).values)
    assert float(r.dropped_fraction) == 0.0


@pytest.mark.parametrize("k", [1, 2])
def test_capacity_respected_and_drops_counted(k):
    lg, mask = logits(B=200, E=4)
    lg[:, :, 0] += 3.0  # most tokens want expert 0
    cf = 1.0
    r = route(lg, mask, mode="topk", top_k=k, capacity_factor=cf, training=True)
    capacity = math.ceil(cf * 200 * k / 4)
    per_expert = (r.weights > 0).sum(0)  # (O, E)
    assert (per_expert <= capacity).all()
    assigned = 200 * 2 * k
    kept = int((r.weights > 0).sum())
    assert float(r.dropped_fraction) == pytest.approx((assigned - kept) / assigned)
    assert float(r.dropped_fraction) > 0.2


def test_capacity_keeps_highest_scores():
    scores = torch.tensor([[[0.9]], [[0.1]], [[0.5]], [[0.7]]])
    assign = torch.ones(4, 1, 1, dtype=torch.bool)
    kept = apply_capacity(scores, assign, 2).flatten().tolist()
    assert kept == [True, False, False, True]


def test_expert_choice_load_is_exactly_balanced():
    lg, mask = logits(B=120, E=6)
    r = route(lg, mask, mode="expert_choice", capacity_factor=1.0, training=True)
    per_expert = (r.weights > 0).sum(0)
    assert (per_expert == 20).all()


def test_noisy_gating_only_in_training():
    torch.manual_seed(0)
    gates = GateBank(d_in=4, n_outputs=2, n_domains=1, n_experts=5, noisy=True)
    with torch.no_grad():
        gates.noise.fill_(0.5)
    x, dom = torch.randn(64, 4), torch.zeros(64, dtype=torch.long)
    lg, std, mask = gates(x, dom)
    assert std is not None and (std > 0).all()
    eval_a = route(lg, mask, mode="noisy_topk", noise_std=std, training=False).weights
    eval_b = route(lg, mask, mode="noisy_topk", noise_std=std, training=False).weights
    assert torch.equal(eval_a, eval_b)
    train_a = route(
        lg, mask, mode="noisy_topk", noise_std=std, training=True, capacity_factor=8
    ).weights
    assert not torch.equal(train_a, eval_a)


def test_load_balancing_loss_uniform_vs_collapsed():
    B, E = 400, 4
    mask = torch.ones(B, 1, E, dtype=torch.bool)
    uniform_assign = torch.nn.functional.one_hot(torch.arange(B) % E, E).bool().view(B, 1, E)
    uniform = load_balancing_loss(uniform_assign, torch.full((B, 1, E), 1 / E), mask)
    collapsed_p = torch.zeros(B, 1, E)
    collapsed_p[..., 0] = 1.0
    collapsed = load_balancing_loss(collapsed_p.bool(), collapsed_p, mask)
    assert float(uniform) == pytest.approx(1.0)
    assert float(collapsed) == pytest.approx(float(E))
    lg, m = logits(E=E)
    assert float(route(lg, m, mode="softmax").aux_loss) >= 1.0 - 1e-6


def test_z_loss_value():
    lg = torch.tensor([[[0.0, 0.0]]])
    assert float(z_loss(lg, torch.ones_like(lg, dtype=torch.bool))) == pytest.approx(
        math.log(2) ** 2
    )


def test_masks_and_domains():
    """Each example reads its own domain's gates; masked experts get zero weight."""
    K, O, E = 3, 2, 6
    mask = torch.zeros(K, 1, E, dtype=torch.bool)
    mask[:, :, :2] = True
    for k in range(K):
        mask[k, :, 2 + k * 1 : 3 + k * 1] = True
    gates = GateBank(d_in=5, n_outputs=O, n_domains=K, n_experts=E, mask=mask)
    x = torch.randn(30, 5)
    dom = torch.arange(30) % K
    lg, _, m = gates(x, dom)
    for mode in ("softmax", "topk", "expert_choice"):
        w = route(lg, m, mode=mode, training=True).weights
        for k in range(K):
            rows = w[dom == k]
            assert (rows[..., ~mask[k, 0]] == 0).all(), mode
    # logits of example i equal that of its domain's slice of the full GEMM
    full = (x @ gates.w[0] + gates.b[0]).view(30, K, O, E)
    torch.testing.assert_close(lg, full[torch.arange(30), dom])
