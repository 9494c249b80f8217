"""Router observability: per gate (task x domain) expert load, mean gate probability,
gate entropy, dead experts and a collapse alarm, accumulated over a window of batches.

Feed every :class:`~recsys_moe.model.ranker.ModelOutput` with its batch's domains to
:meth:`RouterMonitor.update`; :meth:`RouterMonitor.metrics` returns a flat dict of floats
(``router/<layer>/<gate>/<domain>/<metric>`` plus totals) that training, serving and
batch scoring log as they are. :meth:`RouterMonitor.load_table` gives the load matrices
for plots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from recsys_moe.config import COLLAPSE_THRESHOLD, DEAD_EXPERT_THRESHOLD
from recsys_moe.model.ranker import ModelOutput


def add_load(load: torch.Tensor, tokens: torch.Tensor, weights: torch.Tensor,
             keys: torch.Tensor) -> None:  # fmt: skip
    """The router-load accumulator of the monitor and the reviver: each row's combine
    ``weights`` (B, O, E) added to ``load`` (K, O, E) at its routing key (B,), and the
    rows counted per key in ``tokens`` (K,)."""
    load.index_add_(0, keys, weights)
    tokens += torch.bincount(keys, minlength=tokens.shape[0]).float()


def load_shares(load: torch.Tensor) -> torch.Tensor:
    """Each expert's share of a gate's accumulated load (..., E); rows sum to 1."""
    return load / load.sum(-1, keepdim=True).clamp_min(1e-12)


def dead_experts(share: torch.Tensor, allowed: torch.Tensor, threshold: float) -> torch.Tensor:
    """The dead-expert rule (monitor and reviver): an expert a gate may use (``allowed``,
    (..., E) bool) is dead for it when its load ``share`` is below ``threshold /
    n_allowed``. Returns (..., E) bool."""
    n_allowed = allowed.sum(-1, keepdim=True).clamp_min(1)
    return (share < threshold / n_allowed) & allowed


@dataclass
class _Acc:
    outputs: list[str]
    n_experts: int
    tokens: torch.Tensor  # (K,)
    load: torch.Tensor  # (K, O, E) sum of combine weights (add_load)
    prob: torch.Tensor  # (K, O, E) sum of router probabilities
    entropy: torch.Tensor  # (K, O) sum of per-token gate entropy
    allowed: torch.Tensor | None = None  # (K, O, E) bool, experts a gate may use
    dropped: list[float] = field(default_factory=list)
    # per update: the layer's load-balancing and z losses, when the model computes them
    # (model.aux_loss_coef / z_loss_coef > 0)
    aux: list[float] = field(default_factory=list)
    z: list[float] = field(default_factory=list)


class RouterMonitor:
    """Accumulates routing statistics per gate layer.

    Args:
        domain_names: names of domain indices 1..K-1 (index 0 is "oov").
        dead_threshold: an expert whose load share is below ``dead_threshold / E_allowed``
            over the window counts as dead for that gate.
        collapse_threshold: a gate whose top expert takes more than this share of the load
            raises the collapse alarm.
    """

    def __init__(
        self,
        domain_names: list[str],
        dead_threshold: float = DEAD_EXPERT_THRESHOLD,
        collapse_threshold: float = COLLAPSE_THRESHOLD,
    ) -> None:
        self.domains = ["oov", *domain_names]
        self.dead_threshold, self.collapse_threshold = dead_threshold, collapse_threshold
        self.acc: dict[str, _Acc] = {}

    @classmethod
    def for_training(cls, domain_names: list[str], cfg: Any) -> RouterMonitor:
        """With the thresholds of ``training`` (``dead_expert_threshold``,
        ``collapse_threshold``)."""
        return cls(domain_names, cfg.dead_expert_threshold, cfg.collapse_threshold)

    def dead_below(self, n_allowed: int) -> float:
        """The load share under which one of a gate's ``n_allowed`` experts counts as dead
        (:func:`dead_experts`'s bound, for a gate whose load is a dict: serving)."""
        return self.dead_threshold / max(n_allowed, 1)

    def reset(self) -> None:
        self.acc.clear()

    @torch.no_grad()
    def update(self, out: ModelOutput, domain: torch.Tensor) -> None:
        K = len(self.domains)
        for layer in out.gates:
            w, p = layer.route.weights.float(), layer.route.probs.float()  # (B, O, E)
            d = domain.long()
            if layer.rows is not None:  # rows of extensions were not routed by this layer
                keep = layer.rows.cpu()
                w, p, d = w[keep], p[keep], d[keep]
            _, O, E = w.shape  # (B, O, E)
            a = self.acc.get(layer.name)
            if a is None:
                a = _Acc(layer.outputs, E, torch.zeros(K), torch.zeros(K, O, E),
                         torch.zeros(K, O, E), torch.zeros(K, O))  # fmt: skip
                self.acc[layer.name] = a
            d = d.clamp(0, K - 1)
            add_load(a.load, a.tokens, w, d)
            a.prob.index_add_(0, d, p)
            a.entropy.index_add_(0, d, -(p.clamp_min(1e-12).log() * p).sum(-1))  # (B, O)
            # experts with non-zero probability (masked ones have exactly 0)
            per_dom = torch.zeros(K, O, E).index_add_(0, d, (p > 0).float()) > 0
            a.allowed = per_dom if a.allowed is None else a.allowed | per_dom
            a.dropped.append(float(layer.route.dropped_fraction))
            aux, z = float(layer.route.aux_loss), float(layer.route.z_loss)
            if aux or z:  # computed (their coefficients are not both 0)
                a.aux.append(aux)
                a.z.append(z)

    def load_shares(self) -> dict[str, float]:
        """Just the ``.../load_e<e>`` entries of :meth:`metrics`: what a bundle keeps as
        its training-time routing (``router_load``), for serving to compare with."""
        return {k: v for k, v in self.metrics().items() if "/load_e" in k}

    def load_table(self, layer: str) -> torch.Tensor:
        """(O, K, E) load share per gate output, domain and expert (rows sum to 1)."""
        return load_shares(self.acc[layer].load).transpose(0, 1)

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        dead_total, collapsed_total = 0, 0
        aux_total, z_total, has_losses = 0.0, 0.0, False
        for name, a in self.acc.items():
            share = load_shares(a.load)  # (K, O, E)
            mean_p = a.prob / a.tokens.view(-1, 1, 1).clamp_min(1)
            allowed_all = (
                a.allowed if a.allowed is not None else torch.ones_like(share, dtype=torch.bool)
            )
            dead_all = dead_experts(share, allowed_all, self.dead_threshold)  # (K, O, E)
            for o, gate in enumerate(a.outputs):
                for k, dom in enumerate(self.domains):
                    if a.tokens[k] == 0:
                        continue
                    allowed = allowed_all[k, o]
                    n_allowed = int(allowed.sum())
                    s = share[k, o]
                    key = f"router/{name}/{gate}/{dom}"
                    dead = int(dead_all[k, o].sum())
                    top = float(s.max())
                    collapsed = n_allowed > 1 and top > self.collapse_threshold
                    for e in range(a.n_experts):
                        if allowed[e]:
                            out[f"{key}/load_e{e}"] = float(s[e])
                            out[f"{key}/prob_e{e}"] = float(mean_p[k, o, e])
                    out[f"{key}/entropy"] = float(a.entropy[k, o] / a.tokens[k])
                    out[f"{key}/entropy_max"] = math.log(max(n_allowed, 1))
                    out[f"{key}/dead_experts"] = float(dead)
                    out[f"{key}/top_load"] = top
                    out[f"{key}/collapsed"] = float(collapsed)
                    dead_total += dead
                    collapsed_total += int(collapsed)
            if a.dropped:
                out[f"router/{name}/dropped_fraction"] = float(sum(a.dropped) / len(a.dropped))
            if a.aux:  # the regularisers' mean values over the window (before coefficients)
                out[f"router/{name}/aux_loss"] = float(sum(a.aux) / len(a.aux))
                out[f"router/{name}/z_loss"] = float(sum(a.z) / len(a.z))
                aux_total += out[f"router/{name}/aux_loss"]
                z_total += out[f"router/{name}/z_loss"]
                has_losses = True
        if has_losses:
            out["router/aux_loss"], out["router/z_loss"] = aux_total, z_total
        out["router/dead_experts"] = float(dead_total)
        out["router/collapsed_gates"] = float(collapsed_total)
        return out
