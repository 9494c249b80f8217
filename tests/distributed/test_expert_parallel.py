"""Sharded model (torchrec-sharded tables + expert-parallel experts + DDP) on 2 processes
with gloo equals the single-process model on the same global batch: outputs, loss,
gradients, and the parameters after one optimiser step (read back from the checkpoint)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from recsys_moe.config import TrainingConfig
from recsys_moe.distributed.sharding import distribute, read_model_state, save_checkpoint
from recsys_moe.model.ranker import RankingModel
from recsys_moe.training import loss_of, make_optimizer
from tests.distributed.tiny import SPEC, examples, model_config

W, B = 2, 16
TCFG = TrainingConfig(lr=0.01, embedding_lr=0.05, weight_decay=0.001)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str, mcfg: dict, sharding: str, shard_experts: bool):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_WORLD_SIZE=str(W))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=W)
    try:
        torch.manual_seed(0)
        model = RankingModel(SPEC, model_config(**mcfg))
        b = examples(B * W).batch(slice(rank * B, (rank + 1) * B))
        d = distribute(model, TCFG, sharding_types=[sharding], expert_parallel_=shard_experts)
        d.model.train()
        o = d.model(b)
        total = loss_of(d.module, o, b.labels)
        total.backward()
        grads = {n: p.grad.clone() for n, p in d.model.named_parameters() if p.grad is not None}
        plan = d.plan_summary()
        d.optimizer.step()
        save_checkpoint(d, f"{out}/ckpt", {"epoch": 0})
        torch.save(
            {"preds": o.preds.detach(), "loss": total.detach(), "grads": grads, "plan": plan,
             "sharded": d.expert_parallel},
            f"{out}/rank{rank}.pt",
        )  # fmt: skip
    finally:
        dist.destroy_process_group()


CASES = [
    ({"routing": "softmax"}, "table_wise", True),
    ({"routing": "topk", "top_k": 2, "capacity_factor": 8.0}, "column_wise", True),
    ({"arch": "star", "shared_experts": 2, "specific_experts": 1}, "data_parallel", True),
    ({"routing": "softmax"}, "table_column_wise", False),
    # experts per domain and per user segment, gates per (domain, segment)
    (
        {"expert_groups": ["domain", "user_segment"], "shared_experts": 2, "specific_experts": 1},
        "table_wise",
        True,
    ),
]


@pytest.mark.parametrize(("mcfg", "sharding", "shard_experts"), CASES)
def test_sharded_equals_single_process(tmp_path, mcfg, sharding, shard_experts):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), mcfg, sharding, shard_experts), nprocs=W)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(W)]
    assert all(r["sharded"] == shard_experts for r in ranks)
    assert {t["sharding"] for t in ranks[0]["plan"].values()} == {sharding}

    torch.manual_seed(0)
    ref = RankingModel(SPEC, model_config(**mcfg))
    ref.train()
    batch = examples(B * W).batch(slice(0, B * W))
    opt, _ = make_optimizer(ref, TCFG)
    out = ref(batch)
    total = loss_of(ref, out, batch.labels)
    total.backward()

    preds = torch.cat([r["preds"] for r in ranks])
    torch.testing.assert_close(preds, out.preds.detach(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        torch.stack([r["loss"] for r in ranks]).mean(), total.detach(), atol=1e-5, rtol=1e-5
    )
    ref_params = dict(ref.named_parameters())
    El = ref.experts.n_experts // W if shard_experts else None
    checked = 0
    for r, rank in enumerate(ranks):
        for name, g in rank["grads"].items():
            if ".local." in name:
                full = ref_params[name.replace(".local.", ".")].grad
                want = full[r * El : (r + 1) * El]
            else:
                want = ref_params[name].grad
            torch.testing.assert_close(g, want, atol=1e-5, rtol=1e-4, msg=name)
            checked += 1
    assert checked >= 2 * 8

    opt.step()
    stepped = read_model_state(tmp_path / "ckpt", RankingModel(SPEC, model_config(**mcfg)))
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(stepped[name], value, atol=1e-5, rtol=1e-4, msg=name)
