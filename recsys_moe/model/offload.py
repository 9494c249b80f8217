"""Expert offloading: domain slices kept on disk, memory-mapped on demand, LRU-cached.

A multi-domain model serves traffic whose domain mix is skewed; with domain-specific
experts (STAR) most of the expert weights belong to domains that are rarely asked for.
:class:`DomainSliceCache` writes every domain's slice (its experts and gate rows, see
:mod:`recsys_moe.model.slicing`) to ``<dir>/domain_<k>.safetensors`` once, drops them from
memory, and brings a domain's slice back (``safetensors`` memory-maps the file) when a
request for it arrives, keeping at most ``capacity`` slices resident (least recently used
evicted). Embeddings, towers and everything shared stay resident. Offloaded and resident
slices hold the same tensors, so they give identical scores.

On a GPU the same cache would hold device copies and page host -> device; on CPU the
saving is resident memory (the page cache may still hold the file).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from recsys_moe.model.ranker import RankingModel
from recsys_moe.model.slicing import domain_slice, with_experts


def _slice_state(m: RankingModel) -> dict[str, torch.Tensor]:
    state = {f"experts.{k}": v for k, v in m.experts.state_dict().items()}
    state |= {f"gates.{k}": v for k, v in m.gates.state_dict().items()}
    state["mask"] = m.gates.mask  # a non-persistent buffer: not in state_dict
    return {k: v.detach().contiguous() for k, v in state.items()}


class DomainSliceCache:
    """Domain index -> its slice, at most ``capacity`` resident, the rest on disk.

    Args:
        model: a trained :class:`RankingModel` (``mmoe`` or ``star``).
        directory: where the slices are written (one safetensors file per domain).
        capacity: how many domain slices stay in memory.
    """

    def __init__(self, model: RankingModel, directory: str | Path, capacity: int = 2) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.capacity = capacity
        self.hits = self.misses = self.evictions = 0
        self._resident: OrderedDict[int, RankingModel] = OrderedDict()
        self._active: dict[int, list[int]] = {}
        if not model.supports_domain_slices:
            raise ValueError(f"model.arch {model.cfg.arch!r} has no domain slices to offload")
        for k in range(model.base_domains):
            if model.core.extension_of(k) is not None:
                continue  # extended domains stay with the full model
            s = domain_slice(model, k)
            save_file(_slice_state(s), str(self.dir / f"domain_{k}.safetensors"))
            self._active[k] = list(s.active)
            del s
        self.full_expert_bytes = sum(
            p.numel() * p.element_size()
            for p in [*model.experts.parameters(), *model.gates.parameters()]
        )
        # the template: the model with a slice-shaped expert pool and gates that hold no
        # storage (meta tensors); a slice is the template with its tensors assigned
        shape = domain_slice(model, 0)
        self._template = with_experts(
            model, copy.deepcopy(shape.experts).to("meta"), copy.deepcopy(shape.gates).to("meta"),
            [],
        )  # fmt: skip
        del shape

    def model_without_experts(self) -> RankingModel:
        """The model with no expert or gate weights in memory (the template): what a scorer
        keeps once every domain it serves is offloaded."""
        return self._template

    def __contains__(self, k: int) -> bool:
        return k in self._active

    def get(self, k: int, default: RankingModel | None = None) -> RankingModel | None:
        """Domain ``k``'s slice (loaded from disk if not resident); ``default`` for a
        domain the model does not have."""
        if k not in self._active:
            return default
        m = self._resident.get(k)
        if m is not None:
            self.hits += 1
            self._resident.move_to_end(k)
            return m
        self.misses += 1
        state = load_file(str(self.dir / f"domain_{k}.safetensors"))
        experts = copy.deepcopy(self._template.experts)
        experts.load_state_dict(
            {n[8:]: v for n, v in state.items() if n.startswith("experts.")}, assign=True
        )
        gates = copy.deepcopy(self._template.gates)
        gates.load_state_dict(
            {n[6:]: v for n, v in state.items() if n.startswith("gates.")}, assign=True
        )
        gates.mask = state["mask"]
        m = with_experts(self._template, experts, gates, self._active[k])
        self._resident[k] = m
        while len(self._resident) > self.capacity:
            self._resident.popitem(last=False)
            self.evictions += 1
        return m

    def active(self, k: int) -> list[int]:
        """The global expert ids domain ``k``'s slice computes."""
        return list(self._active[k])

    def resident(self) -> list[int]:
        return list(self._resident)

    def resident_bytes(self) -> int:
        return sum(
            p.numel() * p.element_size()
            for m in self._resident.values()
            for p in [*m.experts.parameters(), *m.gates.parameters()]
        )


__all__ = ["DomainSliceCache"]
