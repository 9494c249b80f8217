"""Triton kernels for the GPU (optional extra ``triton``): fused gate softmax + combine,
and embedding-bag gather-and-pool fused into the first expert layer.

- :func:`gate_combine` ``(logits (B, O, E), mask (B, O, E), experts (B, E, H)) -> (B, O, H)``:
  per (example, gate output) one program takes the masked softmax of the E logits in
  registers and accumulates ``sum_e p_e * expert_e`` tile by tile over H: neither the
  weights nor any ``[B, O, E, H]`` product is written to memory. Backward: one kernel for
  the logits' gradient (softmax backward of ``<g, expert_e>``) and one for the experts'
  (``sum_o p_o g_o``), recomputing the softmax instead of storing it.
- :func:`pooled_linear` ``(table, rows_offset, values, offsets, mean, W) -> (B, N)``: the
  first expert layer's embedding part, ``[pool_f(table_f[bag]) for f] @ W``, with each
  bag's rows gathered and pooled straight into the GEMM's input tile (``tl.dot``); the
  pooled ``(B, F*D)`` activations never exist in memory. Tables are one row-concatenated
  weight (as FBGEMM's TBE lays them out), bags in torchrec's key-major KJT order. The
  backward runs in torch (recomputed pooling, ``index_add_`` into the table rows).

Both are ``torch.autograd.Function`` s. The model calls :func:`gate_combine` on CUDA
tensors (``use_triton``); everything else keeps the torch path, with no configuration
change. Without a GPU the same kernels run under Triton's interpreter on CPU tensors when
``TRITON_INTERPRET=1`` is set before triton is imported (slow; the test suite does this).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the optional extra is not installed
    triton = None
    tl = None


def available() -> bool:
    return triton is not None


def use_triton(t: torch.Tensor) -> bool:
    """The model's switch: Triton on CUDA tensors, where it is installed."""
    return triton is not None and t.is_cuda


