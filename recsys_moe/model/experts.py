"""Experts as stacked parameters, computed with batched ops; a loop reference beside them.

Every expert reads the same input, so the first layer of all ``E`` experts is ONE GEMM
of width ``E * h``; later layers are one batched matmul over the expert axis.

The same parameters (``weights[l]: [E, in, out]``, ``biases[l]: [E, out]``) can be computed
several ways (:data:`EXPERT_IMPLS`, :func:`expert_forward`), chosen by ``model.expert_impl``:

- ``loop``: one GEMM per expert and layer in a Python loop (the reference);
- ``bmm``: every layer one batched matmul over the expert axis (input broadcast E times);
- ``concat``: the first layer one concatenated GEMM ``[B, d] @ [d, E*h1]`` (all experts
  share the input), later layers one einsum over the expert axis (the default);
- ``blockdiag``: the first layer concatenated, later layers one GEMM against the
  block-diagonal ``[E*h_i, E*h_o]`` matrix (E x the FLOPs, but one large GEMM);
- ``fused``: layer 1 concatenated with bias and ReLU in the GEMM's epilogue (oneDNN on
  CPU), later layers expert-major batched GEMMs, and a hand-written backward
  (:class:`_FusedExperts`); in bfloat16 (``training.precision``) the fastest training
  path on CPUs with AMX;
- ``compiled``: ``concat`` through ``torch.compile`` (Inductor emits fused C++ on CPU);
- ``auto``: times the eager candidates' forward once per batch-size bucket on first use
  and keeps the fastest (a timing decision: two processes may pick differently, and
  their scores then differ in the last bits).

``training.expert_impl`` sets ``train_impl``, used by training-mode forwards only, so
training can run the fastest training kernel while every scoring path keeps one.
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


def freeze_frozen_norms(norms: nn.Module | None) -> None:
    """Batch norms whose parameters take no gradient (a grown model's parent part) stay in
    eval mode whatever mode their owner is put in: their running statistics and outputs do
    not move. Call after ``super().train(mode)``."""
    if norms is not None and not any(p.requires_grad for p in norms.parameters()):
        norms.eval()


def batch_norm_rows(bn: nn.BatchNorm1d, h: torch.Tensor) -> torch.Tensor:
    """``bn`` over ``h`` (B, ...) flattened to its channels; a one-row training batch has no
    batch statistics and is normalised with the running ones."""
    flat = h.flatten(1)
    if bn.training and h.shape[0] < 2:
        out = nn.functional.batch_norm(flat, bn.running_mean, bn.running_var, bn.weight,
                                       bn.bias, training=False, eps=bn.eps)  # fmt: skip
    else:
        out = bn(flat)
    return out.view(h.shape)


EXPERT_IMPLS = ("loop", "bmm", "concat", "blockdiag", "fused", "compiled", "auto")


def _act(h: torch.Tensor, last: bool, i: int, n: int, dropout: nn.Module) -> torch.Tensor:
    """ReLU + dropout between layers; after the last layer ReLU only if ``last``."""
    if i < n - 1:
        return dropout(torch.relu(h))
    return torch.relu(h) if last else h


def _loop(x, weights, biases, last, dropout):
    outs = []
    n = len(weights)
    for e in range(weights[0].shape[0]):
        h = x
        for i in range(n):
            h = _act(torch.addmm(biases[i][e], h, weights[i][e]), last, i, n, dropout)
        outs.append(h)
    return torch.stack(outs, dim=1)


def _bmm(x, weights, biases, last, dropout):
    E, n = weights[0].shape[0], len(weights)
    h = x.unsqueeze(0).expand(E, -1, -1)  # (E, B, d)
    for i in range(n):
        h = _act(torch.baddbmm(biases[i].unsqueeze(1), h, weights[i]), last, i, n, dropout)
    return h.transpose(0, 1)  # (B, E, H)


def _first_concat(x, w0, b0):
    E = w0.shape[0]
    h = x @ w0.permute(1, 0, 2).reshape(w0.shape[1], -1) + b0.reshape(-1)  # (B, E*h1)
    return h.view(x.shape[0], E, w0.shape[2])


def _concat(x, weights, biases, last, dropout, norms=None):
    """``norms``: a BatchNorm per layer a ReLU follows, applied before it (batch-normed
    experts)."""
    n = len(weights)
    h = _first_concat(x, weights[0], biases[0])
    for i in range(n):
        if i:
            h = torch.einsum("beh,eho->beo", h, weights[i]) + biases[i]
        if norms is not None and i < len(norms):
            h = batch_norm_rows(norms[i], h)
        h = _act(h, last, i, n, dropout)
    return h


def _blockdiag(x, weights, biases, last, dropout):
    n, B = len(weights), x.shape[0]
    h = _act(_first_concat(x, weights[0], biases[0]), last, 0, n, dropout)
    for i in range(1, n):
        E, a = weights[i].shape[:2]
        h = h.reshape(B, E * a) @ torch.block_diag(*weights[i]) + biases[i].reshape(-1)
        h = _act(h.view(B, weights[i].shape[0], weights[i].shape[2]), last, i, n, dropout)
    return h


_HAS_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(
    torch.ops.mkldnn, "_linear_pointwise"
)


def _linear_relu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, relu: bool) -> torch.Tensor:
    """``relu(x @ w.T + b)`` (or without the ReLU), ``w`` as (out, in): on CPU one oneDNN
    GEMM with bias and ReLU in its epilogue (one pass over the output instead of
    two; bench/kernels.py measures it), addmm + in-place ReLU elsewhere."""
    if x.device.type == "cpu" and _HAS_ONEDNN_LINEAR and x.shape[0]:
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "relu" if relu else "none", [], "")
    h = torch.addmm(b, x, w.t())
    return h.relu_() if relu else h


class _FusedExperts(torch.autograd.Function):
    """All layers of E experts with a hand-written backward, in the input's dtype.

    Layer 1 is one concatenated GEMM ``[B, d] @ [d, E*h1]`` with bias and ReLU in the
    GEMM's epilogue; its output is laid out expert-major ``(E, B, h1)`` once, so every later
    layer is one contiguous batched GEMM (``baddbmm``) and the layer-2 weight gradient one
    ``bmm`` (oneDNN's bf16 batched GEMM reads strided operands slowly). Backward: ReLU masks in
    place, bias gradients as sums, the input gradient of layer 1 by one GEMM (no
    per-expert accumulation). Only post-ReLU activations are kept. Weights are cast to
    the input's dtype once per call: a bfloat16 input (``training.precision = "bf16"``) runs
    every GEMM in bfloat16 (AMX on Sapphire Rapids and later).
    """

    @staticmethod
    def forward(ctx, x, last, n, *params):
        weights, biases = params[:n], params[n:]
        with torch.autocast(x.device.type, enabled=False):
            w0 = _fused_layout(weights[0], x.dtype)
            out, ws, acts, h_cat = _fused_layers(x, w0, weights, biases, last)
        if n == 1:
            ctx.save_for_backward(x, w0, h_cat)
        else:
            ctx.save_for_backward(x, w0, *ws[1:], *acts, h_cat)
        ctx.last, ctx.n, ctx.dtypes = last, n, [p.dtype for p in params]
        return out

    @staticmethod
    def backward(ctx, grad):
        n, last = ctx.n, ctx.last
        x, w0, *rest = ctx.saved_tensors
        ws, acts = rest[: n - 1], rest[n - 1 :]  # n > 1: acts[n] is layer 1's (B, E*h1)
        B, E = x.shape[0], grad.shape[1]
        relu_bw = torch.ops.aten.threshold_backward
        gw: list[torch.Tensor] = [None] * n  # type: ignore[list-item]
        gb: list[torch.Tensor] = [None] * n  # type: ignore[list-item]
        with torch.autocast(x.device.type, enabled=False):
            if n == 1:
                g = grad.reshape(B, E * grad.shape[2]).to(x.dtype)
                g = relu_bw(g, acts[0], 0) if last else g
            else:
                g = grad.to(x.dtype).transpose(0, 1)  # (E, B, H)
                g = relu_bw(g, acts[n - 1], 0) if last else g.contiguous()
                relu_in_place = torch.ops.aten.threshold_backward.grad_input
                for i in range(n - 1, 0, -1):
                    gb[i] = g.sum(1)
                    gw[i] = torch.bmm(acts[i - 1].transpose(1, 2), g)
                    wt = ws[i - 1].transpose(1, 2)
                    if i > 1:
                        gin = torch.bmm(g, wt)  # (E, B, a)
                        g = relu_in_place(gin, acts[i - 1], 0, grad_input=gin)
                        continue
                    # into layer 1's (B, E*h1) layout directly: no transpose copy after
                    gin = g.new_empty(B, E * wt.shape[2])
                    torch.bmm(g, wt, out=gin.view(B, E, wt.shape[2]).transpose(0, 1))
                    g = relu_in_place(gin, acts[n], 0, grad_input=gin)  # (B, E*h1)
            gb[0] = g.sum(0).view(E, g.shape[1] // E)
            gw[0] = (x.t() @ g).view(x.shape[1], E, g.shape[1] // E).transpose(0, 1)
            gx = g @ w0 if ctx.needs_input_grad[0] else None
        grads = [t.to(dt) for t, dt in zip([*gw, *gb], ctx.dtypes, strict=True)]
        return (gx, None, None, *grads)


def _fused_layout(w0: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Layer 1's ``[E, d, h1]`` weight as ``(E*h1, d)``, the (out, in) layout oneDNN reads:
    cast and laid out in one copy."""
    E, d, h1 = w0.shape
    return w0.new_empty(E, h1, d, dtype=dtype).copy_(w0.transpose(1, 2)).view(E * h1, d)


def _fused_layers(x, w0, weights, biases, last, b0=None):
    """The fused forward from layer 1's laid-out weight ``w0``: the output (B, E, H), the
    cast later weights, the expert-major activations and layer 1's (B, E*h1) output.
    ``b0``: layer 1's bias (E*h1,) if not ``biases[0]``."""
    dt, n = x.dtype, len(weights)
    B, E, h1 = x.shape[0], weights[0].shape[0], weights[0].shape[2]
    ws = [None, *(w.to(dt) for w in weights[1:])]
    b0 = biases[0].reshape(-1).to(dt) if b0 is None else b0
    h = _linear_relu(x, w0, b0, n > 1 or last)
    if n == 1:
        return h.view(B, E, h1), ws, [], h
    h_cat = h  # (B, E*h1), kept: layer 1's ReLU mask in the layout of its gradient
    h = h.view(B, E, h1).transpose(0, 1).contiguous()  # (E, B, h1)
    acts = [h]
    for i in range(1, n):
        h = torch.baddbmm(biases[i].to(dt).unsqueeze(1), h, ws[i])  # (E, B, o)
        if i < n - 1 or last:
            h.relu_()
        acts.append(h)
    return h.transpose(0, 1), ws, acts, h_cat  # (B, E, H): a view of the expert-major result


# batches at least this large are checked for input columns equal on every row
_SPLIT_MIN_ROWS = 8


def sparse_expert_forward(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    routed: torch.Tensor,
    last: bool = True,
    dropout: nn.Module | None = None,
) -> torch.Tensor:
    """x: (B, d_in) -> (B, E, H) computing each expert only on the rows routed to it
    (``routed``: (B, E) bool), MegaBlocks-style: the (row, expert) pairs are sorted by
    expert, each expert's rows are one contiguous block and one GEMM per layer, and the
    results land in a zero (B, E, H) (an unrouted pair's output is 0; the gate gives it
    weight 0, so the mixture and every gradient equal the dense computation's). An expert
    no row picked costs nothing. Differentiable (gathers and an ``index_copy``)."""
    drop = dropout if dropout is not None else nn.Identity()
    B, E = routed.shape
    n = len(weights)
    H = weights[-1].shape[2]
    experts, rows = torch.nonzero(routed.T, as_tuple=True)  # sorted by expert, then row
    counts = torch.bincount(experts, minlength=E).tolist()
    h_all = x.index_select(0, rows)  # (N, d): every pair's input, grouped by expert
    outs = []
    for e, (block, c) in enumerate(zip(h_all.split(counts), counts, strict=True)):
        if c == 0:
            continue
        h = block
        for i in range(n):
            h = _act(torch.addmm(biases[i][e], h, weights[i][e]), last, i, n, drop)
        outs.append(h)
    flat = x.new_zeros(B * E, H)
    if outs:
        flat = flat.index_copy(0, rows * E + experts, torch.cat(outs))
    elif x.requires_grad:  # nothing routed: zeros that still hand x a (zero) gradient
        flat = flat + x.sum() * 0
    return flat.view(B, E, H)


def _fused(x, weights, biases, last, dropout):
    if not isinstance(dropout, nn.Identity) and dropout.training and dropout.p > 0:
        return _concat(x, weights, biases, last, dropout)  # dropout between layers: eager
    return _FusedExperts.apply(x, last, len(weights), *weights, *biases)


_EAGER = {
    "loop": _loop,
    "bmm": _bmm,
    "concat": _concat,
    "blockdiag": _blockdiag,
    "fused": _fused,
}
_COMPILED: dict[str, object] = {}


def expert_forward(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    impl: str = "concat",
    last_activation: bool = True,
    dropout: nn.Module | None = None,
) -> torch.Tensor:
    """x: (B, d_in) -> (B, E, H) through E MLP experts, by implementation ``impl``."""
    drop = dropout if dropout is not None else nn.Identity()
    if impl == "compiled":
        fn = _COMPILED.get("concat")
        if fn is None:
            fn = _COMPILED["concat"] = torch.compile(_concat)  # dynamic after a shape change
        return fn(x, list(weights), list(biases), last_activation, drop)
    try:
        return _EAGER[impl](x, list(weights), list(biases), last_activation, drop)
    except KeyError:
        raise ValueError(f"expert implementation {impl!r}; have {EXPERT_IMPLS}") from None


class StackedExperts(nn.Module):
    """``E`` MLP experts with weights ``[E, in, out]`` per layer, ReLU between layers.

    Args:
        n_experts: E.
        d_in: input width.
        hidden: layer widths; the last is the expert output width H.
        dropout: dropout after every hidden activation (training only).
        last_activation: apply ReLU after the last layer too (experts feed gates and towers).
        impl: how to compute them (:data:`EXPERT_IMPLS`); every choice gives the same result.
        batch_norm: BatchNorm on every pre-activation before its ReLU, per expert unit, as
            torch-rechub's expert MLPs have (Linear -> BatchNorm -> ReLU): in training over
            the batch (computed eagerly, the fused kernels have no normalisation), in
            evaluation folded into the weights from the running statistics.
    """

    def __init__(
        self,
        *,
        n_experts: int,
        d_in: int,
        hidden: list[int],
        dropout: float = 0.0,
        last_activation: bool = True,
        impl: str = "concat",
        batch_norm: bool = False,
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
        if impl not in EXPERT_IMPLS:
            raise ValueError(f"expert implementation {impl!r}; have {EXPERT_IMPLS}")
        self.impl = impl
        # the implementation of training-mode forwards (training.expert_impl); None: impl
        self.train_impl: str | None = None
        self._auto_choice: dict[int, str] = {}
        # with sparse routing, compute each expert on its routed rows only (model.sparse_experts)
        self.sparse = False
        # layer 1's weight laid out for inference, and the weight version it was made from
        self._layout: torch.Tensor | None = None
        self._layout_key: tuple | None = None
        # constant-column mask -> layer 1's weight split into (varying, constant) columns
        self._split: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}
        # one BatchNorm over the E x width units of each layer a ReLU follows
        normed = widths[1:] if last_activation else widths[1:-1]
        self.norms = (
            nn.ModuleList(nn.BatchNorm1d(n_experts * b) for b in normed) if batch_norm else None
        )
        # the weights and biases with the norms folded in, and the versions they came from
        self._folded: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self._folded_key: tuple | None = None

    def train(self, mode: bool = True) -> StackedExperts:
        """Also forgets the inference layout: a weight version alone does not say the
        weights changed (torch's fused Adam updates them in place without bumping it), so
        every switch of mode (a training step is taken in train mode) starts afresh."""
        self._layout_key = self._folded_key = None
        self._split.clear()
        super().train(mode)
        freeze_frozen_norms(self.norms)
        return self

    def forward(self, x: torch.Tensor, need: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, d_in) -> (B, E, H). ``need``: (B, E) bool, the experts each row was routed
        to (top-k / expert-choice routing); with ``sparse`` set each expert then computes
        only its rows (:func:`sparse_expert_forward`), otherwise every expert every row
        (one GEMM for all; the gates' zero weights mask the unrouted outputs)."""
        if self.norms is not None:
            if self.training or torch.is_grad_enabled():
                return _concat(x, list(self.weights), list(self.biases), self.last_activation,
                               self.dropout, self.norms)  # fmt: skip
            return self._inference(x, *self._fold_norms())
        if need is not None and self.sparse:
            return sparse_expert_forward(
                x, list(self.weights), list(self.biases), need, self.last_activation,
                self.dropout,
            )  # fmt: skip
        impl = self.train_impl if self.training and self.train_impl else self.impl
        impl = impl if impl != "auto" else self._auto(x)
        if impl in ("concat", "fused", "compiled") and not torch.is_grad_enabled():
            return self._inference(x)
        return expert_forward(
            x, list(self.weights), list(self.biases), impl, self.last_activation, self.dropout
        )

    @torch.no_grad()
    def _fold_norms(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Weights and biases computing what the normed forward computes in evaluation: each
        norm's affine map from its running statistics folded into the layer before it
        (kept while no parameter or statistic changes)."""
        tensors = [*self.parameters(), *self.norms.buffers()]
        key = tuple((t._version, t.data_ptr()) for t in tensors)
        if self._folded_key != key:
            ws, bs = [], []
            for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
                if i < len(self.norms):
                    bn = self.norms[i]
                    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).view_as(b)
                    ws.append(w * scale.unsqueeze(1))
                    bs.append((b - bn.running_mean.view_as(b)) * scale + bn.bias.view_as(b))
                else:
                    ws.append(w.detach())
                    bs.append(b.detach())
            self._folded, self._folded_key = (ws, bs), key
            self._layout_key = None  # fresh tensors: a freed one's address may come back
        return self._folded

    def _inference(
        self,
        x: torch.Tensor,
        weights: list[torch.Tensor] | None = None,
        biases: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Without autograd (evaluation, scoring, serving), for the GEMM implementations:
        the fused arithmetic (layer 1 one GEMM with bias and ReLU in its epilogue), with
        layer 1's weight laid out once per weight version instead of on every call (for a
        request of a hundred rows the layout copy costs about as much as the GEMM)."""
        weights = list(self.weights) if weights is None else weights
        biases = list(self.biases) if biases is None else biases
        w = weights[0]
        key = (w._version, w.data_ptr(), x.dtype)
        if self._layout_key != key:
            self._layout, self._layout_key = _fused_layout(w.detach(), x.dtype), key
            self._split.clear()
        w0, b0 = self._layout, None
        if x.shape[0] >= _SPLIT_MIN_ROWS:
            # a ranking request: one user and context, many items - the input columns
            # equal on every row (the user's and the context's) go through layer 1 once
            # for the whole batch, folded into its bias
            same = (x == x[:1]).all(0)
            n_same = int(same.sum())
            if n_same * 4 >= x.shape[1] and n_same < x.shape[1]:
                mask = same.cpu().numpy().tobytes()
                parts = self._split.get(mask)
                if parts is None:
                    if len(self._split) >= 8:
                        self._split.clear()
                    parts = self._split[mask] = (w0[:, ~same].contiguous(), w0[:, same])
                b0 = torch.addmv(biases[0].reshape(-1).to(x.dtype), parts[1], x[0, same])
                w0, x = parts[0], x[:, ~same]
        with torch.autocast(x.device.type, enabled=False):
            return _fused_layers(x, w0, weights, biases, self.last_activation, b0)[0]

    @torch.no_grad()
    def _auto(self, x: torch.Tensor) -> str:
        """The fastest eager implementation for this batch-size bucket (forward timed once,
        without autograd, so no gradient or distributed hook is touched)."""
        import time

        key = 1 << max(0, x.shape[0] - 1).bit_length()
        best = self._auto_choice.get(key)
        if best is None:
            times: dict[str, float] = {}
            for name in ("bmm", "concat", "blockdiag", "fused"):
                for rep in range(3):
                    t = time.perf_counter()
                    expert_forward(x, list(self.weights), list(self.biases), name,
                                   self.last_activation)  # fmt: skip
                    if rep:
                        times[name] = min(times.get(name, 1e9), time.perf_counter() - t)
            best = self._auto_choice[key] = min(times, key=times.__getitem__)
        return best


class GroupedExperts(nn.Module):
    """``G`` groups of ``P`` experts where group ``g`` reads its own input (PLE levels).

    x: (B, G, d_in) -> (B, G, P, H); one einsum per layer for all groups and experts.
    """

    def __init__(
        self,
        *,
        n_groups: int,
        per_group: int,
        d_in: int,
        hidden: list[int],
        dropout: float = 0.0,
        batch_norm: bool = False,
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
        # batch_norm: every layer's pre-activation normalised per unit over the batch
        # (running statistics in eval mode), Linear -> BatchNorm -> ReLU as torch-rechub's MLP
        self.norms = (
            nn.ModuleList(nn.BatchNorm1d(n_groups * per_group * b) for b in widths[1:])
            if batch_norm
            else None
        )

    def train(self, mode: bool = True) -> GroupedExperts:
        super().train(mode)
        freeze_frozen_norms(self.norms)
        return self

    def _norm(self, h: torch.Tensor, i: int) -> torch.Tensor:
        return h if self.norms is None else batch_norm_rows(self.norms[i], h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.einsum("bgi,gpio->bgpo", x, self.weights[0]) + self.biases[0]  # (B, G, P, h1)
        for i in range(1, len(self.weights)):
            h = self.dropout(torch.relu(self._norm(h, i - 1)))
            h = torch.einsum("bgpi,gpio->bgpo", h, self.weights[i]) + self.biases[i]
        return torch.relu(self._norm(h, len(self.weights) - 1))


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
