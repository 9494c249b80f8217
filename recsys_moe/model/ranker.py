"""The multi-task, multi-domain ranking model, composed from single-purpose parts:

    EmbeddingArch (torchrec EBC, all tables)  ->  x = [pooled embeddings | crosses | dense]
                                                   (LayerNorm, model.input_norm)
    core (recsys_moe/model/cores.py, one per architecture: shared-bottom | MMoE / STAR | PLE)
          -> task representations (B, T, H) and the routing of every gate layer
    TaskTowers (stacked per-task MLPs)          ->  logits (B, T) -> predictions (B, T)

Gates are per (task, domain): each example reads the gates of its own domain. Funnel
tasks (ESMM) predict ``p(child) = p(parent) * sigmoid(child logit)``. The model defines
the computation only: no optimiser, device placement, logging or I/O here.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_moe.config import ModelConfig
from recsys_moe.model.cores import ExpertCore, Extension, MoECore, build_core
from recsys_moe.model.experts import GroupedExperts
from recsys_moe.model.inputs import Batch, InputSpec
from recsys_moe.model.routing import GateLayer


class EmbeddingArch(nn.Module):
    """All categorical features through one torchrec ``EmbeddingBagCollection``.

    One table per feature (``vocab_size`` rows, dim D, row 0 = out-of-vocabulary);
    sum pooling for single-valued features, mean pooling for multi-valued ones.
    """

    def __init__(
        self,
        spec: InputSpec,
        dim: int,
        device: torch.device | None = None,
        init_std: float = 0.0,
    ) -> None:
        super().__init__()
        self.names = [f.name for f in spec.sparse]
        # 0: torchrec's default init, uniform in +-1/sqrt(rows) (large for small tables)
        init_fn = functools.partial(nn.init.normal_, std=init_std) if init_std > 0 else None
        tables = [
            EmbeddingBagConfig(
                num_embeddings=f.vocab_size,
                embedding_dim=dim,
                name=f"t_{f.name}",
                feature_names=[f.name],
                pooling=PoolingType.MEAN if f.multi_valued else PoolingType.SUM,
                init_fn=init_fn,
            )
            for f in spec.sparse
        ]
        self.ebc = EmbeddingBagCollection(tables=tables, device=device)
        self.out_dim = dim * len(tables)

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        """-> (B, F*D), features in spec order (indexed by key: sharded outputs reorder)."""
        kt = self.ebc(kjt)
        if kt.keys() == self.names:  # already in order: no copy
            return kt.values()
        pooled = kt.to_dict()
        return torch.cat([pooled[n] for n in self.names], dim=1)


class TaskTowers(nn.Module):
    """T towers as stacked parameters: (B, T, H) -> (B, T) logits."""

    def __init__(
        self, *, n_tasks: int, d_in: int, hidden: list[int], batch_norm: bool = False
    ) -> None:
        super().__init__()
        self.mlp = (
            GroupedExperts(
                n_groups=n_tasks, per_group=1, d_in=d_in, hidden=hidden, batch_norm=batch_norm
            )
            if hidden
            else None
        )
        last = hidden[-1] if hidden else d_in
        self.out_w = nn.Parameter(torch.empty(n_tasks, last).uniform_(-(last**-0.5), last**-0.5))
        self.out_b = nn.Parameter(torch.zeros(n_tasks))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.mlp is not None:
            h = self.mlp(h).squeeze(2)  # (B, T, h)
        return (h * self.out_w).sum(-1) + self.out_b  # (B, T)


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T) tower outputs
    preds: torch.Tensor  # (B, T) probabilities (binary) or values (regression)
    gates: list[GateLayer] = field(default_factory=list)

    @property
    def aux_loss(self) -> torch.Tensor:
        return sum((g.route.aux_loss for g in self.gates), self.logits.new_zeros(()))

    @property
    def z_loss(self) -> torch.Tensor:
        return sum((g.route.z_loss for g in self.gates), self.logits.new_zeros(()))


class RankingModel(nn.Module):
    """Embeddings -> an expert core (per ``cfg.arch``, :mod:`recsys_moe.model.cores`) ->
    task towers.

    Args:
        spec: inputs, tasks and domains (from the feature-store manifest).
        cfg: the model section of the config.
        extensions: domains added after training (``recsys-moe extend``; the core must
            ``supports_extension``): the last ``len(extensions)`` domains of ``spec``, in
            order. Their rows are computed by their own experts and gates; every other
            row exactly as before.
    """

    # state-dict keys written before the cores existed: "<part>." -> "core.<part>."
    _CORE_PARTS = ("experts.", "gates.", "extensions.", "shared_experts.", "task_experts.",
                   "task_gates.", "shared_gates.")  # fmt: skip

    def __init__(
        self,
        spec: InputSpec,
        cfg: ModelConfig,
        device: torch.device | None = None,
        extensions: Sequence[Extension] = (),
    ) -> None:
        super().__init__()
        self.spec, self.cfg = spec, cfg
        extensions = list(extensions)
        new = [e.domain for e in extensions if not e.grows]
        added = spec.domains[len(spec.domains) - len(new) :] if new else []
        if new != added:
            raise ValueError(f"extensions {new} != last domains {added}")
        # the domains the base gates were trained for (domain index < K)
        self.base_domains = spec.n_domains - len(new)
        ext_domains = []
        for e in extensions:
            if e.domain not in spec.domains:
                raise ValueError(f"extension of domain {e.domain!r}: not in {spec.domains}")
            k = spec.domains.index(e.domain) + 1  # index 0 is out-of-vocabulary
            if k in ext_domains:
                raise ValueError(f"domain {e.domain!r} is extended twice")
            ext_domains.append(k)
        self.extension_specs = extensions
        # mixed-precision training (recsys_moe.training.training_dtype): the dtype experts,
        # gates and towers compute in while training; None = float32. Eval is float32.
        self.train_dtype: torch.dtype | None = None
        self.embedding = EmbeddingArch(spec, cfg.embedding_dim, device, cfg.embedding_init_std)
        names = [f.name for f in spec.sparse]
        # each cross "a+b*c+d" is (e_a + e_b) * (e_c + e_d): two 0/1 selection rows over features
        sides = torch.zeros(2, len(cfg.interactions), len(names))
        for i, pair in enumerate(cfg.interactions):
            for side, part in enumerate(pair.split("*")):
                for f in part.split("+"):
                    if f not in names:
                        raise ValueError(
                            f"model.interactions: {f!r} is not a categorical feature; have {names}"
                        )
                    sides[side, i, names.index(f)] = 1.0
        self.register_buffer("_cross", sides, persistent=False)
        # the same selection as one GEMM over the flat pooled embeddings (B, F*D): kron(S^T,
        # I_D) (F*D, 2P*D). A broadcast matmul of S over (B, F, D) is B tiny GEMMs forward
        # and backward; this is one small dense GEMM each way (zeros included)
        sel = sides.view(-1, len(names)).t().contiguous()  # (F, 2P)
        self.register_buffer(
            "_cross_gemm", torch.kron(sel, torch.eye(cfg.embedding_dim)), persistent=False
        )
        d_in = self.embedding.out_dim + len(cfg.interactions) * cfg.embedding_dim + len(spec.dense)
        # pooled embeddings, crosses and standardised dense features arrive at different
        # scales; one LayerNorm puts every row's x on one scale for experts and gates
        self.input_norm = nn.LayerNorm(d_in) if cfg.input_norm == "layer" else None
        self.task_names = spec.task_names
        # the user-segment feature (derived by the store), which segment experts route by
        seg = [f for f in spec.sparse if f.source == "derived"]
        self._segment_key = seg[0].name if seg else None
        self.core: ExpertCore = build_core(
            cfg, d_in=d_in, task_names=self.task_names, n_domains=spec.n_domains,
            extensions=extensions, extension_domains=ext_domains,
            n_segments=seg[0].vocab_size if seg else 0,
        )  # fmt: skip
        self.towers = TaskTowers(
            n_tasks=len(spec.tasks), d_in=cfg.expert_hidden[-1], hidden=cfg.tower_hidden,
            batch_norm=cfg.tower_norm == "batch",
        )  # fmt: skip
        self._parent = [
            self.task_names.index(t.funnel_parent) if t.funnel_parent else -1 for t in spec.tasks
        ]
        for i, p in enumerate(self._parent):
            if p >= i:
                raise ValueError(
                    f"task {self.task_names[i]!r}: its funnel parent must be declared before it"
                )
        if cfg.funnel == "independent":  # every task its own probability and loss
            self._parent = [-1] * len(self._parent)
        self._binary = [t.kind == "binary" for t in spec.tasks]
        self._ids = [f.name for f in spec.sparse if f.source == "id" and not f.multi_valued]
        self._register_load_state_dict_pre_hook(self._legacy_keys)

    def _legacy_keys(self, state_dict, prefix, *args) -> None:
        for key in list(state_dict):
            rest = key[len(prefix) :]
            if key.startswith(prefix) and rest.startswith(self._CORE_PARTS):
                state_dict[f"{prefix}core.{rest}"] = state_dict.pop(key)

    # --------------------------------------------------------------- capabilities

    @property
    def supports_domain_slices(self) -> bool:
        """A domain's rows need only the experts its gates reach (STAR, MMoE)."""
        return self.core.supports_domain_slices

    @property
    def supports_expert_parallel(self) -> bool:
        """One expert pool that can be split across workers (MMoE, STAR)."""
        return self.core.supports_expert_parallel

    @property
    def supports_extension(self) -> bool:
        """Can gain a domain after training (``recsys-moe extend``)."""
        return self.core.supports_extension

    def require_extendable(self) -> MoECore:
        """The core, if this model can gain a domain; a ValueError naming the arch if not."""
        if not self.supports_extension:
            why = (
                "user-segment experts (model.expert_groups) route by segment, extensions by domain"
                if self.core.segment_keyed
                else "only mmoe and star models can be extended"
            )
            raise ValueError(f"model.arch {self.cfg.arch!r}: {why}")
        return self.core  # type: ignore[return-value]

    @property
    def experts(self) -> nn.Module:
        """The core's expert pool (the shared experts' first level for PLE)."""
        core = self.core
        return core.experts if hasattr(core, "experts") else core.shared_experts[0]

    @property
    def gates(self):
        return self.core.gates

    @property
    def extensions(self) -> nn.ModuleList:
        return getattr(self.core, "extensions", nn.ModuleList())

    def set_experts(self, experts: nn.Module) -> None:
        """Swap the expert pool (an expert-parallel slice of it)."""
        self.core.experts = experts

    def with_core(self, core: ExpertCore) -> RankingModel:
        """A copy sharing embeddings, towers and buffers, computing with ``core`` (a
        domain slice of this model's)."""
        import copy

        out = copy.copy(self)
        out._modules = dict(self._modules)
        out._modules["core"] = core
        return out.eval()

    # --------------------------------------------------------------- parts

    def head(self, reps: torch.Tensor) -> ModelOutput:
        """(B, O, H) gate-output representations -> towers -> logits and predictions."""
        logits = self.towers(reps.expand(-1, len(self.task_names), -1))
        return ModelOutput(logits, self.predictions(logits))

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        """Tower logits (B, T) -> probabilities (funnel products) or regression values."""
        cols = []
        for i, (binary, parent) in enumerate(zip(self._binary, self._parent, strict=True)):
            p = torch.sigmoid(logits[:, i]) if binary else logits[:, i]
            cols.append(p * cols[parent] if parent >= 0 else p)
        return torch.stack(cols, dim=1)

    def inputs(self, batch: Batch) -> torch.Tensor:
        """The expert input x: (B, d_in) = [pooled embeddings | crosses | dense]."""
        return self.expert_inputs(batch)[0]

    def expert_inputs(
        self, batch: Batch, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x, and the crosses' two sides (2, B, P, D) (None without crosses). ``dtype``:
        the parts are cast before they are concatenated (one pass fewer over x than a
        cast after the cat)."""
        sparse = batch.sparse
        if self.training and self.cfg.id_dropout > 0 and self._ids:
            sparse = drop_ids(sparse, self._ids, self.cfg.id_dropout)
        emb = self.embedding(sparse)  # (B, F*D)
        parts, sides = [emb], None
        if self._cross.shape[1]:
            sides = self.cross_sides(emb.view(emb.shape[0], -1, self.cfg.embedding_dim))
            parts.append((sides[0] * sides[1]).flatten(1))  # (B, P*D)
        parts.append(batch.dense)
        if self.input_norm is not None:  # normalised in float32, then cast
            x = self.input_norm(torch.cat(parts, dim=1))
            return (x if dtype is None else x.to(dtype)), sides
        if dtype is not None:
            parts = [p.to(dtype) for p in parts]
        return torch.cat(parts, dim=1), sides

    def cross_sides(self, e: torch.Tensor) -> torch.Tensor:
        """Pooled embeddings (B, F, D) -> both sides of every cross (2, B, P, D): side s of
        cross p is the sum of its features' embeddings (one GEMM of the flat embeddings
        with the 0/1 selection expanded over D, ``_cross_gemm``)."""
        two, P, _ = self._cross.shape
        s = e.reshape(e.shape[0], -1) @ self._cross_gemm  # (B, 2P*D)
        return s.view(e.shape[0], two, P, -1).transpose(0, 1)

    def segments(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        """(B,) each row's user-segment index (a single-valued feature of the batch)."""
        i = kjt.keys().index(self._segment_key)
        off = kjt.offset_per_key()
        return kjt.values()[off[i] : off[i + 1]]

    def forward(self, batch: Batch) -> ModelOutput:
        # core and towers in train_dtype while training (training.precision); x is cast
        # once, here, not by autocast once per expert and gate
        dt = self.train_dtype if self.training else None
        x, sides = self.expert_inputs(batch, dt)  # (B, d_in)
        segment = self.segments(batch.sparse) if self.core.segment_keyed else None
        with torch.autocast(x.device.type, dtype=dt or torch.bfloat16, enabled=dt is not None):
            reps, layers = self.core(x, batch.domain, sides, segment)  # (B, T, H)
            logits = self.towers(reps).float()  # (B, T)
        return ModelOutput(logits, self.predictions(logits), layers)


