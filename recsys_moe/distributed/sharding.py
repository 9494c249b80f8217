"""The ranking model across workers: torchrec-sharded embeddings, expert-parallel experts,
DDP for the rest; optimisers; checkpoints.

:func:`distribute` turns a :class:`RankingModel` (built identically on every rank from the
same seed) into a :class:`Distributed`:

- the expert pool becomes :class:`ExpertParallel` (E/W per rank) with ``expert_parallel``
  where the model supports it (MMoE, STAR) and E divides by W; otherwise (shared-bottom,
  PLE) the experts stay replicated under DDP;
- the ``EmbeddingBagCollection`` is sharded by torchrec ``DistributedModelParallel`` with the
  plan of ``EmbeddingShardingPlanner`` (table-wise / row-wise / data-parallel as it decides);
  tables use FBGEMM's table-batched kernels with the fused optimiser
  (``apply_optimizer_in_backward``: row-sparse Adam updates inside the backward pass);
- every other parameter is data-parallel (DDP all-reduce), expert parameters excluded
  (``params_to_ignore``) so DDP neither overwrites nor averages them.

Checkpoints (:func:`save_checkpoint` / :func:`load_checkpoint`) use torch.distributed
checkpoint from every rank: sharded tables as ShardedTensors, expert slices wrapped as
DTensors sharded on the expert axis, so a checkpoint holds every expert and can be read
back at any world size, or into a plain single-process model (:func:`read_model_state`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard
from torchrec.distributed.model_parallel import (
    DefaultDataParallelWrapper,
    DistributedModelParallel,
)
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.types import (
    KernelConfig,
    ParameterConstraints,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.distributed.types import ShardingPlan
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from recsys_moe.config import TrainingConfig
from recsys_moe.distributed.expert_parallel import ExpertParallel
from recsys_moe.model.observe import RouterMonitor
from recsys_moe.model.ranker import RankingModel
from recsys_moe.training import (
    LrSchedule,
    dense_optimizer,
    embedding_optimizer,
    fuse_tables,
    make_optimizer,
)

LOCAL = ".local."  # expert-parallel parameter names: core.experts.local.weights.0, ...
EXPERTS = "core.experts."  # the expert pool's parameter names in a RankingModel


@dataclass
class Distributed:
    """A model ready to train on this rank: sharded (``model`` a DistributedModelParallel,
    ``plan`` its plan) or, in a world of one, the RankingModel itself (``plan`` None)."""

    model: torch.nn.Module
    optimizer: CombinedOptimizer
    plan: ShardingPlan | None
    expert_parallel: bool
    schedule: LrSchedule

    @property
    def module(self) -> RankingModel:
        """The RankingModel (its embedding module is the sharded or fused one)."""
        if isinstance(self.model, DistributedModelParallel):
            return self.model.module
        return self.model  # type: ignore[return-value]

    def plan_summary(self) -> dict[str, dict[str, Any]]:
        """Per table: sharding type, compute kernel and the ranks holding it."""
        out: dict[str, dict[str, Any]] = {}
        if self.plan is None:
            fused = isinstance(self.module.embedding.ebc, FusedEmbeddingBagCollection)
            return {
                n: {"module": "embedding.ebc", "sharding": "single_process",
                    "kernel": "fused" if fused else "dense", "ranks": [0]}
                for n in self.module.embedding.names
            }  # fmt: skip
        for module_path, params in self.plan.plan.items():
            for table, ps in params.items():
                ranks = (
                    sorted({s.placement.rank() for s in ps.sharding_spec.shards})
                    if (ps.sharding_spec is not None)
                    else list(ps.ranks or [])
                )
                out[table.removeprefix("t_")] = {
                    "module": module_path,
                    "sharding": ps.sharding_type,
                    "kernel": ps.compute_kernel,
                    "ranks": ranks,
                }
        return out


def expert_parallel(model: RankingModel, group: dist.ProcessGroup | None = None) -> bool:
    """Replace the model's expert pool by this rank's :class:`ExpertParallel` slice where
    the model supports it (one pool every gate reads) and E divides by the world size."""
    W = dist.get_world_size(group)
    if not model.supports_expert_parallel or model.experts.n_experts % W:
        return False
    model.set_experts(ExpertParallel(model.experts, group))
    return True


def expert_param_names(model: torch.nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if LOCAL in n]


def make_plan(
    model: RankingModel,
    device: torch.device,
    *,
    sharding_types: list[str] | None = None,
    batch_size: int = 4096,
) -> ShardingPlan:
    """The planner's plan for the embedding tables (same on every rank: collective)."""
    W = dist.get_world_size()
    topology = TopologyFactory.create_topology(
        trainer_config=TrainerConfig(
            world_size=W, local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", W))
        ),
        kernel_config=KernelConfig(compute_device=device.type),
    )
    constraints = None
    if sharding_types:
        constraints = {
            f"t_{n}": ParameterConstraints(sharding_types=list(sharding_types))
            for n in model.embedding.names
        }
    planner = EmbeddingShardingPlanner(
        topology=topology, batch_size=batch_size, constraints=constraints, debug=False
    )
    return planner.collective_plan(model, None, dist.GroupMember.WORLD)


