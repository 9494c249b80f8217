"""Dying experts, treated during training.

An MoE router can starve an expert: once its gate logits fall behind, it gets (almost) no
weight, hence (almost) no gradient, and stays that way: capacity lost for good. The
load-balancing loss (``model.aux_loss_coef``) is the preventive remedy; this is the
curative one, the re-initialisation used for dead units and experts:

Every ``training.revive_after_steps`` steps, :class:`ExpertReviver` looks at the combine
weight each expert received over those steps, per domain gate. An expert that every gate
allowed to use it weighed below ``training.dead_expert_threshold / n_allowed`` of the
load (the threshold of :class:`~recsys_moe.model.observe.RouterMonitor`, which reports
the same experts as dead) is **revived**: its weights become those of the busiest expert
of the domain that uses it most (plus Gaussian noise, ``training.revive_noise`` times
that weight's standard deviation, so the two separate), its gate columns (every domain and
output) become the donor's (the weights jittered alike), so the router gives both about
the same logit and the donor's rows are shared between them; the optimiser's moments of what was
rewritten are zeroed. Every revival is returned (step, expert, donor, load share) for the
trainer to log.

Works on the MoE cores (MMoE, STAR; ``core.supports_revival``), replicated or expert
parallel: the loads are summed over workers first (one small all-reduce per window), so
every worker takes the same decisions, and a donor owned by another worker is sent by
one broadcast-shaped all-reduce.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from recsys_moe.model.observe import add_load, dead_experts, load_shares
from recsys_moe.model.ranker import ModelOutput, RankingModel


def _zero_moments(opt: Any, p: torch.Tensor, index: Any) -> None:
    """Zero the optimiser state tensors of ``p`` at ``index`` (Adam's moments, ...)."""
    state = opt.state.get(p) if opt is not None else None
    for v in (state or {}).values():
        if isinstance(v, torch.Tensor) and v.shape == p.shape:
            v[index] = 0


class ExpertReviver:
    """Watches a MoE core's routing and revives its dead experts (see the module doc).

    Args:
        model: the model being trained (its core must ``supports_revival``).
        after_steps: the window, in steps; 0 disables revival.
        threshold: ``dead_expert_threshold``.
        noise: ``revive_noise``.
        seed: noise seed (every worker draws the same noise).
        all_reduce: sums a tensor over workers in place (distributed training); None in
            one process.
    """

    def __init__(
        self,
        model: RankingModel,
        *,
        after_steps: int,
        threshold: float,
        noise: float = 0.01,
        seed: int = 0,
        all_reduce: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        core = model.core
        self.enabled = after_steps > 0 and getattr(core, "supports_revival", False)
        self.model, self.after, self.threshold, self.noise = model, after_steps, threshold, noise
        self.all_reduce = all_reduce
        self.gen = torch.Generator().manual_seed(seed)
        self.steps, self.total_steps = 0, 0
        self.events: list[dict[str, Any]] = []
        if self.enabled:
            g = core.gates
            # (observe.add_load) every gate output summed: the rule is per routing key
            self.load = torch.zeros(g.K, 1, g.E)
            self.tokens = torch.zeros(g.K)

    @classmethod
    def for_training(cls, model: RankingModel, cfg: Any, **kw: Any) -> ExpertReviver:
        """With ``training.revive_after_steps``, ``dead_expert_threshold``, ``revive_noise``."""
        return cls(
            model, after_steps=cfg.revive_after_steps, threshold=cfg.dead_expert_threshold,
            noise=cfg.revive_noise, seed=cfg.seed, **kw,
        )  # fmt: skip

    @torch.no_grad()
    def observe(self, out: ModelOutput, domain: torch.Tensor, optimizer: Any) -> list[dict]:
        """Account one training step's routing; at the end of a window revive the dead
        experts (in place, with ``optimizer``'s state reset for them). Returns this call's
        revivals."""
        if not self.enabled:
            return []
        layer = next(layer for layer in out.gates if layer.name == "gates")
        g = self.model.core.gates
        w = layer.route.weights.detach().float().sum(1, keepdim=True).cpu()  # (B, 1, E)
        key = layer.keys if layer.keys is not None else domain  # the gate row each row used
        d = key.long().cpu() if g.K > 1 else torch.zeros(w.shape[0], dtype=torch.long)
        if layer.rows is not None:  # rows of extensions were not routed by these gates
            keep = layer.rows.cpu()
            w, d = w[keep], d[keep]
        add_load(self.load, self.tokens, w, d)
        self.steps += 1
        self.total_steps += 1
        if self.steps < self.after:
            return []
        load, tokens = self.load, self.tokens
        if self.all_reduce is not None:
            both = torch.cat([load.flatten(), tokens])
            self.all_reduce(both)
            load, tokens = both[: load.numel()].view_as(load), both[load.numel() :]
        done = self._revive(load, tokens, optimizer)
        self.load.zero_()
        self.tokens.zero_()
        self.steps = 0
        self.events.extend(done)
        return done

    def dead(self, load: torch.Tensor, tokens: torch.Tensor) -> list[tuple[int, int, float]]:
        """(expert, donor, load share) for each dead expert of a window's (K, 1, E) load
        (every output of a routing key's gates together)."""
        allowed = self.model.core.gates.mask.any(1)  # (K, E)
        seen = tokens > 0
        share = load_shares(load.sum(1))  # (K, E)
        low = dead_experts(share, allowed, self.threshold)  # (K, E)
        out = []
        for e in range(share.shape[1]):
            gates = allowed[:, e] & seen
            if not bool(gates.any()) or not bool(low[gates, e].all()):
                continue
            # the domain that routes most to e's gates: its busiest other expert donates
            k = int(torch.where(gates, tokens, -1.0).argmax())
            cand = share[k].masked_fill(~allowed[k], -1.0)
            cand[e] = -1.0
            donor = int(cand.argmax())
            if float(cand[donor]) > 0:
                out.append((e, donor, float(share[gates, e].max())))
        return out

    def _revive(self, load: torch.Tensor, tokens: torch.Tensor, optimizer: Any) -> list[dict]:
        core = self.model.core
        events = []
        # a donor is never dead itself: the busiest of a domain's experts takes at least
        # 1 / n_allowed of its load, above threshold / n_allowed
        for e, donor, share in self.dead(load, tokens):
            _copy_expert(core.experts, e, donor, self.noise, self.gen, optimizer)
            _copy_gate_columns(core.gates, e, donor, self.noise, self.gen, optimizer)
            events.append({"step": self.total_steps, "expert": e, "donor": donor,
                           "load_share": share})  # fmt: skip
        return events


def _copy_expert(experts: Any, e: int, donor: int, noise: float, gen, optimizer: Any) -> None:
    """experts[e] := experts[donor] + noise, where the experts live (replicated or one
    worker's slice under expert parallelism)."""
    local = getattr(experts, "local", None)
    pool = local if local is not None else experts
    for p in [*pool.weights, *pool.biases]:
        if local is None:
            src, mine = p[donor].clone(), e
        else:  # the donor's owner sends it to everyone (a sum of zeros elsewhere)
            import torch.distributed as dist

            El, r = experts.n_local, experts.rank
            src = p[donor - r * El].clone() if donor // El == r else torch.zeros_like(p[0])
            dist.all_reduce(src, group=experts.group)
            mine = e - r * El if e // El == r else None
        # drawn on every worker, so that the generators stay in step
        jitter = torch.randn(src.shape, generator=gen) * (noise * float(src.float().std()))
        if mine is not None:
            p[mine] = src + jitter.to(src.dtype)
            _zero_moments(optimizer, p, mine)


def _copy_gate_columns(gates: Any, e: int, donor: int, noise: float, gen, optimizer: Any) -> None:
    """Every gate's column for expert ``e`` := the donor's (bias exactly; weights and noise
    weights with the same relative jitter as the expert's, so that rows split between the
    two instead of tying, which top-k would always break the donor's way)."""
    for p, kind in gates.channels():
        view = p.data.view(*p.shape[:-1], gates.K, gates.O, gates.E)
        src = view[..., donor].clone()
        if kind == "w":
            jitter = torch.randn(src.shape, generator=gen) * (noise * float(src.float().std()))
            src = src + jitter.to(src.dtype)
        view[..., e] = src
        if kind != "stat":
            _zero_moments(optimizer, p, (..., torch.arange(e, p.shape[-1], gates.E)))


@torch.no_grad()
def collapse_router(model: RankingModel, expert: int = 0, margin: float = 20.0) -> None:
    """Force a collapsed router (experiments and tests): every gate's logit for ``expert``
    raised by ``margin``, so under top-k routing it takes every row."""
    g = model.core.gates
    b = g.offset
    b.view(*b.shape[:-1], g.K, g.O, g.E)[..., expert] += margin


__all__ = ["ExpertReviver", "collapse_router"]
