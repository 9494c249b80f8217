"""A world of one (the default layout on one node: one Ray Train worker with every core):
``distribute`` leaves the model unsharded, trains it as ``fit`` does (tables on FBGEMM's
fused kernels where they have the optimiser, torch's optimiser where not, as Adam on
CPU), and checkpoints it so that a single-process model reads it back exactly."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from recsys_moe.config import TrainingConfig
from recsys_moe.distributed.sharding import distribute, read_model_state, save_checkpoint
from recsys_moe.model.ranker import RankingModel
from recsys_moe.training import fused_embeddings, loss_of, make_optimizer
from tests.distributed.test_expert_parallel import _free_port
from tests.distributed.tiny import SPEC, examples, model_config


def _steps(model, optimizer, forward, n: int = 3) -> list[float]:
    data = examples(64, seed=3)
    losses = []
    for i in range(n):
        b = data.batch(slice(i * 16, (i + 1) * 16))
        forward.train()
        optimizer.zero_grad(set_to_none=True)
        total = loss_of(model, forward(b), b.labels)
        total.backward()
        optimizer.step()
        losses.append(float(total))
    return losses


def _worker(rank: int, port: int, emb_opt: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_WORLD_SIZE="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        cfg = TrainingConfig(embedding_optimizer=emb_opt, embedding_lr=0.05, lr=0.01)
        torch.manual_seed(0)
        model = RankingModel(SPEC, model_config())
        start = {k: v.clone() for k, v in model.state_dict().items()}
        d = distribute(model, cfg)
        # the reference: fit's own pieces on an identical model
        torch.manual_seed(0)
        ref = RankingModel(SPEC, model_config())
        with fused_embeddings(ref, cfg) as fused:
            ref_opt, _ = make_optimizer(ref, cfg, fused)
            ref_losses = _steps(ref, ref_opt, ref)
            ref_state = {k: v.clone() for k, v in ref.state_dict().items()}
        losses = _steps(d.module, d.optimizer, d.model)
        save_checkpoint(d, out, {"stopping": {}})
        torch.save(
            {"plan": d.plan_summary(), "losses": losses, "ref_losses": ref_losses,
             "state": {k: v.clone() for k, v in d.module.state_dict().items()},
             "ref_state": ref_state, "start": start, "sharded": d.plan is not None},
            os.path.join(out, "result.pt"),
        )  # fmt: skip
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("emb_opt", ["adagrad", "adam"])
def test_world_of_one_trains_like_fit_and_checkpoints(tmp_path, emb_opt):
    mp.spawn(_worker, args=(_free_port(), emb_opt, str(tmp_path)), nprocs=1)
    r = torch.load(tmp_path / "result.pt", weights_only=True)
    assert not r["sharded"]
    kernel = "fused" if emb_opt == "adagrad" else "dense"  # FBGEMM fuses no Adam on CPU
    assert {p["sharding"] for p in r["plan"].values()} == {"single_process"}
    assert {p["kernel"] for p in r["plan"].values()} == {kernel}
    assert r["losses"] == pytest.approx(r["ref_losses"], rel=1e-5)
    for k, v in r["state"].items():
        torch.testing.assert_close(v, r["ref_state"][k], rtol=1e-5, atol=1e-6, msg=k)
    # the tables trained (Adam on CPU included), and the checkpoint reads back exactly
    table = "embedding.ebc.embedding_bags.t_user_id.weight"
    assert not torch.equal(r["state"][table], r["start"][table])
    model = RankingModel(SPEC, model_config())
    back = read_model_state(tmp_path, model)
    for k, v in r["state"].items():
        torch.testing.assert_close(back[k], v, rtol=0, atol=0, msg=k)


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _eval_worker(rank: int, port: int, out: str) -> None:
    from pipelines.train import _gather_eval
    from recsys_moe.training import evaluate_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_WORLD_SIZE="1")
    torch.set_num_threads(2)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        d = distribute(RankingModel(SPEC, model_config()), TrainingConfig())
        valid = examples(40_000, seed=5)
        torch.ones(1 << 20).add_(1)  # this thread's OpenMP pool exists before the count
        before = _threads()
        res = _gather_eval(d, valid.batches(8192), SPEC, torch.device("cpu"))
        after = _threads()
        ref, _ = evaluate_model(d.module, valid)
        torch.save({"before": before, "after": after, "res": res, "ref": ref},
                   os.path.join(out, "result.pt"))  # fmt: skip
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_world_of_one_validates_without_a_collective(tmp_path):
    """Validation in a world of one gathers nothing through gloo: gloo copies a large
    gather in threads of its own, whose OpenMP pool then outnumbers the cores, and libgomp
    throttles the spinning threads of every training step after it (pipelines/train.py)."""
    mp.spawn(_eval_worker, args=(_free_port(), str(tmp_path)), nprocs=1)
    r = torch.load(tmp_path / "result.pt", weights_only=True)
    assert r["after"] == r["before"], "validation started threads (an OpenMP pool in gloo's)"
    assert r["res"]["auc_mean"] == pytest.approx(r["ref"]["auc_mean"], abs=1e-6)
    assert r["res"]["loss"] == pytest.approx(r["ref"]["loss"], rel=1e-5)
