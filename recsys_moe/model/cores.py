"""The expert cores, one module per architecture, all with one forward signature:

    core(x (B, d_in), domain (B,), sides (2, B, P, D) | None)
        -> task representations (B, T, H), the gate layers that routed them

- :class:`SharedBottomCore`: one expert every task reads (the baseline);
- :class:`MoECore`: E experts and per (task, domain) gates (MMoE); with a domain mask
  over the experts it is STAR (shared experts + experts private to each domain); it can
  gain domains after training (:class:`DomainExtension`, ``recsys-moe extend``);
- :class:`PLECore`: progressive layered extraction (CGC levels of shared and task
  experts).

:class:`~recsys_moe.model.ranker.RankingModel` composes embeddings, a core and the
towers; what a model can do beyond scoring is asked of its core
(``supports_domain_slices``, ``supports_expert_parallel``, ``supports_extension``),
never read from ``model.arch`` elsewhere.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from recsys_moe.config import ModelConfig
from recsys_moe.model.experts import GroupedExperts, StackedExperts
from recsys_moe.model.routing import GateBank, GateLayer, RouteOut, route

SHARED = "shared"


# set by experts_on_meta(): MoE cores build their expert pool without storage
_POOL_ON_META: contextvars.ContextVar[bool] = contextvars.ContextVar("pool_on_meta", default=False)


@contextlib.contextmanager
def experts_on_meta() -> Iterator[None]:
    """Models built inside hold their MoE expert pool on the meta device (shapes, no
    storage): a scorer that reads each domain's experts from the bundle on demand
    (recsys_moe.model.offload) never has the whole pool in memory."""
    token = _POOL_ON_META.set(True)
    try:
        yield
    finally:
        _POOL_ON_META.reset(token)


def _experts(cfg: ModelConfig, n: int, d_in: int) -> StackedExperts:
    experts = StackedExperts(
        n_experts=n, d_in=d_in, hidden=cfg.expert_hidden, dropout=cfg.dropout,
        impl=cfg.expert_impl, batch_norm=cfg.expert_norm == "batch",
    )  # fmt: skip
    experts.sparse = cfg.sparse_experts
    return experts


class ExpertCore(nn.Module):
    """Base of the cores: routing helpers and the capabilities (all off)."""

    supports_domain_slices = False  # a domain's rows need only part of the experts
    supports_expert_parallel = False  # one expert pool, split across workers
    supports_extension = False  # can gain a domain after training
    supports_revival = False  # dead experts can be re-initialised (model/revive.py)

    def __init__(self, cfg: ModelConfig, task_names: list[str]) -> None:
        super().__init__()
        self.cfg, self.task_names, self.n_tasks = cfg, list(task_names), len(task_names)

    def gate(
        self, gates: GateBank, x: torch.Tensor, domain: torch.Tensor
    ) -> tuple[RouteOut, torch.Tensor, torch.Tensor]:
        """The routing of ``gates`` for ``x``, with the gate logits and mask it came from."""
        dom = domain if gates.K > 1 else torch.zeros_like(domain)
        logits, std, mask = gates(x, dom)
        c = self.cfg
        r = route(
            logits, mask, mode=c.routing, top_k=c.top_k, capacity_factor=c.capacity_factor,
            noise_std=std, training=self.training,
            losses=c.aux_loss_coef > 0 or c.z_loss_coef > 0,
        )  # fmt: skip
        return r, logits, mask

    def forward(
        self,
        x: torch.Tensor,
        domain: torch.Tensor,
        sides: torch.Tensor | None = None,
        segment: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[GateLayer]]:
        """``segment``: each row's user-segment index, given to cores that route by it
        (``segment_keyed``)."""
        raise NotImplementedError

    segment_keyed = False  # routes by the user segment as well (model.expert_groups)


class SharedBottomCore(ExpertCore):
    """One expert (the shared bottom) whose output every task tower reads."""

    def __init__(
        self, cfg: ModelConfig, *, d_in: int, task_names: list[str], n_domains: int
    ) -> None:
        super().__init__(cfg, task_names)
        self.experts = _experts(cfg, 1, d_in)

    def forward(self, x, domain, sides=None, segment=None):
        h = self.experts(x)  # (B, 1, H)
        return h.expand(-1, self.n_tasks, -1), []


@dataclass(frozen=True)
class Extension:
    """Experts added to a trained model by ``recsys-moe extend``: a new ``domain`` (or,
    with ``grows``, an existing one gaining capacity), its own ``experts`` (new), and a
    gate per output over the parent experts in ``reach`` plus its own. The domain's rows
    are then computed by the extension; every other domain's as before."""

    domain: str
    experts: int
    reach: tuple[int, ...]
    # the domain's own crosses: ((A_p @ left_p) * right_p) for each of the model's
    # interactions p, appended to its experts' input (A_p starts as the identity)
    cross: bool = False
    # True: ``domain`` is one the parent was trained on (``extend --add-experts``)
    grows: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Extension:
        return cls(d["domain"], int(d["experts"]), tuple(d["reach"]), bool(d.get("cross")),
                   bool(d.get("grows")))  # fmt: skip