def _block(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


if triton is not None:

    @triton.jit
    def _softmax_row(logits, mask, row, E, BE: tl.constexpr):
        re = tl.arange(0, BE)
        em = re < E
        z = tl.load(logits + row * E + re, mask=em, other=0.0).to(tl.float32)
        keep = (tl.load(mask + row * E + re, mask=em, other=0) != 0) & em
        z = tl.where(keep, z, float("-inf"))
        p = tl.exp(z - tl.max(z, 0))
        p = tl.where(keep, p, 0.0)
        return p / tl.sum(p, 0)

    @triton.jit
    def _expert_tile(x, b, re, rh, E, H):
        """Example b's expert outputs (BE, BH) for experts ``re`` and columns ``rh``."""
        return tl.load(
            x + b * E * H + re[:, None] * H + rh[None, :],
            mask=(re[:, None] < E) & (rh[None, :] < H),
            other=0.0,
        )

    @triton.jit
    def _combine_fwd(logits, mask, x, out, O, E, H, BE: tl.constexpr, BH: tl.constexpr):
        b = tl.program_id(0)
        o = tl.program_id(1)
        p = _softmax_row(logits, mask, b * O + o, E, BE)
        re = tl.arange(0, BE)
        for h0 in range(0, H, BH):
            rh = h0 + tl.arange(0, BH)
            hm = rh < H
            xt = _expert_tile(x, b, re, rh, E, H)
            tl.store(out + (b * O + o) * H + rh, tl.sum(p[:, None] * xt, 0), mask=hm)

    @triton.jit
    def _combine_bwd_logits(
        logits, mask, x, g, dlogits, O, E, H, BE: tl.constexpr, BH: tl.constexpr
    ):
        b = tl.program_id(0)
        o = tl.program_id(1)
        p = _softmax_row(logits, mask, b * O + o, E, BE)
        re = tl.arange(0, BE)
        dp = tl.zeros((BE,), dtype=tl.float32)
        for h0 in range(0, H, BH):
            rh = h0 + tl.arange(0, BH)
            hm = rh < H
            xt = _expert_tile(x, b, re, rh, E, H)
            gt = tl.load(g + (b * O + o) * H + rh, mask=hm, other=0.0)
            dp += tl.sum(xt * gt[None, :], 1)
        dz = p * (dp - tl.sum(p * dp, 0))
        tl.store(dlogits + (b * O + o) * E + re, dz, mask=re < E)

    @triton.jit
    def _combine_bwd_x(logits, mask, g, dx, O, E, H, BE: tl.constexpr, BH: tl.constexpr):
        b = tl.program_id(0)
        h0 = tl.program_id(1) * BH
        re = tl.arange(0, BE)
        rh = h0 + tl.arange(0, BH)
        hm = rh < H
        acc = tl.zeros((BE, BH), dtype=tl.float32)
        for o in range(0, O):
            p = _softmax_row(logits, mask, b * O + o, E, BE)
            gt = tl.load(g + (b * O + o) * H + rh, mask=hm, other=0.0)
            acc += p[:, None] * gt[None, :]
        tl.store(
            dx + b * E * H + re[:, None] * H + rh[None, :],
            acc,
            mask=(re[:, None] < E) & hm[None, :],
        )

    @triton.jit
    def _pooled_linear_fwd(
        table, rows_offset, values, offsets, mean, w, out, B, F, D, N, max_len,
        BB: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
    ):  # fmt: skip
        rb = tl.program_id(0) * BB + tl.arange(0, BB)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        bm = rb < B
        nm = rn < N
        acc = tl.zeros((BB, BN), dtype=tl.float32)
        for f in range(0, F):
            base = tl.load(rows_offset + f)
            is_mean = tl.load(mean + f)
            start = tl.load(offsets + f * B + rb, mask=bm, other=0)
            length = tl.load(offsets + f * B + rb + 1, mask=bm, other=0) - start
            scale = tl.where((is_mean != 0) & (length > 0), 1.0 / tl.maximum(length, 1), 1.0)
            for d0 in range(0, D, BD):
                rd = d0 + tl.arange(0, BD)
                dm = rd < D
                pooled = tl.zeros((BB, BD), dtype=tl.float32)
                for j in range(0, max_len):  # gather each bag's rows into the input tile
                    valid = bm & (j < length)
                    idx = tl.load(values + start + j, mask=valid, other=0)
                    pooled += tl.load(
                        table + (base + idx)[:, None] * D + rd[None, :],
                        mask=valid[:, None] & dm[None, :],
                        other=0.0,
                    )
                pooled = pooled * scale[:, None]
                wt = tl.load(
                    w + (f * D + rd)[:, None] * N + rn[None, :],
                    mask=dm[:, None] & nm[None, :],
                    other=0.0,
                )
                acc += tl.dot(pooled, wt, input_precision="ieee")
        tl.store(out + rb[:, None] * N + rn[None, :], acc, mask=bm[:, None] & nm[None, :])


class _GateCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, mask, x):
        B, O, E = logits.shape
        H = x.shape[-1]
        ctx.dtypes = (logits.dtype, x.dtype)  # bf16 inputs: computed in fp32, grads cast back
        logits, x = logits.contiguous().float(), x.contiguous().float()
        m = mask.expand(B, O, E).contiguous().to(torch.int8)
        out = torch.empty(B, O, H, device=x.device, dtype=torch.float32)
        BE, BH = _block(E, 2), _block(min(H, 128))
        if B:
            _combine_fwd[(B, O)](logits, m, x, out, O, E, H, BE=BE, BH=BH)
        ctx.save_for_backward(logits, m, x)
        ctx.blocks = (BE, BH)
        return out

    @staticmethod
    def backward(ctx, g):
        logits, m, x = ctx.saved_tensors
        B, O, E = logits.shape
        H = x.shape[-1]
        BE, BH = ctx.blocks
        g = g.contiguous().float()
        dlogits = torch.empty_like(logits)
        dx = torch.empty_like(x)
        if B:
            _combine_bwd_logits[(B, O)](logits, m, x, g, dlogits, O, E, H, BE=BE, BH=BH)
            _combine_bwd_x[(B, triton.cdiv(H, BH))](logits, m, g, dx, O, E, H, BE=BE, BH=BH)
        return dlogits.to(ctx.dtypes[0]), None, dx.to(ctx.dtypes[1])