def drop_ids(kjt: KeyedJaggedTensor, keys: list[str], p: float) -> KeyedJaggedTensor:
    """``kjt`` with each value of the single-valued features ``keys`` replaced by the
    out-of-vocabulary index 0 with probability ``p`` (training-time id dropout)."""
    values = kjt.values().clone()
    offsets = kjt.offset_per_key()
    for i, k in enumerate(kjt.keys()):
        if k in keys:
            seg = values[offsets[i] : offsets[i + 1]]
            seg.masked_fill_(torch.rand(seg.shape, device=seg.device) < p, 0)
    return KeyedJaggedTensor(
        keys=kjt.keys(), values=values, lengths=kjt.lengths(), stride=kjt.stride()
    )


def task_losses(model: RankingModel, out: ModelOutput, labels: torch.Tensor) -> torch.Tensor:
    """Per-task loss (T,): BCE for binary tasks (on the funnel product for funnel children),
    MSE for regression."""
    losses = []
    eps = 1e-7
    for i, (binary, parent) in enumerate(zip(model._binary, model._parent, strict=True)):
        y = labels[:, i]
        if not binary:
            losses.append(nn.functional.mse_loss(out.preds[:, i], y))
        elif parent >= 0:
            losses.append(
                nn.functional.binary_cross_entropy(out.preds[:, i].clamp(eps, 1 - eps), y)
            )
        else:
            losses.append(nn.functional.binary_cross_entropy_with_logits(out.logits[:, i], y))
    return torch.stack(losses)
