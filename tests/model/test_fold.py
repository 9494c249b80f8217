"""The folded first expert layer equals the unfolded one (with and without crosses,
multi-valued mean-pooled features included)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from recsys_moe.model.fold import FoldedFirstLayer, first_layer_reference


@pytest.mark.parametrize("crosses", [True, False])
def test_folded_first_layer_equals_reference(small_store, crosses):
    from features.store import load_manifest, read_examples
    from recsys_moe.model.inputs import ExampleTensors, InputSpec
    from recsys_moe.model.ranker import RankingModel

    cfg, _ = small_store
    spec = InputSpec.from_manifest(load_manifest(cfg.features.store_dir))
    mcfg = dataclasses.replace(cfg.model, n_experts=3, expert_hidden=[24, 8], input_norm="none",
                               interactions=cfg.model.interactions if crosses else [])  # fmt: skip
    torch.manual_seed(1)
    model = RankingModel(spec, mcfg).eval()
    assert any(f.multi_valued for f in spec.sparse)
    data = ExampleTensors(spec, read_examples(cfg.features.store_dir, "test").head(300))
    b = data.batch(slice(0, 300))
    folded = FoldedFirstLayer(model)
    torch.testing.assert_close(folded(b), first_layer_reference(model, b), rtol=1e-4, atol=1e-5)
    assert folded.nbytes() == 4 * sum(f.vocab_size for f in spec.sparse) * 3 * 24


def test_fold_refuses_a_normalised_input(small_store):
    """A LayerNorm over x makes the first layer non-linear in each embedding: no fold."""
    from features.store import load_manifest
    from recsys_moe.model.inputs import InputSpec
    from recsys_moe.model.ranker import RankingModel

    cfg, _ = small_store
    spec = InputSpec.from_manifest(load_manifest(cfg.features.store_dir))
    model = RankingModel(spec, dataclasses.replace(cfg.model, input_norm="layer")).eval()
    with pytest.raises(ValueError, match='input_norm = "none"'):
        FoldedFirstLayer(model)
