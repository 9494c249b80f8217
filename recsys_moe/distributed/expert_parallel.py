"""Expert parallelism: each of W workers owns E/W experts of a :class:`StackedExperts`.

Rank ``r`` holds experts ``[r * E/W, (r + 1) * E/W)``. Forward, on every rank at once:

- dense gating (every gate weighs every expert): each rank's expert inputs ``x`` (B_r, d)
  go to every rank (an all-gather, done as one uneven ``all_to_all``); each rank computes
  its E/W experts for the global batch and sends every row's outputs back to the rank
  that owns the row (``all_to_all``); the owner concatenates the blocks in rank order
  -> (B_r, E, H), exactly what the replicated module returns.
- sparse routing (top-k / expert-choice, ``need`` given): a row travels only to the ranks
  owning at least one expert it was routed to (after the router's capacity limit), with
  its routing to that rank's experts, so that each expert computes only its own rows
  (``sparse`` experts, as on one process); it comes back filled in for those experts,
  the others zero (their combine weight is 0).

Gradients flow back through the same collectives (reverse all-to-all), so a
rank's expert gradients are the sum over every rank's loss. Dense parameters are averaged
over ranks by DDP; to match, expert gradients are divided by W (a hook per parameter),
which makes W workers on equal shards equal to one process on the concatenated batch.
Expert parameters must be kept out of DDP (``sharding.expert_param_names``).

World size 1 is the same module with trivial collectives.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from recsys_moe.model.experts import StackedExperts


class _AllToAll(torch.autograd.Function):
    """Uneven ``all_to_all_single`` whose backward is the reverse exchange (c10d directly:
    on gloo it costs about half of the functional-collective wrapper)."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def _a2a(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group)


def _exchange_counts(counts: list[int], group) -> list[int]:
    """Every rank tells every other how many rows it will send it; returns what arrives."""
    send = torch.tensor(counts, dtype=torch.int64)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.tolist()


class ExpertParallel(nn.Module):
    """This rank's slice of a :class:`StackedExperts`, with the same interface.

    Args:
        full: the replicated experts (every rank built the same ones from the same seed);
            this rank keeps its E/W and the rest is dropped.
        group: the process group (default: the world).
    """

    def __init__(self, full: StackedExperts, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.group = group if group is not None else dist.group.WORLD
        W, r = dist.get_world_size(group), dist.get_rank(group)
        E = full.n_experts
        if E % W:
            raise ValueError(f"expert parallelism needs n_experts ({E}) divisible by workers ({W})")
        El = E // W
        self.world, self.rank, self.n_experts, self.n_local = W, r, E, El
        self.d_in, self.d_out = full.d_in, full.d_out
        widths = [full.d_in, *[w.shape[-1] for w in full.weights]]
        self.local = StackedExperts(
            n_experts=El,
            d_in=full.d_in,
            hidden=widths[1:],
            dropout=full.dropout.p if isinstance(full.dropout, nn.Dropout) else 0.0,
            last_activation=full.last_activation,
            impl=full.impl,
        )
        self.local.train_impl = full.train_impl
        self.local.sparse = full.sparse
        with torch.no_grad():
            for mine, theirs in zip(
                [*self.local.weights, *self.local.biases],
                [*full.weights, *full.biases],
                strict=True,
            ):
                mine.copy_(theirs[r * El : (r + 1) * El])
        if W > 1:
            for p in self.local.parameters():
                p.register_hook(lambda g, W=W: g / W)

    def forward(self, x: torch.Tensor, need: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, d_in); need: optional (B, E) bool, the experts each row was routed to.

        Returns (B, E, H): every expert's output for this rank's rows (zeros where a sparse
        row does not use an expert).
        """
        W, El, g = self.world, self.n_local, self.group
        B = x.shape[0]
        if need is None:
            mine = torch.tensor([B], dtype=torch.int64)
            got = [torch.empty_like(mine) for _ in range(W)]
            dist.all_gather(got, mine, group=g)
            sizes = [int(t) for t in got]
            xs = _a2a(x.repeat(W, 1), sizes, [B] * W, g)  # (sum B, d): all ranks' rows
            y = self.local(xs)  # (sum B, El, H)
            back = _a2a(y.flatten(1), [B] * W, sizes, g)  # (W * B, El * H): my rows, by owner
            return back.view(W, B, El, -1).permute(1, 0, 2, 3).reshape(B, W * El, -1)
        per_rank = need.view(B, W, El)
        send = per_rank.any(-1)  # (B, W): rows that need a rank's experts
        rows = [send[:, j].nonzero().squeeze(1) for j in range(W)]
        out_counts = [int(r_.numel()) for r_ in rows]
        in_counts = _exchange_counts(out_counts, g)
        # each row travels with the routing to the receiving rank's experts (El columns
        # appended, no gradient), so that there each expert computes only its own rows
        mask = torch.cat([per_rank[r_, j] for j, r_ in enumerate(rows)]).to(x.dtype)
        xs = _a2a(torch.cat([x[torch.cat(rows)], mask], 1), in_counts, out_counts, g)
        xs, need_local = xs[:, : x.shape[1]], xs[:, x.shape[1] :].detach() > 0
        y = self.local(xs, need_local if self.local.sparse else None)  # (sum in, El, H)
        back = _a2a(y.flatten(1), out_counts, in_counts, g)  # (sum out, El * H)
        owner = torch.cat([torch.full_like(r_, j) for j, r_ in enumerate(rows)])
        out = back.new_zeros(B, W, back.shape[1]).index_put((torch.cat(rows), owner), back)
        return out.view(B, W * El, -1)
