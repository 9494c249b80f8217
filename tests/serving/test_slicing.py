"""Domain slices compute only the experts a domain's gates can reach and score that
domain's rows like the full model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from recsys_moe.model.slicing import active_experts, domain_slice


@pytest.mark.parametrize("arch", ["star", "mmoe"])
def test_slice_equals_full_model(small_store, arch):
    from features.store import load_manifest, read_examples
    from recsys_moe.model.inputs import ExampleTensors, InputSpec
    from recsys_moe.model.ranker import RankingModel
    from recsys_moe.training import predict

    cfg, _ = small_store
    store = cfg.features.store_dir
    spec = InputSpec.from_manifest(load_manifest(store))
    torch.manual_seed(1)
    mcfg = dataclasses.replace(cfg.model, arch=arch, shared_experts=3, specific_experts=2,
                               n_experts=5, expert_hidden=[16, 8])  # fmt: skip
    model = RankingModel(spec, mcfg).eval()
    with torch.no_grad():  # non-trivial gates: random weights instead of near-zero init
        model.gates.w.normal_(0, 0.5)
    test = read_examples(store, "test")
    data = ExampleTensors(spec, test)
    full = predict(model, data, 1024)
    dom = data.domain.numpy()
    K = spec.n_domains
    for k in range(1, K):
        rows = np.flatnonzero(dom == k)
        assert len(rows) > 0
        sub = ExampleTensors(spec, test[rows])
        sliced = domain_slice(model, k)
        got = predict(sliced, sub, 1024)
        np.testing.assert_allclose(got, full[rows], rtol=1e-5, atol=1e-6)
        if arch == "star":
            # shared experts plus this domain's own, nothing else
            want = [0, 1, 2, 3 + 2 * k, 4 + 2 * k]  # index 0 (OOV) owns experts 3, 4
            assert active_experts(model, k) == want
            assert sliced.experts.n_experts == 5 < model.experts.n_experts
        else:
            assert sliced.experts.n_experts == model.experts.n_experts
    # the full model's parameters are untouched by slicing
    np.testing.assert_array_equal(predict(model, data, 1024), full)
