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


def _routed(B, E, k, seed, empty=(), dropped=0):
    """A top-k routing mask (B, E): ``empty`` experts picked by no row, the first
    ``dropped`` rows routed nowhere (tokens dropped by capacity)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, E, generator=g)
    scores[:, list(empty)] = -1e9
    mask = torch.zeros(B, E, dtype=torch.bool)
    mask.scatter_(1, scores.topk(min(k, E), dim=1).indices, True)
    mask[:, list(empty)] = False
    mask[:dropped] = False
    return mask


@pytest.mark.parametrize(("B", "E", "k", "empty", "dropped"), [
    (64, 8, 1, (), 0), (64, 8, 2, (3, 5), 7), (33, 16, 2, (0,), 0), (5, 32, 1, (), 2),
    (9, 1, 1, (), 3), (0, 4, 2, (), 0), (4, 4, 2, (0, 1, 2, 3), 0),
])  # fmt: skip
@pytest.mark.parametrize("last", [True, False])
def test_sparse_experts_equal_the_dense_masked_computation(B, E, k, empty, dropped, last):
    """Each expert computed on its routed rows only equals every expert on every row with
    the unrouted outputs masked: outputs and the gradients of the input and of every
    weight and bias, with empty experts and dropped rows."""
    from recsys_moe.model.experts import sparse_expert_forward

    torch.manual_seed(0)
    st = StackedExperts(n_experts=E, d_in=13, hidden=[11, 5], last_activation=last, impl="loop")
    routed = _routed(B, E, k, seed=B + E, empty=empty, dropped=dropped)
    x = torch.randn(B, 13)
    g = torch.randn(B, E, 5)  # the gates' weights times the downstream gradient

    def run(sparse: bool):
        st.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        if sparse:
            out = sparse_expert_forward(xi, list(st.weights), list(st.biases), routed, last)
        else:
            out = st(xi) * routed.unsqueeze(-1)
        (out * g).sum().backward()
        grads = [xi.grad, *(p.grad if p.grad is not None else torch.zeros_like(p)
                            for p in st.parameters())]  # fmt: skip
        return out.detach(), grads

    out_s, grads_s = run(True)
    out_d, grads_d = run(False)
    torch.testing.assert_close(out_s, out_d, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_s, grads_d, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for e in empty:  # an expert no row picked: no output, no gradient
        assert not out_s[:, e].any() and not grads_s[1][e].any()


@pytest.mark.parametrize("routing", ["topk", "expert_choice"])
def test_model_with_sparse_experts_scores_and_trains_as_dense(routing):
    """model.sparse_experts changes what is computed, not the result: predictions and
    every parameter's gradient equal the dense-masked model's."""
    from recsys_moe.config import ModelConfig
    from recsys_moe.model.inputs import DenseFeature, InputSpec, SparseFeature, Task
    from recsys_moe.model.ranker import RankingModel, task_losses

    spec = InputSpec(
        sparse=[SparseFeature("user_id", "cat__user_id", 50, False, "id"),
                SparseFeature("domain", "cat__domain", 3, False, "domain")],
        dense=[DenseFeature("x", "num__x", 0.0, 1.0)],
        tasks=[Task("click", "binary", "", 1.0, "label__click")],
        domain_column="cat__domain", domains=["a", "b"],
    )  # fmt: skip
    from recsys_moe.model.inputs import ExampleTensors

    n = 96
    g = torch.Generator().manual_seed(0)
    cols = {"cat__user_id": torch.randint(0, 50, (n,), generator=g).numpy(),
            "cat__domain": torch.randint(1, 3, (n,), generator=g).numpy(),
            "num__x": torch.randn(n, generator=g).numpy()}  # fmt: skip
    batch = ExampleTensors.from_arrays(spec, cols, n).batch(slice(None))
    labels = (torch.rand(n, 1, generator=g) > 0.5).float()
    results = []
    for sparse in (True, False):
        torch.manual_seed(0)
        cfg = ModelConfig(embedding_dim=8, n_experts=8, expert_hidden=[16, 8], tower_hidden=[8],
                          routing=routing, top_k=2, sparse_experts=sparse)  # fmt: skip
        model = RankingModel(spec, cfg).train()
        out = model(batch)
        task_losses(model, out, labels).sum().backward()
        results.append((out.preds.detach(), {k: p.grad for k, p in model.named_parameters()}))
    (p_s, g_s), (p_d, g_d) = results
    torch.testing.assert_close(p_s, p_d, rtol=1e-5, atol=1e-6)
    for k in g_d:
        if g_d[k] is None:
            assert g_s[k] is None or not g_s[k].any(), k
        else:
            torch.testing.assert_close(g_s[k], g_d[k], rtol=1e-4, atol=1e-6, msg=k)
