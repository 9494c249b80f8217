"""Every expert implementation equals the per-expert loop reference, in outputs and in
the gradients of inputs and parameters, across shapes (odd sizes, E = 1, one row, one or
three layers, with and without the last activation)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from recsys_moe.model.experts import EXPERT_IMPLS, LoopExperts, StackedExperts

EAGER = ["bmm", "concat", "blockdiag", "fused", "auto"]
SHAPES = [  # (B, E, d_in, hidden, last_activation)
    (64, 8, 32, [16, 8], True),
    (7, 3, 13, [5, 11], True),
    (1, 1, 9, [4], True),
    (33, 5, 17, [9, 7, 3], False),
    (0, 4, 6, [5, 3], True),
    (3, 1, 5, [7], True),
    (17, 3, 13, [11, 5, 3], True),
    (1, 8, 40, [64, 32], True),
]


def _pair(B, E, d, hidden, last, impl):
    torch.manual_seed(0)
    st = StackedExperts(n_experts=E, d_in=d, hidden=hidden, last_activation=last, impl=impl)
    ref = LoopExperts(n_experts=E, d_in=d, hidden=hidden, last_activation=last).load_stacked(st)
    x = torch.randn(B, d, dtype=torch.float32)
    return st, ref, x


@pytest.mark.parametrize("impl", EAGER)
@pytest.mark.parametrize(("B", "E", "d", "hidden", "last"), SHAPES)
def test_impl_equals_loop_reference(impl, B, E, d, hidden, last):
    st, ref, x = _pair(B, E, d, hidden, last, impl)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, want = st(x1), ref(x2)
    assert out.shape == (B, E, hidden[-1])
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (want * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
    linears = [[m for m in mlp if isinstance(m, torch.nn.Linear)] for mlp in ref.experts]
    for layer, (w, b) in enumerate(zip(st.weights, st.biases, strict=True)):
        for e in range(E):
            torch.testing.assert_close(
                w.grad[e], linears[e][layer].weight.grad.T, rtol=1e-4, atol=1e-5
            )
            torch.testing.assert_close(b.grad[e], linears[e][layer].bias.grad, rtol=1e-4, atol=1e-5)


def test_functional_loop_equals_module_loop():
    st, ref, x = _pair(9, 4, 10, [6, 5], True, "loop")
    torch.testing.assert_close(st(x), ref(x), rtol=1e-6, atol=1e-7)


def test_unknown_impl_is_refused():
    with pytest.raises(ValueError, match="expert implementation"):
        StackedExperts(n_experts=2, d_in=3, hidden=[2], impl="fast")
    assert set(EAGER) | {"loop", "compiled"} == set(EXPERT_IMPLS)


@pytest.mark.slow
def test_compiled_equals_reference_forward_and_backward():
    st, ref, x = _pair(32, 4, 12, [8, 6], True, "compiled")
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, want = st(x1), ref(x2)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    out.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)


def test_model_scores_do_not_depend_on_the_impl(small_store):
    from features.store import load_manifest, read_examples
    from recsys_moe.model.inputs import ExampleTensors, InputSpec
    from recsys_moe.model.ranker import RankingModel
    from recsys_moe.training import predict

    cfg, _ = small_store
    store = cfg.features.store_dir
    spec = InputSpec.from_manifest(load_manifest(store))
    data = ExampleTensors(spec, read_examples(store, "test").head(500))
    torch.manual_seed(0)
    base = RankingModel(spec, dataclasses.replace(cfg.model, expert_hidden=[16, 8])).eval()
    want = predict(base, data, 128)
    for impl in ("loop", "bmm", "blockdiag", "fused", "auto"):
        m = RankingModel(spec, dataclasses.replace(base.cfg, expert_impl=impl)).eval()
        m.load_state_dict(base.state_dict())
        torch.testing.assert_close(
            torch.from_numpy(predict(m, data, 128)), torch.from_numpy(want), rtol=1e-5, atol=1e-6
        )


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@pytest.mark.parametrize(("B", "E", "d", "hidden", "last"), SHAPES[:4])
def test_fused_in_bf16_follows_the_reference(B, E, d, hidden, last):
    """training.precision = "bf16": the fused experts on a bfloat16 input run every GEMM in
    bfloat16. They equal the loop under torch.autocast (same precision) up to summation
    order, stay within bfloat16 rounding of the fp32 loop, and the parameters' gradients
    come back in float32."""
    torch.manual_seed(0)
    st = StackedExperts(n_experts=E, d_in=d, hidden=hidden, last_activation=last)
    x, g = torch.randn(B, d), torch.randn(B, E, hidden[-1])
    got = {}
    for impl, dtype in (
        ("loop", torch.float32),
        ("loop", torch.bfloat16),
        ("fused", torch.bfloat16),
    ):
        st.impl = impl
        st.zero_grad()
        xx = x.to(dtype).detach().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = st(xx)
        assert out.dtype == dtype
        (out.float() * g).sum().backward()
        got[impl, dtype] = [out, xx.grad, *(w.grad.clone() for w in st.weights)]
    fp32, amp, fused = (got[k] for k in got)
    for f, a, r in zip(fused, amp, fp32, strict=True):
        assert _rel(f, a) < 1e-2
        assert _rel(f, r) < 6e-2  # bf16 keeps 8 bits of mantissa: ~0.4% per value
    assert all(t.dtype == torch.float32 for t in fused[2:])


def test_training_impl_runs_in_training_mode_only(monkeypatch):
    """training.expert_impl (train_impl) computes training-mode forwards; eval-mode
    forwards (evaluation, scoring, serving) keep model.expert_impl, so every scoring path
    gives the same scores."""
    from recsys_moe.model import experts

    calls = []
    fused = experts._EAGER["fused"]
    monkeypatch.setitem(experts._EAGER, "fused", lambda *a: calls.append(1) or fused(*a))
    st, ref, x = _pair(16, 3, 7, [5, 4], True, "concat")
    st.train_impl = "fused"
    torch.testing.assert_close(st.train()(x), ref(x), rtol=1e-5, atol=1e-6)
    assert len(calls) == 1
    st.eval()(x)
    assert len(calls) == 1
