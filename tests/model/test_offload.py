"""Expert offloading: offloaded and resident domain slices give identical scores, and
the LRU keeps at most ``capacity`` domains resident under a domain mix."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from recsys_moe.model.offload import DomainSliceCache
from recsys_moe.model.slicing import domain_slice


@pytest.fixture(scope="module", params=["none", "batch"])
def star(request, small_store):
    from features.store import load_manifest, read_examples
    from recsys_moe.model.inputs import ExampleTensors, InputSpec
    from recsys_moe.model.ranker import RankingModel

    cfg, _ = small_store
    store = cfg.features.store_dir
    spec = InputSpec.from_manifest(load_manifest(store))
    torch.manual_seed(2)
    mcfg = dataclasses.replace(cfg.model, arch="star", shared_experts=2, specific_experts=2,
                               expert_hidden=[16, 8], gate_norm=request.param)  # fmt: skip
    model = RankingModel(spec, mcfg).eval()
    with torch.no_grad():
        # every per-logit tensor drawn (model.gate_norm "batch": the norm's too), so that
        # a slice cutting a channel from the wrong place scores differently
        for t, kind in model.gates.channels():
            t.uniform_(0.5, 1.5) if kind in ("scale", "stat") else t.normal_(0, 0.5)
    test = read_examples(store, "test")
    return model, spec, test, ExampleTensors(spec, test)


def test_offloaded_slices_score_like_resident_ones(star, tmp_path):
    from recsys_moe.model.inputs import ExampleTensors
    from recsys_moe.training import predict

    model, spec, test, data = star
    cache = DomainSliceCache(model, tmp_path / "experts", capacity=1)
    dom = data.domain.numpy()
    for k in range(1, spec.n_domains):
        rows = np.flatnonzero(dom == k)
        sub = ExampleTensors(spec, test[rows])
        resident = predict(domain_slice(model, k), sub, 512)
        offloaded = predict(cache.get(k), sub, 512)
        np.testing.assert_array_equal(offloaded, resident)
        np.testing.assert_allclose(offloaded, predict(model, data, 512)[rows], rtol=1e-5, atol=1e-6)
    assert cache.get(99) is None and cache.get(99, model) is model


def test_lru_eviction_under_a_domain_mix(star, tmp_path):
    model = star[0]
    cache = DomainSliceCache(model, tmp_path / "experts", capacity=2)
    mix = [1, 1, 2, 1, 3, 3, 1, 2]  # feed-heavy traffic with search and video
    for k in mix:
        cache.get(k)
        assert len(cache.resident()) <= 2
    # 1 miss, hit, 2 miss, hit, 3 miss (evicts 2), hit, 1 hit, 2 miss (evicts 3)
    assert (cache.misses, cache.hits, cache.evictions) == (4, 4, 2)
    assert cache.resident() == [1, 2]
    # two of four domain slices resident: less than the full model's experts and gates
    assert 0 < cache.resident_bytes() < cache.full_expert_bytes


def test_scorer_with_offloaded_experts_scores_like_the_full_model(scoring_model, tmp_path):
    import polars as pl

    from features.store import read_examples
    from recsys_moe.scorer import Scorer

    cfg, bundle, _, _ = scoring_model
    full, off = Scorer.from_dir(bundle), Scorer.from_dir(bundle)
    cache = off.offload_experts(tmp_path / "experts", capacity=1)
    rows = full.example_rows(read_examples(cfg.features.store_dir, "test").head(300))
    rows = pl.concat([rows, rows.head(5).with_columns(pl.lit("mars").alias("domain"))])
    # no full copy of the offloaded experts stays: the scorer's own model holds none (the
    # gates, a few rows per domain, stay resident)
    assert all(p.is_meta for p in off.model.experts.parameters())
    np.testing.assert_allclose(off.score(rows), full.score(rows), rtol=1e-5, atol=1e-6)
    assert len(cache.resident()) == 1 and cache.misses >= 3


def test_scorer_loaded_with_offloading_never_holds_the_pool(scoring_model, monkeypatch):
    """Scorer.from_dir(offload=N) builds the pool on the meta device and reads each
    domain's expert rows from the bundle's own weights: the whole pool is never a tensor in
    memory, and it scores like the model loaded whole."""
    import polars as pl
    from safetensors import safe_open

    from features.store import read_examples
    from recsys_moe.bundle import WEIGHTS
    from recsys_moe.model import experts as experts_module
    from recsys_moe.scorer import Scorer

    cfg, bundle, _, _ = scoring_model
    full = Scorer.from_dir(bundle)
    E = full.model.experts.n_experts
    with safe_open(str(bundle / WEIGHTS), framework="pt") as f:
        assert f.get_slice("core.experts.weights.0").get_shape()[0] == E
    pool = tuple(full.model.experts.weights[0].shape)
    built = []  # (shape, device) of every stacked layer built (the towers are stacked too)
    init = experts_module._init_stacked
    monkeypatch.setattr(experts_module, "_init_stacked",
                        lambda w, b: (built.append((tuple(w.shape), w.device.type)), init(w, b)))  # fmt: skip
    off = Scorer.from_dir(bundle, offload=1)
    # the pool was built without storage, and never allocated
    assert (pool, "meta") in built and (pool, "cpu") not in built
    cache = off.offloaded
    assert cache is not None and cache.weights == bundle / WEIGHTS
    assert all(p.is_meta for p in off.model.experts.parameters())
    rows = full.example_rows(read_examples(cfg.features.store_dir, "test").head(300))
    rows = pl.concat([rows, rows.head(5).with_columns(pl.lit("mars").alias("domain"))])
    np.testing.assert_allclose(off.score(rows), full.score(rows), rtol=1e-5, atol=1e-6)
    # one domain resident, holding its own experts only (shared + its specific one)
    assert len(cache.resident()) == 1
    (m,) = cache._resident.values()
    assert m.experts.n_experts == len(m.active) < E
    assert Scorer.from_dir(bundle).offloaded is None


def test_mmoe_domain_slices_share_the_pool(small_store):
    """Every MMoE domain reaches every expert: its slices hold the pool's own tensors, not
    copies."""
    from features.store import load_manifest
    from recsys_moe.model.inputs import InputSpec
    from recsys_moe.model.ranker import RankingModel

    cfg, _ = small_store
    spec = InputSpec.from_manifest(load_manifest(cfg.features.store_dir))
    model = RankingModel(spec, dataclasses.replace(cfg.model, arch="mmoe")).eval()
    pool = [p.data_ptr() for p in model.experts.parameters()]
    for k in range(spec.n_domains):
        s = domain_slice(model, k)
        assert [p.data_ptr() for p in s.experts.parameters()] == pool