class DomainExtension(nn.Module):
    """The parameters one :class:`Extension` adds: ``experts``, a one-domain gate bank over
    ``base + experts`` experts (the parent experts outside ``reach`` masked out) and, with
    ``cross``, a D x D transform per interaction whose crosses only its experts read."""

    def __init__(
        self, ext: Extension, *, d_in: int, n_outputs: int, base_experts: int, cfg: ModelConfig
    ) -> None:
        super().__init__()
        self.domain, self.reach = ext.domain, list(ext.reach)
        n_cross = len(cfg.interactions) if ext.cross else 0
        D = cfg.embedding_dim
        self.cross = (
            nn.Parameter(torch.eye(D).repeat(n_cross, 1, 1)) if n_cross else None
        )  # (P, D, D)
        self.experts = _experts(cfg, ext.experts, d_in + n_cross * D)
        E = base_experts + ext.experts
        mask = torch.zeros(1, 1, E, dtype=torch.bool)
        mask[..., self.reach] = True
        mask[..., base_experts:] = True
        self.gates = GateBank(d_in=d_in, n_outputs=n_outputs, n_domains=1, n_experts=E,
                              mask=mask, noisy=cfg.routing == "noisy_topk",
                              batch_norm=cfg.gate_norm == "batch")  # fmt: skip


def fused_combine(experts: torch.Tensor) -> Callable | None:
    """Triton's fused gate softmax + weighted sum (``triton_kernels.gate_combine``) for
    CUDA tensors where Triton is installed; None elsewhere (the torch path)."""
    if not experts.is_cuda:
        return None
    from recsys_moe.model import triton_kernels

    return triton_kernels.gate_combine if triton_kernels.use_triton(experts) else None


def combine(cfg: ModelConfig, r: RouteOut, logits, mask, experts: torch.Tensor) -> torch.Tensor:
    """Gate weights x expert outputs -> (B, O, H): the fused kernel for dense (softmax)
    gates where :func:`fused_combine` offers one, the torch path everywhere else. Same
    result either way."""
    kernel = fused_combine(experts) if cfg.routing == "softmax" else None
    if kernel is not None:
        return kernel(logits, mask, experts)
    return torch.einsum("boe,beh->boh", r.weights, experts)