def distribute(
    model: RankingModel,
    cfg: TrainingConfig,
    device: torch.device | None = None,
    *,
    expert_parallel_: bool = True,
    sharding_types: list[str] | None = None,
) -> Distributed:
    """Shard ``model`` over the initialised default process group (see module docstring).

    In a world of one there is nothing to shard: the model trains as it is, its tables on
    FBGEMM's fused kernels where they have the optimiser (:func:`single_process`).
    ``training.embedding_optimizer = "adam"`` on CPU, which FBGEMM's CPU kernels do not
    fuse, trains the tables data-parallel with torch's Adam (dense table gradients,
    all-reduced)."""
    device = device or torch.device("cpu")
    if dist.get_world_size() == 1 and device.type == "cpu" and not sharding_types:
        return single_process(model, cfg)
    if device.type == "cpu" and cfg.embedding_optimizer == "adam":
        if sharding_types and set(sharding_types) != {"data_parallel"}:
            raise ValueError(
                "training.embedding_optimizer = 'adam' has no fused FBGEMM kernel on CPU: "
                f"sharding {sharding_types} needs adagrad, rowwise_adagrad or sgd (adam "
                "trains data-parallel tables on CPU, any sharding on GPU workers)"
            )
        sharding_types = ["data_parallel"]
    tables = {k: v.detach().clone() for k, v in model.embedding.state_dict().items()}
    sharded = expert_parallel(model) if expert_parallel_ else False
    ignore = expert_param_names(model)
    cls, kw = embedding_optimizer(cfg)
    apply_optimizer_in_backward(cls, model.embedding.ebc.parameters(), dict(kw))
    plan = make_plan(model, device, sharding_types=sharding_types, batch_size=cfg.batch_size)
    with _quiet_fbgemm():
        dmp = DistributedModelParallel(
            model,
            device=device,
            plan=plan,
            data_parallel_wrapper=DefaultDataParallelWrapper(
                params_to_ignore=ignore, static_graph=False, find_unused_parameters=False
            ),
        )
    _copy_tables(dmp, {f"embedding.{k}": v for k, v in tables.items()})
    rest = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    # data-parallel tables are not fused: they take the embedding optimiser here
    tables_dp = {k: rest.pop(k) for k in list(rest) if k.startswith("embedding.")}
    dense = KeyedOptimizerWrapper(rest, lambda params: dense_optimizer(params, cfg))
    parts = [(dmp.fused_optimizer, cfg.embedding_lr), (dense, cfg.lr)]
    if tables_dp:
        tdp = KeyedOptimizerWrapper(tables_dp, lambda params: cls(params, **kw))
        parts.append((tdp, cfg.embedding_lr))
    return Distributed(
        dmp, CombinedOptimizer([o for o, _ in parts]), plan, sharded,
        LrSchedule(parts, cfg.lr_decay),
    )  # fmt: skip


def single_process(model: RankingModel, cfg: TrainingConfig) -> Distributed:
    """A world of one: no sharding wrapper, no DDP, experts whole; the tables on FBGEMM's
    fused kernels with the optimiser in their backward where it has one for
    ``cfg.embedding_optimizer`` (else plain tables with torch's optimiser): the same
    computation as :func:`recsys_moe.training.fit`, checkpointed like a sharded model."""
    with _quiet_fbgemm():
        fused = fuse_tables(model, cfg)
    opt, schedule = make_optimizer(model, cfg, fused)
    return Distributed(model, opt, None, False, schedule)


@contextmanager
def _quiet_fbgemm() -> Iterator[None]:
    """FBGEMM logs every table-batched kernel's arguments at INFO when it builds one."""
    root = logging.getLogger()
    level, root.level = root.level, max(root.level, logging.WARNING)
    try:
        yield
    finally:
        root.setLevel(level)


