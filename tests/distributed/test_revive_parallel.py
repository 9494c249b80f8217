"""Dead-expert revival under expert parallelism (2 gloo processes, experts 0-1 on rank 0,
2-3 on rank 1): the loads are summed over workers, every worker takes the same
decisions, the donor's weights reach the worker owning the revived expert, and the result
equals reviving the single-process model on the same global batch."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from recsys_moe.config import TrainingConfig
from recsys_moe.distributed.sharding import distribute, read_model_state, save_checkpoint
from recsys_moe.model.ranker import RankingModel
from recsys_moe.model.revive import ExpertReviver, collapse_router
from tests.distributed.test_expert_parallel import _free_port
from tests.distributed.tiny import SPEC, examples, model_config

W, B = 2, 32
MCFG = {"routing": "topk", "top_k": 1, "capacity_factor": 8.0}


def _model() -> RankingModel:
    torch.manual_seed(0)
    m = RankingModel(SPEC, model_config(**MCFG))
    collapse_router(m, expert=1)  # the donor lives on rank 0; experts 2 and 3 on rank 1
    return m


def _reviver(model: RankingModel, **kw) -> ExpertReviver:
    return ExpertReviver(model, after_steps=1, threshold=0.1, noise=0.05, seed=7, **kw)


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_WORLD_SIZE=str(W))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=W)
    try:
        model = _model()
        d = distribute(model, TrainingConfig(), expert_parallel_=True)
        assert d.expert_parallel
        d.model.train()
        b = examples(B * W).batch(slice(rank * B, (rank + 1) * B))
        events = _reviver(d.module, all_reduce=dist.all_reduce).observe(d.model(b), b.domain, None)
        save_checkpoint(d, f"{out}/ckpt", {"epoch": 0})
        torch.save(events, f"{out}/events{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_revival_across_expert_parallel_workers_equals_one_process(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=W)
    events = [torch.load(tmp_path / f"events{r}.pt") for r in range(W)]
    ref = _model()
    ref.train()
    batch = examples(B * W).batch(slice(0, B * W))
    want = _reviver(ref).observe(ref(batch), batch.domain, None)
    assert events[0] == events[1] == want
    assert {ev["expert"] for ev in want} == {0, 2, 3} and {ev["donor"] for ev in want} == {1}
    got = read_model_state(tmp_path / "ckpt", _model())
    for name, t in ref.state_dict().items():
        if name.startswith(("core.experts.", "core.gates.")):
            torch.testing.assert_close(got[name], t, rtol=0, atol=0, msg=name)
    # experts 2 and 3 (rank 1) are copies of expert 1 (rank 0) plus noise
    w = got["core.experts.weights.0"]
    assert 0 < float((w[2] - w[1]).abs().max()) < 0.5 * float(w[1].std())
