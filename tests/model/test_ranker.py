"""The whole model on a real (small) feature store: every architecture and routing mode,
funnels, domain isolation, router observability, save / load."""

from __future__ import annotations

import pytest
import torch

from features.store import read_examples
from recsys_moe.config import ModelConfig, TrainingConfig
from recsys_moe.model.inputs import ExampleTensors, InputSpec
from recsys_moe.model.observe import RouterMonitor
from recsys_moe.model.ranker import RankingModel, task_losses
from recsys_moe.train import fit, load_model, predict, save_model

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def data(small_store):
    cfg, manifest = small_store
    spec = InputSpec.from_manifest(manifest)
    store = cfg.features.store_dir
    return (
        spec,
        manifest,
        ExampleTensors(spec, read_examples(store, "train")),
        ExampleTensors(spec, read_examples(store, "valid")),
    )


ARCHS = ["shared_bottom", "mmoe", "star", "ple"]
ROUTINGS = ["softmax", "topk", "noisy_topk", "expert_choice"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("routing", ROUTINGS)
def test_forward_backward_every_arch_and_routing(data, arch, routing):
    spec, _, train, _ = data
    torch.manual_seed(0)
    model = RankingModel(
        spec,
        ModelConfig(
            arch=arch,
            routing=routing,
            n_experts=4,
            expert_hidden=[16, 8],
            interactions=["user_id*item_id"],
        ),
    )
    b = train.batch(slice(0, 64))
    out = model(b)
    assert out.preds.shape == (64, 3) and torch.isfinite(out.preds).all()
    loss = task_losses(model, out, b.labels).sum() + out.aux_loss + out.z_loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) > len(grads) // 2
    if arch != "shared_bottom":
        assert out.gates and out.gates[0].route.weights.shape[0] == 64


def test_funnel_child_never_exceeds_parent(data):
    spec, _, train, _ = data
    model = RankingModel(spec, ModelConfig()).eval()
    preds = model(train.batch(slice(0, 256))).preds
    click, conversion = spec.task_names.index("click"), spec.task_names.index("conversion")
    assert (preds[:, conversion] <= preds[:, click] + 1e-7).all()


def test_star_domain_uses_only_shared_and_own_experts(data):
    """Changing another domain's experts leaves a domain's scores bit-identical."""
    spec, _, train, _ = data
    torch.manual_seed(0)
    cfg = ModelConfig(arch="star", shared_experts=2, specific_experts=2, expert_hidden=[16, 8])
    model = RankingModel(spec, cfg).eval()
    b = train.batch(slice(0, 512))
    k = int(b.domain[0])
    mine = b.domain == k
    before_all = model(b).preds
    before = before_all[mine]
    S, P = cfg.shared_experts, cfg.specific_experts
    with torch.no_grad():
        for w in model.experts.weights:
            for other in range(spec.n_domains):
                if other != k:
                    w[S + other * P : S + (other + 1) * P].normal_()
    after = model(b).preds
    assert torch.equal(after[mine], before)
    assert not torch.equal(after[~mine], before_all[~mine])  # the other domains did change


def test_router_monitor_flags_collapsed_gate(data):
    spec, _, train, _ = data
    torch.manual_seed(0)
    model = RankingModel(spec, ModelConfig(n_experts=4)).eval()
    b = train.batch(slice(0, 2000))
    mon = RouterMonitor(spec.domains)
    mon.update(model(b), b.domain)
    healthy = mon.metrics()
    assert healthy["router/collapsed_gates"] == 0 and healthy["router/dead_experts"] == 0
    with torch.no_grad():
        model.gates.b[0].view(spec.n_domains, len(spec.tasks), 4)[:, 0, 0] = (
            50.0  # click's gates collapse on expert 0
        )
    mon.reset()
    mon.update(model(b), b.domain)
    m = mon.metrics()
    dom = spec.domains[0]
    assert m[f"router/gates/click/{dom}/collapsed"] == 1.0
    assert m[f"router/gates/click/{dom}/dead_experts"] == 3.0
    assert m[f"router/gates/like/{dom}/collapsed"] == 0.0
    assert m["router/collapsed_gates"] == len(spec.domains)
    assert m[f"router/gates/click/{dom}/entropy"] < healthy[f"router/gates/click/{dom}/entropy"]
    load = mon.load_table("gates")
    torch.testing.assert_close(load.sum(-1)[:, 1:], torch.ones(3, spec.n_domains - 1))


def test_batches_gather_multi_valued_features(data):
    _, _, train, _ = data
    idx = torch.tensor([5, 0, 17, 3])
    b = train.batch(idx)
    ref = [train.batch(slice(int(i), int(i) + 1)) for i in idx]
    tags = b.sparse.to_dict()["tags"]
    for j, r in enumerate(ref):
        assert tags.to_dense()[j].tolist() == r.sparse.to_dict()["tags"].to_dense()[0].tolist()
    torch.testing.assert_close(b.dense, torch.cat([r.dense for r in ref]))


def test_save_load_round_trip(data, tmp_path):
    spec, manifest, _, valid = data
    torch.manual_seed(0)
    model = RankingModel(spec, ModelConfig(arch="ple", routing="topk", n_experts=4))
    save_model(model, tmp_path / "m", manifest)
    loaded, meta = load_model(tmp_path / "m")
    assert torch.equal(
        torch.from_numpy(predict(model, valid)), torch.from_numpy(predict(loaded, valid))
    )
    assert meta["manifest"]["fingerprint"] == manifest["fingerprint"]


def test_fit_learns_and_stops_early(data):
    spec, _, train, valid = data
    torch.manual_seed(0)
    model = RankingModel(spec, ModelConfig(n_experts=4, expert_hidden=[32, 16]))
    res = fit(
        model,
        train,
        valid,
        TrainingConfig(epochs=3, batch_size=1024, early_stopping_patience=0),
        progress=False,
    )
    assert res.valid["auc_mean"] > 0.6
    assert 1 <= len(res.history) <= 3 and res.best_epoch < len(res.history)
    assert res.valid["auc_mean"] == max(h["valid/auc_mean"] for h in res.history)
    assert any(k.startswith("router/gates/") for k in res.router)