class MoECore(ExpertCore):
    """E experts and gates per (task, routing key) over them (MMoE). With expert groups
    (``cfg.groups``) it generalises STAR: ``cfg.shared_experts`` experts every key reaches
    plus ``cfg.specific_experts`` private to each domain (group "domain": STAR), to each
    user segment ("user_segment"), or both; the routing key is then (domain, segment)
    and a key's gates reach the shared experts plus its domain's and its segment's.
    Domains extended after training (``extensions``) route their rows through their own
    experts and gates; every other row is computed exactly as before."""

    supports_domain_slices = True
    supports_expert_parallel = True
    supports_extension = True
    supports_revival = True

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        d_in: int,
        task_names: list[str],
        n_domains: int,
        n_segments: int = 0,
        extensions: list[Extension] | None = None,
        extension_domains: list[int] | None = None,
    ) -> None:
        super().__init__(cfg, task_names)
        extensions = list(extensions or [])
        groups = cfg.groups
        self.segment_keyed = "user_segment" in groups
        if self.segment_keyed and n_segments < 2:
            raise ValueError(
                "model.expert_groups: 'user_segment' needs the user_segment feature "
                "(features.history_features = true)"
            )
        if self.segment_keyed and extensions:
            raise ValueError("a model with user-segment experts cannot be extended (yet)")
        # extensions route by domain; a segment-keyed model has none
        self.supports_extension = not self.segment_keyed
        if cfg.expert_norm == "batch":
            # each unit's statistics were gathered over all the pool's rows in one model: a
            # domain slice, a shard, a revived or an added expert would compute without them
            self.supports_domain_slices = self.supports_expert_parallel = False
            self.supports_extension = self.supports_revival = False
        # the domains the base gates were trained for: all but the added ones
        K = n_domains - sum(not e.grows for e in extensions)
        self.base_domains = K
        # the domain index whose rows each extension computes (added domains follow the
        # base ones in order; a grown domain keeps its index)
        if extension_domains is None:
            extension_domains = list(range(K, K + len(extensions)))
        self.extension_domains = list(extension_domains)
        self.outputs = self.n_tasks if cfg.gates == "task" else 1
        # what each gate output feeds: the tasks, or one output every task shares
        self.output_names = self.task_names if self.outputs == self.n_tasks else [SHARED]
        # routing keys: (domain, segment) -> domain * key_segments + segment
        self.key_domains = K if (cfg.gate_by_domain or "domain" in groups) else 1
        self.key_segments = n_segments if self.segment_keyed else 1
        mask = None
        if groups:
            S, P = cfg.shared_experts, cfg.specific_experts
            sizes = {"domain": K, "user_segment": n_segments}
            E = S + P * sum(sizes[g] for g in groups)
            mask = torch.zeros(self.key_domains * self.key_segments, 1, E, dtype=torch.bool)
            mask[:, :, :S] = True  # shared, then each group's blocks of P per value
            for kd in range(self.key_domains):
                for ks in range(self.key_segments):
                    off = S
                    for g in groups:
                        v = kd if g == "domain" else ks
                        mask[kd * self.key_segments + ks, :, off + v * P : off + (v + 1) * P] = True
                        off += sizes[g] * P
        else:
            E = cfg.n_experts
        # a pool without domain slices is never offloaded: it is read whole
        on_meta = _POOL_ON_META.get() and self.supports_domain_slices
        with torch.device("meta") if on_meta else contextlib.nullcontext():
            self.experts: nn.Module = _experts(cfg, E, d_in)
        self.gates = GateBank(
            d_in=d_in,
            n_outputs=self.outputs,
            n_domains=self.key_domains * self.key_segments,
            n_experts=E,
            mask=mask,
            noisy=cfg.routing == "noisy_topk",
            batch_norm=cfg.gate_norm == "batch",
        )
        self.extension_specs = extensions
        self.extensions = nn.ModuleList(
            DomainExtension(e, d_in=d_in, n_outputs=self.outputs, base_experts=E, cfg=cfg)
            for e in extensions
        )

    def extension_of(self, domain: int) -> int | None:
        """The index of the extension that computes domain index ``domain``'s rows, if any."""
        return self.extension_domains.index(domain) if domain in self.extension_domains else None

    def route_key(self, domain: torch.Tensor, segment: torch.Tensor | None) -> torch.Tensor:
        """Each row's gate index: its domain, or (domain, user segment) when keyed by both."""
        if not self.segment_keyed:
            return domain
        return (domain if self.key_domains > 1 else 0) * self.key_segments + segment

    def keys_of(self, domain: int, segments: list[int] | None = None) -> list[int]:
        """The routing keys of domain index ``domain`` (and of user segments ``segments``
        only, when keyed by segment; None: all)."""
        kd = domain if self.key_domains > 1 else 0
        segs = range(self.key_segments) if segments is None or not self.segment_keyed else segments
        return [kd * self.key_segments + s for s in segs]

    def reachable_experts(self, domain: int, segments: list[int] | None = None) -> list[int]:
        """The experts the gates of domain index ``domain`` (for users of ``segments``,
        None: any) can give weight to."""
        j = self.extension_of(domain)
        if j is not None:  # extended: reach + its own experts
            ext = self.extensions[j]
            E = self.experts.n_experts
            return [*ext.reach, *range(E, E + ext.experts.n_experts)]
        rows = self.gates.mask[self.keys_of(domain, segments)]  # (keys, O, E)
        return torch.nonzero(rows.any(0).any(0)).flatten().tolist()

    def mixture(
        self, x: torch.Tensor, domain: torch.Tensor
    ) -> tuple[torch.Tensor, RouteOut, torch.Tensor]:
        """The gates' mixture (B, O, H) of the experts, the routing, the expert outputs."""
        r, logits, mask = self.gate(self.gates, x, domain)  # weights (B, O, E)
        sparse = self.cfg.routing != "softmax"
        experts = self.experts(x, (r.weights > 0).any(1) if sparse else None)  # (B, E, H)
        return combine(self.cfg, r, logits, mask, experts), r, experts

    def extension_mixture(
        self,
        ext: DomainExtension,
        x: torch.Tensor,
        sides: torch.Tensor | None,
        base: torch.Tensor,
    ) -> torch.Tensor:
        """An added domain's rows: its gates' mixture (b, O, H) of the parent's expert
        outputs ``base`` (b, E, H) and its own experts (reading its own crosses too)."""
        own_in = x
        if ext.cross is not None and sides is not None:
            mine = torch.einsum("pde,bpe->bpd", ext.cross, sides[0]) * sides[1]  # (b, P, D)
            own_in = torch.cat([x, mine.flatten(1).to(x.dtype)], dim=1)  # x: bf16 training
        cand = torch.cat([base, ext.experts(own_in)], dim=1)  # (b, E+P, H)
        r, logits, mask = self.gate(ext.gates, x, x.new_zeros(x.shape[0], dtype=torch.long))
        return combine(self.cfg, r, logits, mask, cand)

    def forward(self, x, domain, sides=None, segment=None):
        T, K = self.n_tasks, self.base_domains
        outputs = self.output_names
        ext_rows = None
        if len(self.extensions):
            ext_rows = torch.isin(domain, domain.new_tensor(self.extension_domains))
        if ext_rows is None or not bool(ext_rows.any()):
            key = self.route_key(domain, segment)
            reps, r, _ = self.mixture(x, key)
            keys = key if self.segment_keyed else None
            return reps.expand(-1, T, -1), [GateLayer("gates", outputs, r, keys=keys)]
        # rows of extended domains: the parent's experts + their own, under their own
        # gates; every other row is computed exactly as by the parent (same ops, batch)
        layers, experts = [], None
        if bool(ext_rows.all()):
            reps = x.new_zeros(x.shape[0], self.outputs, self.experts.d_out)
        else:
            reps, r, experts = self.mixture(x, torch.where(domain >= K, 0, domain))
            layers.append(GateLayer("gates", outputs, r, rows=~ext_rows))
            if self.cfg.routing != "softmax":  # sparse: not every expert ran on every row
                experts = None
        for j, ext in enumerate(self.extensions):
            rows = torch.nonzero(domain == self.extension_domains[j]).flatten()
            if not len(rows):
                continue
            xe = x[rows]
            side = sides[:, rows] if sides is not None else None
            base = experts[rows] if experts is not None else self.experts(xe)
            reps = reps.index_copy(0, rows, self.extension_mixture(ext, xe, side, base))
        return reps.expand(-1, T, -1), layers