def gate_combine(logits: torch.Tensor, mask: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """``softmax(logits masked by mask) @ experts`` per gate output: (B, O, E), (B|1, O, E)
    bool, (B, E, H) -> (B, O, H), fused (see the module docstring)."""
    if triton is None:
        raise RuntimeError(
            "gate_combine needs the optional extra: pip install 'recsys-moe[triton]'"
        )
    return _GateCombine.apply(logits, mask, experts)


class _PooledLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table, w, rows_offset, values, offsets, mean, batch):
        F = rows_offset.numel()
        D, N = table.shape[1], w.shape[1]
        B = batch
        out = torch.empty(B, N, device=table.device, dtype=torch.float32)
        lengths = offsets[1:] - offsets[:-1]
        max_len = int(lengths.max()) if lengths.numel() else 0
        BB, BD, BN = 16, _block(min(D, 64)), _block(min(N, 64))
        if B:
            grid = (triton.cdiv(B, BB), triton.cdiv(N, BN))
            _pooled_linear_fwd[grid](
                table.contiguous(), rows_offset, values, offsets, mean, w.contiguous(), out,
                B, F, D, N, max_len, BB=BB, BD=BD, BN=BN,
            )  # fmt: skip
        ctx.save_for_backward(table, w, rows_offset, values, offsets, mean)
        ctx.batch = B
        return out

    @staticmethod
    def backward(ctx, g):
        table, w, rows_offset, values, offsets, mean = ctx.saved_tensors
        B, F, D = ctx.batch, rows_offset.numel(), table.shape[1]
        pooled, rows, bags, scale = _pool_reference(table, rows_offset, values, offsets, mean, B)
        dw = pooled.t() @ g  # (F*D, N)
        dpooled = (g @ w.t()).view(B, F, D)  # (B, F, D)
        feat = torch.div(bags, B, rounding_mode="floor")
        contrib = dpooled[bags % B, feat] * scale.unsqueeze(1)  # one row per bag element
        dtable = torch.zeros_like(table).index_add_(0, rows, contrib)
        return dtable, dw, None, None, None, None, None


def _pool_reference(table, rows_offset, values, offsets, mean, B):
    """Pooled (B, F*D) by torch ops, and each bag element's table row, bag and scale."""
    F, D = rows_offset.numel(), table.shape[1]
    lengths = offsets[1:] - offsets[:-1]  # (F*B,)
    bags = torch.repeat_interleave(torch.arange(F * B, device=table.device), lengths)
    feat = torch.div(bags, B, rounding_mode="floor")
    rows = rows_offset[feat] + values
    per_bag = torch.where(mean[feat] != 0, 1.0 / lengths[bags].clamp_min(1).float(), 1.0)
    pooled = torch.zeros(F * B, D, device=table.device, dtype=table.dtype)
    pooled.index_add_(0, bags, table[rows] * per_bag.unsqueeze(1))
    pooled = pooled.view(F, B, D).transpose(0, 1).reshape(B, F * D)
    return pooled, rows, bags, per_bag


def pooled_linear(
    table: torch.Tensor,
    w: torch.Tensor,
    rows_offset: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    mean: torch.Tensor,
    batch: int,
) -> torch.Tensor:
    """``concat_f(pool_f(table rows of bag (f, b))) @ w`` -> (B, N), fused (see above).

    Args:
        table: (sum of vocabularies, D) all feature tables, row-concatenated.
        w: (F * D, N) the first layer's embedding rows (all experts' columns side by side).
        rows_offset: (F,) int64, where feature f's rows start in ``table``.
        values: (nnz,) int64 row ids within each feature's table, key-major (KJT order).
        offsets: (F * B + 1,) int64 bag boundaries into ``values``.
        mean: (F,) int8/int32, 1 for mean pooling, 0 for sum.
        batch: B.
    """
    if triton is None:
        raise RuntimeError(
            "pooled_linear needs the optional extra: pip install 'recsys-moe[triton]'"
        )
    return _PooledLinear.apply(table, w, rows_offset, values, offsets, mean, batch)


def pooled_linear_reference(table, w, rows_offset, values, offsets, mean, batch):
    """The unfused torch computation :func:`pooled_linear` must equal."""
    return _pool_reference(table, rows_offset, values, offsets, mean, batch)[0] @ w


__all__ = [
    "available",
    "gate_combine",
    "pooled_linear",
    "pooled_linear_reference",
    "use_triton",
]
