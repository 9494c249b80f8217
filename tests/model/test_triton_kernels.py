"""The Triton kernels against their torch references, outputs and gradients, on small odd
shapes. Two kinds of test, the same on every machine:

- interpreter tests: CPU tensors through Triton's interpreter (tests/conftest.py sets
  ``TRITON_INTERPRET=1`` before triton is imported); a GPU, present or not, changes nothing;
- the ``gpu`` test: the compiled kernels on CUDA tensors, in a fresh process without the
  interpreter (deselected by default; ``pytest -m gpu`` on a GPU machine).

Plus: the model scores the same on the fused path."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from recsys_moe.model import triton_kernels as tk

GPU = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _interpreter(request):
    """Every test here but the gpu one runs under the interpreter, or fails saying why."""
    if request.node.get_closest_marker("gpu") is None:
        import triton

        assert triton.knobs.runtime.interpret, (
            "TRITON_INTERPRET=1 must be set before triton's import"
        )


def _same_as_reference(fn, reference, inputs, grad_rtol):
    """``fn(*inputs)`` equals ``reference(*inputs)``, and so do the gradients of every
    floating-point input under the same random upstream gradient."""
    ours = [t.clone().requires_grad_(t.dtype.is_floating_point) for t in inputs]
    ref = [t.clone().requires_grad_(t.dtype.is_floating_point) for t in inputs]
    out, want = fn(*ours), reference(*ref)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(want)
    (out * g).sum().backward()
    (want * g).sum().backward()
    for a, b in zip(ours, ref, strict=True):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, rtol=grad_rtol, atol=1e-5)


def _gate_case(B, O, E, H, k=None, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, O, E, generator=g)
    if k is None:  # a random mask with at least one allowed expert per row
        mask = torch.rand(B, O, E, generator=g) < 0.6
        mask[..., 0] = True
    else:  # top-k routing: the k best experts, renormalised over them
        top = logits.topk(min(k, E), dim=-1).indices
        mask = torch.zeros(B, O, E, dtype=torch.bool).scatter_(-1, top, True)
    x = torch.randn(B, E, H, generator=g)
    return [t.to(device) for t in (logits, mask, x)]


def _gate_reference(logits, mask, x):
    w = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.einsum("boe,beh->boh", w, x)


def _check_gate(B, O, E, H, k=None, device="cpu"):
    logits, mask, x = _gate_case(B, O, E, H, k, device=device)
    _same_as_reference(tk.gate_combine, _gate_reference, [logits, mask, x], grad_rtol=1e-4)


@pytest.mark.parametrize(
    "B,O,E,H,k",
    [
        (1, 1, 1, 1, None),
        (5, 3, 4, 7, None),
        (3, 2, 6, 33, 1),
        (4, 3, 5, 17, 2),
        (2, 1, 9, 130, None),
    ],
)
def test_gate_combine_equals_reference(B, O, E, H, k):
    _check_gate(B, O, E, H, k)


def test_gate_combine_empty_batch():
    logits, mask, x = _gate_case(0, 2, 3, 5)
    assert tk.gate_combine(logits, mask, x).shape == (0, 2, 5)


def _bag_case(B, vocab, D, N, mean, max_len=3, seed=0, device="cpu"):
    """Key-major bags (some empty) over F tables of sizes ``vocab``."""
    g = torch.Generator().manual_seed(seed)
    F = len(vocab)
    table = torch.randn(sum(vocab), D, generator=g)
    w = torch.randn(F * D, N, generator=g) * 0.1
    rows_offset = torch.tensor([0, *torch.tensor(vocab).cumsum(0)[:-1].tolist()])
    lengths = torch.randint(0, max_len + 1, (F * B,), generator=g)
    lengths[0] = 0  # at least one empty bag
    values = torch.cat(
        [torch.randint(0, vocab[i // B], (int(n),), generator=g) for i, n in enumerate(lengths)]
        or [torch.zeros(0, dtype=torch.long)]
    )
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    mean_t = torch.tensor(mean, dtype=torch.int32)
    return [t.to(device) for t in (table, w, rows_offset, values, offsets, mean_t)]


def _check_bags(B, vocab, D, N, mean, device="cpu"):
    table, w, ro, v, off, mean_t = _bag_case(B, vocab, D, N, mean, device=device)

    def ours(t, w_):
        return tk.pooled_linear(t, w_, ro, v, off, mean_t, B)

    def ref(t, w_):
        return tk.pooled_linear_reference(t, w_, ro, v, off, mean_t, B)

    _same_as_reference(ours, ref, [table, w], grad_rtol=1e-5)


@pytest.mark.parametrize(
    "B,vocab,D,N,mean",
    [(1, [5], 4, 5, [0]), (6, [5, 7, 3], 4, 33, [0, 1, 0]), (19, [2, 9], 17, 16, [1, 1])],
)
def test_pooled_linear_equals_reference(B, vocab, D, N, mean):
    _check_bags(B, vocab, D, N, mean)


def test_pooled_reference_is_embedding_bag():
    """The reference itself: per feature, torch's EmbeddingBag (sum / mean) then the GEMM."""
    B, vocab, D, N = 6, [5, 7], 4, 3
    table, w, ro, v, off, mean_t = _bag_case(B, vocab, D, N, [0, 1])
    pooled = []
    for f, V in enumerate(vocab):
        lo, hi = off[f * B], off[(f + 1) * B]
        bag_off = off[f * B : (f + 1) * B] - lo
        pooled.append(
            torch.nn.functional.embedding_bag(
                v[lo:hi], table[ro[f] : ro[f] + V], bag_off, mode="mean" if mean_t[f] else "sum"
            )
        )
    want = torch.cat(pooled, 1) @ w
    got = tk.pooled_linear_reference(table, w, ro, v, off, mean_t, B)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_model_scores_the_same_on_the_fused_path(small_store, monkeypatch):
    from features.store import load_manifest, read_examples
    from recsys_moe.model import cores
    from recsys_moe.model.inputs import ExampleTensors, InputSpec
    from recsys_moe.model.ranker import RankingModel
    from recsys_moe.training import loss_of

    cfg, _ = small_store
    spec = InputSpec.from_manifest(load_manifest(cfg.features.store_dir))
    torch.manual_seed(0)
    model = RankingModel(spec, dataclasses.replace(cfg.model, expert_hidden=[16, 8], n_experts=3))
    b = ExampleTensors(spec, read_examples(cfg.features.store_dir, "test").head(24)).batch(
        slice(0, 24)
    )
    ref = model(b)
    loss_of(model, ref, b.labels).backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    # the kernel the model takes on CUDA tensors, given to it here on CPU tensors
    monkeypatch.setattr(cores, "fused_combine", lambda experts: tk.gate_combine)
    fused = model(b)
    loss_of(model, fused, b.labels).backward()
    torch.testing.assert_close(fused.preds, ref.preds, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        if n in ref_grads:
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def gpu_checks() -> None:
    """The compiled kernels on CUDA tensors (run by :func:`test_kernels_on_gpu`)."""
    for shape in [(1, 1, 1, 1, None), (64, 3, 8, 64, None), (257, 3, 10, 96, 2)]:
        _check_gate(*shape, device="cuda")
    _check_bags(129, [50, 70, 30], 32, 96, [0, 1, 0], device="cuda")


@GPU
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernels_on_gpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = f"import runpy; runpy.run_path({str(Path(__file__))!r})['gpu_checks']()"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