class PLECore(ExpertCore):
    """Progressive layered extraction: per level, shared experts and each task's own, task
    gates over (shared + own) and, below the top level, a shared gate over all of them."""

    def __init__(
        self, cfg: ModelConfig, *, d_in: int, task_names: list[str], n_domains: int
    ) -> None:
        super().__init__(cfg, task_names)
        S, P, L, T = cfg.shared_experts, cfg.specific_experts, cfg.ple_levels, self.n_tasks
        H = cfg.expert_hidden[-1]
        K = n_domains if cfg.gate_by_domain else 1
        noisy, bn = cfg.routing == "noisy_topk", cfg.gate_norm == "batch"
        self.shared_experts = nn.ModuleList()
        self.task_experts = nn.ModuleList()
        self.task_gates = nn.ModuleList()
        self.shared_gates = nn.ModuleList()
        for level in range(L):
            din = d_in if level == 0 else H
            self.shared_experts.append(_experts(cfg, S, din))
            self.task_experts.append(GroupedExperts(n_groups=T, per_group=P, d_in=din,
                                                    hidden=cfg.expert_hidden, dropout=cfg.dropout,
                                                    batch_norm=cfg.expert_norm == "batch"))  # fmt: skip
            self.task_gates.append(GateBank(d_in=din, n_outputs=T, n_domains=K, n_experts=S + P,
                                            per_output_input=level > 0, noisy=noisy,
                                            batch_norm=bn))  # fmt: skip
            if level < L - 1:
                self.shared_gates.append(
                    GateBank(
                        d_in=din,
                        n_outputs=1,
                        n_domains=K,
                        n_experts=S + T * P,
                        noisy=noisy,
                        batch_norm=bn,
                    )
                )

    def forward(self, x, domain, sides=None, segment=None):
        T, names = self.n_tasks, self.task_names
        layers: list[GateLayer] = []
        task_in, shared_in = None, x
        L = len(self.shared_experts)
        for level in range(L):
            shared = self.shared_experts[level](shared_in)  # (B, S, H)
            tin = x.unsqueeze(1).expand(-1, T, -1) if task_in is None else task_in  # (B, T, d)
            own = self.task_experts[level](tin)  # (B, T, P, H)
            cand = torch.cat([shared.unsqueeze(1).expand(-1, T, -1, -1), own], dim=2)
            r = self.gate(self.task_gates[level], x if task_in is None else task_in, domain)[0]
            task_out = torch.einsum("bte,bteh->bth", r.weights, cand)  # (B, T, H)
            layers.append(GateLayer(f"level{level}", list(names), r))
            if level < L - 1:
                every = torch.cat([shared, own.flatten(1, 2)], dim=1)  # (B, S+T*P, H)
                rs = self.gate(self.shared_gates[level], shared_in, domain)[0]
                shared_in = torch.einsum("boe,beh->boh", rs.weights, every).squeeze(1)  # (B, H)
                layers.append(GateLayer(f"level{level}_shared", [SHARED], rs))
            task_in = task_out
        return task_in, layers


