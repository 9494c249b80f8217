"""Serving's routing health (serving/app.py:routing_health) against the bundle's
training-time routing: an expert dead in serving that carried load at training time is
named (``dead_since_training``), one that was already dead is not."""

from __future__ import annotations

import copy

import torch

from recsys_moe.model.observe import RouterMonitor
from recsys_moe.model.ranker import RankingModel
from recsys_moe.model.revive import collapse_router
from serving.app import routing_health
from tests.distributed.tiny import SPEC, examples, model_config


def _window(model: RankingModel, n: int = 256) -> RouterMonitor:
    mon = RouterMonitor(SPEC.domains, dead_threshold=0.1)
    model.eval()
    with torch.no_grad():
        b = examples(n).batch(slice(0, n))
        mon.update(model(b), b.domain)
    return mon


def test_dead_in_serving_but_alive_at_training():
    torch.manual_seed(0)
    trained = RankingModel(SPEC, model_config(routing="topk", top_k=1))
    with torch.no_grad():  # a healthy router at training time, expert 3 never used
        g = trained.gates
        g.w.normal_(0, 1.0)
        g.b.view(g.K, g.O, g.E)[..., 3] -= 50.0
    reference = _window(trained).load_shares()
    served = copy.deepcopy(trained)
    collapse_router(served, expert=0)  # since then: everything on expert 0
    active = {k: list(range(4)) for k in range(1, 4)}
    health = routing_health({1: _window(served)}, active, reference)
    feed = [g for g in health["gates"] if g["domain"] == "feed"]
    assert feed and all(g["collapsed"] for g in feed)
    for g in feed:
        assert g["dead"] == ["1", "2", "3"]
        # 1 and 2 carried load at training time; 3 was dead then already
        assert g["dead_since_training"] == ["1", "2"], g
    assert "feed/click/1" in health["dead_since_training"]
    assert not any(x.endswith("/3") for x in health["dead_since_training"])
    # without a reference (an older bundle) nothing is claimed
    bare = routing_health({1: _window(served)}, active)
    assert bare["dead_since_training"] == [] and bare["gates"][0]["dead"] == ["1", "2", "3"]
