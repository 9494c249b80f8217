"""Expert offloading: each domain's experts read from disk on demand, LRU-cached.

A multi-domain model serves traffic whose domain mix is skewed; with domain-specific
experts (STAR) most of the expert weights belong to domains that are rarely asked for.
:class:`DomainSliceCache` keeps the expert pool out of memory: a domain's slice (its
experts and gate rows, see :mod:`recsys_moe.model.slicing`) is built when a request for
it arrives, its expert rows read straight from a safetensors file holding the whole pool,
and at most ``capacity`` slices stay resident (least recently used evicted). The file is
the bundle's own ``model.safetensors`` for a scorer loaded with offloading on
(:meth:`recsys_moe.scorer.Scorer.from_dir`, whose model then holds its pool on the meta
device and never in memory), or one the cache writes for a model already in memory.
Embeddings, towers, gates and everything shared stay resident. Offloaded and resident
slices hold the same tensors, so they give identical scores.

On a GPU the same cache would hold device copies and page host -> device; on CPU the
saving is resident memory (the page cache may still hold the file).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from recsys_moe.model.ranker import RankingModel
from recsys_moe.model.slicing import pool_like, slice_gates, slice_plan, with_experts


def expert_prefix(model: RankingModel) -> str:
    """The state-dict prefix of ``model``'s expert pool (``"core.experts."``)."""
    return next(f"{n}." for n, m in model.named_modules() if m is model.experts)


def _runs(keep: list[int]) -> list[tuple[int, int]]:
    """Sorted ids as half-open contiguous ranges: [0, 1, 5, 6] -> [(0, 2), (5, 7)]."""
    runs: list[tuple[int, int]] = []
    for k in keep:
        if runs and runs[-1][1] == k:
            runs[-1] = (runs[-1][0], k + 1)
        else:
            runs.append((k, k + 1))
    return runs


class DomainSliceCache:
    """Domain index -> its slice, at most ``capacity`` resident, the rest on disk.

    Args:
        model: a trained :class:`RankingModel` (``mmoe`` or ``star``); its pool may be on
            the meta device when ``weights`` holds it.
        directory: where the pool is written when ``weights`` is None.
        capacity: how many domain slices stay in memory.
        weights: a safetensors file holding ``model``'s state (a bundle's
            ``model.safetensors``): the expert rows are read from it, nothing is written.
    """

    def __init__(
        self,
        model: RankingModel,
        directory: str | Path | None = None,
        capacity: int = 2,
        weights: str | Path | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        if not model.supports_domain_slices:
            raise ValueError(
                f"this model (model.arch {model.cfg.arch!r}, model.expert_norm "
                f"{model.cfg.expert_norm!r}) has no domain slices to offload"
            )
        self.capacity = capacity
        self.hits = self.misses = self.evictions = 0
        self._resident: OrderedDict[int, RankingModel] = OrderedDict()
        pool = model.experts
        n_layers = len(pool.weights)
        # the pool's names in the model's state dict, as the bundle's weights hold them
        prefix = expert_prefix(model)
        self._names = [[f"{prefix}{kind}.{i}" for i in range(n_layers)]
                       for kind in ("weights", "biases")]  # fmt: skip
        if weights is None:
            if directory is None:
                raise ValueError("give the directory to write the experts to, or their weights")
            Path(directory).mkdir(parents=True, exist_ok=True)
            weights = Path(directory) / "experts.safetensors"
            layers = zip(self._names, (pool.weights, pool.biases), strict=True)
            save_file({n: p.detach().contiguous() for names, params in layers
                       for n, p in zip(names, params, strict=True)}, str(weights))  # fmt: skip
        self.weights = Path(weights)
        # what each base domain's slice keeps (domains added by `extend` are not sliced)
        self._plans = {}
        for k in range(model.base_domains):
            plan = slice_plan(model, k)
            if plan is not None:
                self._plans[k] = plan
        self.full_expert_bytes = sum(
            p.numel() * p.element_size() for p in [*pool.parameters(), *model.gates.parameters()]
        )
        # the template: the model with a storage-less pool (meta tensors) and its gates,
        # which are small and stay resident; a slice is the template with its own pool
        meta = [nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
                for p in [*pool.weights, *pool.biases]]  # fmt: skip
        self._template = with_experts(
            model, pool_like(pool, meta[:n_layers], meta[n_layers:]), model.gates, []
        )

    def model_without_experts(self) -> RankingModel:
        """The model with no expert weights in memory (the template): what a scorer keeps
        once every domain it serves is offloaded."""
        return self._template

    def __contains__(self, k: int) -> bool:
        return k in self._plans

    def _read(self, keep: list[int]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """The experts ``keep``'s rows of every layer, read run by run from the file (the
        file is mapped only while reading)."""
        runs = _runs(keep)
        out: tuple[list[nn.Parameter], list[nn.Parameter]] = ([], [])
        with safe_open(str(self.weights), framework="pt") as f:
            for names, params in zip(self._names, out, strict=True):
                for name in names:
                    part = f.get_slice(name)
                    rows = torch.cat([part[a:b] for a, b in runs])
                    params.append(nn.Parameter(rows, requires_grad=False))
        return out

    def get(self, k: int, default: RankingModel | None = None) -> RankingModel | None:
        """Domain ``k``'s slice (read from disk if not resident); ``default`` for a domain
        the model does not have."""
        if k not in self._plans:
            return default
        m = self._resident.get(k)
        if m is not None:
            self.hits += 1
            self._resident.move_to_end(k)
            return m
        self.misses += 1
        keep, rows = self._plans[k]
        weights, biases = self._read(keep.tolist())
        t = self._template
        m = with_experts(t, pool_like(t.experts, weights, biases), slice_gates(t.gates, rows, keep),
                         keep.tolist())  # fmt: skip
        self._resident[k] = m
        while len(self._resident) > self.capacity:
            self._resident.popitem(last=False)
            self.evictions += 1
        return m

    def active(self, k: int) -> list[int]:
        """The global expert ids domain ``k``'s slice computes."""
        return self._plans[k][0].tolist()

    def resident(self) -> list[int]:
        return list(self._resident)

    def resident_bytes(self) -> int:
        return sum(
            p.numel() * p.element_size()
            for m in self._resident.values()
            for p in [*m.experts.parameters(), *m.gates.parameters()]
        )


__all__ = ["DomainSliceCache", "expert_prefix"]