@torch.no_grad()
def _copy_tables(dmp: DistributedModelParallel, full: dict[str, torch.Tensor]) -> None:
    """Sharding allocates fresh tables: write the model's own weights into this rank's
    shards, so a sharded model starts from exactly the weights it was given."""
    for key, value in dmp.state_dict().items():
        if key not in full:
            continue
        src = full[key]
        if isinstance(value, ShardedTensor):
            for shard in value.local_shards():
                (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                shard.tensor.copy_(src[r0 : r0 + nr, c0 : c0 + nc])
        else:
            value.copy_(src)


def reduce_monitor(monitor: RouterMonitor) -> None:
    """Sum every rank's router statistics (collective), so each rank holds the global ones."""
    for name in sorted(monitor.acc):
        a = monitor.acc[name]
        for t in (a.tokens, a.load, a.prob, a.entropy):
            dist.all_reduce(t)
        if a.allowed is not None:
            allowed = a.allowed.to(torch.uint8)
            dist.all_reduce(allowed, op=dist.ReduceOp.MAX)
            a.allowed = allowed.bool()
        dropped = torch.tensor([sum(a.dropped), float(len(a.dropped))])
        dist.all_reduce(dropped)
        a.dropped = [float(dropped[0] / dropped[1].clamp_min(1))]
        losses = torch.tensor([sum(a.aux), sum(a.z), float(len(a.aux))])
        dist.all_reduce(losses)
        n = float(losses[2])
        a.aux, a.z = ([float(losses[0] / n)], [float(losses[1] / n)]) if n else ([], [])


# ------------------------------------------------------------------ state


def _dtensor_mesh():
    return init_device_mesh("cpu", (dist.get_world_size(),))


def _wrap_local(state: dict[str, Any], mesh) -> dict[str, Any]:
    """Expert slices (and their optimiser moments) -> DTensors sharded on the expert axis."""
    out: dict[str, Any] = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out[k] = _wrap_local(v, mesh) if LOCAL in k or k == "state" else v
        elif LOCAL in k and isinstance(v, torch.Tensor) and v.dim() > 0:
            out[k] = DTensor.from_local(v, mesh, [Shard(0)], run_check=False)
        else:
            out[k] = v
    return out


def _unwrap(state: Any) -> Any:
    if isinstance(state, dict):
        return {k: _unwrap(v) for k, v in state.items()}
    if isinstance(state, DTensor):
        return state.to_local()
    return state


def _state(d: Distributed) -> dict[str, Any]:
    for opt, _ in d.schedule.parts:
        if isinstance(opt, KeyedOptimizerWrapper) and not opt.state:
            opt.init_state()  # Adam's state is lazy: DCP needs it allocated
    mesh = _dtensor_mesh()
    return {
        "model": _wrap_local(d.model.state_dict(), mesh),
        "optim": _wrap_local(d.optimizer.state_dict(), mesh),
    }


def save_checkpoint(d: Distributed, path: str | Path, meta: dict[str, Any]) -> None:
    """Collective: every rank writes its shards; rank 0 writes ``meta.json``."""
    path = Path(path)
    dcp.save(_state(d), checkpoint_id=str(path))
    if dist.get_rank() == 0:
        (path / "meta.json").write_text(json.dumps(meta, indent=2, default=float))


def load_checkpoint(d: Distributed, path: str | Path) -> dict[str, Any]:
    """Collective: restore model and optimiser state written by :func:`save_checkpoint`."""
    path = Path(path)
    state = _state(d)
    dcp.load(state, checkpoint_id=str(path))
    state = _unwrap(state)
    d.model.load_state_dict(state["model"])
    d.optimizer.load_state_dict(state["optim"])
    return json.loads((path / "meta.json").read_text())


def read_model_state(path: str | Path, model: RankingModel) -> dict[str, torch.Tensor]:
    """A checkpoint's weights as a plain state dict for a single-process ``model`` (no
    process group needed): sharded tables and expert slices are reassembled on load."""
    saved = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)

    def saved_key(k: str) -> str:
        local = "model." + k.replace(EXPERTS, EXPERTS.rstrip(".") + LOCAL, 1)
        return local if k.startswith(EXPERTS) and local in saved else "model." + k

    own = model.state_dict()
    template = {saved_key(k): torch.empty_like(v) for k, v in own.items()}
    dcp.load(template, checkpoint_id=str(path), no_dist=True)
    return {k: template[saved_key(k)] for k in own}