def build_core(
    cfg: ModelConfig,
    *,
    d_in: int,
    task_names: list[str],
    n_domains: int,
    extensions: list[Extension] | None = None,
    extension_domains: list[int] | None = None,
    n_segments: int = 0,
) -> ExpertCore:
    """The core of ``cfg.arch`` (``n_domains`` counts the out-of-vocabulary slot and any
    added domains; ``extension_domains``: the domain index each extension computes;
    ``n_segments``: values of the user-segment feature, 0 without it)."""
    if extensions and cfg.arch not in ("mmoe", "star"):
        raise ValueError(f"model.arch {cfg.arch!r}: only mmoe and star models can be extended")
    kw = {"d_in": d_in, "task_names": task_names, "n_domains": n_domains}
    if cfg.arch == "shared_bottom":
        return SharedBottomCore(cfg, **kw)
    if cfg.arch == "ple":
        return PLECore(cfg, **kw)
    if cfg.arch in ("mmoe", "star"):
        return MoECore(cfg, **kw, n_segments=n_segments, extensions=extensions,
                       extension_domains=extension_domains)  # fmt: skip
    raise ValueError(f"model.arch {cfg.arch!r}")  # validated by ModelConfig


__all__ = [
    "SHARED",
    "DomainExtension",
    "ExpertCore",
    "Extension",
    "MoECore",
    "PLECore",
    "SharedBottomCore",
    "build_core",
    "combine",
]
