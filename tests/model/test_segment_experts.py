"""Expert groups keyed by user segment (model.expert_groups): shared experts plus experts
private to each domain and to each user segment, gates per task x (domain, segment); a
row reaches only the shared experts, its domain's and its segment's; slices narrowed to a
segment score its rows like the full model, and a scorer serving one segment falls back
to the full model for other users."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from features.store import load_manifest, read_examples
from recsys_moe.bundle import write_bundle
from recsys_moe.config import ConfigError, ModelConfig, TrainingConfig
from recsys_moe.model.inputs import ExampleTensors, InputSpec
from recsys_moe.model.ranker import RankingModel
from recsys_moe.model.slicing import active_experts, domain_slice
from recsys_moe.training import fit, predict

pytestmark = pytest.mark.ray

S, P = 2, 1


@pytest.fixture(scope="module")
def segmented(small_store):
    cfg, _ = small_store
    store = cfg.features.store_dir
    manifest = load_manifest(store)
    spec = InputSpec.from_manifest(manifest)
    torch.manual_seed(0)
    mcfg = dataclasses.replace(cfg.model, arch="mmoe", shared_experts=S, specific_experts=P,
                               expert_groups=["domain", "user_segment"], expert_hidden=[16, 8])  # fmt: skip
    model = RankingModel(spec, mcfg)
    with torch.no_grad():  # non-trivial gates
        model.gates.w.normal_(0, 0.5)
        model.gates.b.normal_(0, 0.5)
    test = read_examples(store, "test")
    return cfg, manifest, spec, model.eval(), test


def _segment_col(spec: InputSpec) -> str:
    return next(f.column for f in spec.sparse if f.source == "derived")


def test_config_validates_groups():
    with pytest.raises(ConfigError, match="expert_groups"):
        ModelConfig(expert_groups=["country"])
    with pytest.raises(ConfigError, match="mmoe or star"):
        ModelConfig(arch="ple", expert_groups=["user_segment"])
    assert ModelConfig(arch="star").groups == ["domain"] and ModelConfig().groups == []


def test_each_row_reaches_shared_domain_and_segment_experts(segmented):
    _, _, spec, model, test = segmented
    core = model.core
    K, G = spec.n_domains, core.key_segments
    assert core.segment_keyed and G >= 3
    assert model.experts.n_experts == S + P * (K + G)
    data = ExampleTensors(spec, test.head(2000))
    seg = torch.from_numpy(test.head(2000)[_segment_col(spec)].to_numpy())
    with torch.no_grad():
        w = model(data.batch(slice(None))).gates[0].route.weights  # (B, O, E)
    for d in range(1, K):
        for g in range(G):
            rows = (data.domain == d) & (seg == g)
            allowed = set(range(S)) | {S + d * P} | {S + K * P + g * P}
            assert active_experts(model, d, [g]) == sorted(allowed)
            if rows.any():
                used = set(torch.nonzero(w[rows].sum((0, 1)) > 0).flatten().tolist())
                assert used == allowed, (d, g, used)


def test_segment_slices_equal_the_full_model(segmented):
    _, _, spec, model, test = segmented
    col = _segment_col(spec)
    seg = test[col].to_numpy()
    dom = ExampleTensors(spec, test).domain.numpy()
    checked = 0
    for d in range(1, spec.n_domains):
        for g in np.unique(seg):
            rows = np.flatnonzero((dom == d) & (seg == g))[:200]
            if not len(rows):
                continue
            sl = domain_slice(model, d, [int(g)])
            assert sl.experts.n_experts == S + 2 * P and sl.segment_scope == [int(g)]
            sub = ExampleTensors(spec, test[rows])
            np.testing.assert_allclose(predict(sl, sub, 512), predict(model, sub, 512),
                                       rtol=1e-5, atol=1e-6)  # fmt: skip
            checked += 1
    assert checked >= 6
    # a domain slice over every segment: shared + the domain's + every segment's experts
    assert domain_slice(model, 1).experts.n_experts == S + P + P * model.core.key_segments


def test_scorer_serving_a_segment_uses_its_slice_and_the_full_model_for_others(segmented, tmp_path):
    from recsys_moe.scorer import Scorer

    cfg, manifest, _spec, model, _test = segmented
    write_bundle(model, tmp_path / "m", manifest, store=cfg.features.store_dir)
    full, served = Scorer.from_dir(tmp_path / "m"), Scorer.from_dir(tmp_path / "m")
    active = served.slice_domains(["feed", "search"], ["cold", "power"])
    assert all(len(ids) == S + P + 2 * P for ids in active.values())
    items = full.tables["items"]["item_id"].head(12).to_list()
    reqs, seen = [], set()
    for u in [10**9, *full.tables["users"]["user_id"].to_list()]:  # 10**9: never seen
        f = full.encode_request(u, "feed", items, 1_700_000_000)
        if f.user_segment not in seen:
            seen.add(f.user_segment)
            reqs.append(("feed", f))
    assert {"cold", "power"} <= seen, seen
    got, want = served.rank_many(reqs), full.rank_many(reqs)
    for (_, f), a, b in zip(reqs, got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f.user_segment)
    k = served.domain_index("feed")
    assert served._model_for(k, "cold") is served.slices[k]
    assert served._model_for(k, "casual") is served.model  # not this ranker's segment
    # extensions route by domain: a segment-keyed model cannot be extended
    with pytest.raises(ValueError, match="route by segment"):
        model.require_extendable()


def test_trains_with_segment_keys_and_revival(segmented, small_store):
    cfg, _, spec, _, _ = segmented
    store = cfg.features.store_dir
    torch.manual_seed(0)
    mcfg = dataclasses.replace(cfg.model, arch="star", shared_experts=S, specific_experts=P,
                               expert_groups=["user_segment"], routing="topk", top_k=1,
                               expert_hidden=[16, 8])  # fmt: skip
    m = RankingModel(spec, mcfg)
    train = ExampleTensors(spec, read_examples(store, "train").head(4096))
    valid = ExampleTensors(spec, read_examples(store, "valid").head(2048))
    res = fit(m, train, valid, TrainingConfig(epochs=1, batch_size=512, revive_after_steps=2),
              progress=False)  # fmt: skip
    assert res.valid["auc_mean"] > 0.5
    # star with ["user_segment"] only: no domain experts, gates per (domain, segment)
    assert m.experts.n_experts == S + P * m.core.key_segments
    assert spec.n_domains * m.core.key_segments == m.gates.K
