"""``recsys-moe train``: distributed training on Ray Train, evaluation, MLflow run and registry.

    driver                                   Ray Train workers (N, gloo on CPU / NCCL on GPU)
    ------                                   -----------------------------------------------
    open MLflow run, log config + manifest   each: its shard of train / valid (Ray Data
    TorchTrainer(worker_loop, datasets) ---> streaming_split), RankingModel from the seed,
                                             distribute(): torchrec-sharded tables (fused
                                             FBGEMM + fused optimiser), experts E/W per
                                             worker, DDP for the rest; per epoch: train,
                                             validate (gathered on rank 0), DCP checkpoint
                                             from every rank via ray.train.report; rank 0
                                             logs epoch metrics to the run
    best checkpoint -> single-process model  <---
    test metrics (+ oracle), plots, MLflow model (pyfunc over raw rows), register, promote

Checkpoints live in ``<checkpoint_dir>/<run name>``; ``--resume NAME`` continues a stopped
run from its last checkpoint, and ``FailureConfig(max_failures)`` restarts workers that die
(the group restarts from the last checkpoint). ``RAY_ADDRESS`` runs it on a cluster.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from features.spec import SEGMENT
from features.store import (
    example_files,
    held_out_split,
    load_manifest,
    read_examples,
    read_vocabs,
)
from pipelines.cli import command_parser, config_from_args
from pipelines.publish import published
from recsys_moe.bundle import write_bundle
from recsys_moe.config import Config, config_from_dict
from recsys_moe.metrics import evaluate_slices
from recsys_moe.model.inputs import ExampleTensors, InputSpec
from recsys_moe.model.observe import RouterMonitor
from recsys_moe.model.ranker import RankingModel
from recsys_moe.model.revive import ExpertReviver
from recsys_moe.tracking import log_revivals
from recsys_moe.training import (
    EarlyStopping,
    evaluate_model,
    evaluation_slices,
    prediction_loss,
    prepare_for_training,
    revival_metrics,
    run_epochs,
    task_metrics,
    train_batches,
    train_step,
)

# ------------------------------------------------------------------ reporting helpers


def oracle_metrics(
    cfg: Config, test: pl.DataFrame, data: ExampleTensors, spec: InputSpec
) -> dict[str, float] | None:
    """AUC of the generator's true probabilities on the test rows (synthetic data only)."""
    truth_dir = Path(cfg.data.raw_dir) / "truth"
    if cfg.source.kind != "synthetic" or not truth_dir.is_dir() or "event_id" not in test.columns:
        return None
    truth = pl.read_parquet(str(truth_dir / "*.parquet"))
    joined = test.select("event_id").join(truth, on="event_id", how="left", maintain_order="left")
    p = joined.select([f"p_{t}" for t in spec.task_names]).to_numpy()
    return task_metrics(spec, data.labels.numpy(), p, data.domain.numpy())


def table(spec: InputSpec, res: dict[str, float], oracle: dict[str, float] | None) -> str:
    tw = max(len(t.name) for t in spec.tasks) + 2
    dw = max(len(d) for d in [*spec.domains, "domain"]) + 2
    lines = [f"{'task':<{tw}}{'domain':<{dw}}{'AUC':>8}{'oracle':>8}{'logloss':>9}{'calib':>7}"]
    for t in spec.tasks:
        for d in [*spec.domains, "all"]:
            key = f"{t.name}/{d}"
            if f"{key}/auc" not in res:
                continue
            o = f"{oracle[f'{key}/auc']:8.4f}" if oracle and f"{key}/auc" in oracle else f"{'-':>8}"
            calib = res.get(f"{key}/calibration", float("nan"))
            lines.append(
                f"{t.name:<{tw}}{d:<{dw}}{res[f'{key}/auc']:8.4f}{o}{res[f'{key}/logloss']:9.4f}{calib:7.3f}"
            )
    return "\n".join(lines)


def slice_table(spec: InputSpec, res: dict[str, float]) -> str:
    """Test AUC of the cold-start and user-segment slices (rows, AUC per task)."""
    names = sorted(
        k.split("/")[0] for k, v in res.items() if k.endswith("/n") and k.count("/") == 1 and v
    )
    if not names:
        return ""
    tasks = [t.name for t in spec.tasks if t.kind == "binary"]
    lines = [f"{'slice':<16}{'rows':>9}" + "".join(f"{t:>12}" for t in tasks)]
    for n in names:
        cells = "".join(f"{res.get(f'{n}/{t}/auc', float('nan')):12.4f}" for t in tasks)
        lines.append(f"{n:<16}{int(res[f'{n}/n']):>9,}{cells}")
    return "\n".join(lines)


def default_workers(use_gpu: bool = False) -> int:
    """The default layout (``training.workers = 0``) on the running Ray cluster: one
    worker per GPU with ``use_gpu``, else one worker per node, each computing with every
    core of its node (bench/train_layouts.py measured one worker with every core faster
    than two sharded workers on a 2-core machine: the sharded layout pays collectives and
    shares the cores it splits)."""
    import ray

    if use_gpu:
        return max(1, int(ray.cluster_resources().get("GPU", 1)))
    return max(1, _cpu_nodes())


def _cpu_nodes() -> int:
    """The running Ray cluster's live nodes with CPUs."""
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU"))


# ------------------------------------------------------------------ the worker loop


def _gather_eval(d, batches, spec: InputSpec, device) -> dict[str, float] | None:
    """Predict this rank's validation ``batches``; rank 0 gets every rank's rows and the
    metrics."""
    import torch.distributed as dist

    d.model.eval()
    preds, labels, domains, loss_sum, n = [], [], [], 0.0, 0
    with torch.no_grad():
        for b in batches:
            b = b.to(device)
            out = d.model(b)
            loss_sum += float(prediction_loss(d.module, out, b.labels)) * len(b)
            n += len(b)
            preds.append(out.preds.cpu())
            labels.append(b.labels.cpu())
            domains.append(b.domain.cpu())
    T = len(spec.tasks)
    mine = (
        torch.cat(preds) if preds else torch.zeros(0, T),
        torch.cat(labels) if labels else torch.zeros(0, T),
        torch.cat(domains) if domains else torch.zeros(0, dtype=torch.long),
        loss_sum,
        n,
    )
    if dist.get_world_size() == 1:
        # no collective: gloo copies a large gather in threads of its own, whose OpenMP
        # pool then outnumbers the cores, and libgomp throttles the spinning threads of
        # every training step after it (they sleep between regions)
        everyone = [mine]
    else:
        everyone = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(mine, everyone, dst=0)
    if everyone is None:
        return None
    p = torch.cat([e[0] for e in everyone]).numpy()
    y = torch.cat([e[1] for e in everyone]).numpy()
    dom = torch.cat([e[2] for e in everyone]).numpy()
    res = task_metrics(spec, y, p, dom)
    res["loss"] = sum(e[3] for e in everyone) / max(sum(e[4] for e in everyone), 1)
    return res


def worker_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: shard the model, then the library's epoch loop
    (:func:`recsys_moe.training.run_epochs`) with this rank's shard of the data; rank 0
    evaluates and decides, every rank checkpoints. A refit (``config["refit"]``) trains
    every epoch on train + valid without validating."""
    w = _Worker(config)
    if config["refit"]:
        # the validation rows are training rows here: nothing to evaluate or decide; the
        # epoch count was chosen by the first fit, and every epoch runs
        run_epochs(epochs=w.tcfg.epochs, stopping=w.stopping, train_epoch=w.refit_epoch,
                   evaluate=lambda epoch: None, schedule=w.d.schedule,
                   on_epoch=w.refit_checkpoint, log=None)  # fmt: skip
        return
    run_epochs(
        epochs=w.tcfg.epochs,
        stopping=w.stopping,
        train_epoch=w.train_epoch,
        evaluate=lambda epoch: _gather_eval(w.d, w.valid_batches(), w.spec, w.device),
        schedule=w.d.schedule,
        sync=_broadcast_from_rank0,
        on_epoch=w.checkpoint,
        log=(lambda line: print(f"[train] {line}", flush=True)) if w.rank == 0 else None,
    )


def _broadcast_from_rank0(st: EarlyStopping) -> EarlyStopping:
    """Rank 0 decides (early stopping), every rank follows."""
    import torch.distributed as dist

    box = [st]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class _Worker:
    """A Ray Train worker's state, set up in steps: the model and its distribution, the
    MLflow client (rank 0), the resumed early-stopping state, this rank's rows; then one
    method per thing the epoch loop asks of it."""

    def __init__(self, config: dict[str, Any]) -> None:
        import ray.train

        from recsys_moe.distributed.sharding import distribute

        torch.set_num_threads(config["threads"])
        ctx = ray.train.get_context()
        self.config = config
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.cfg = cfg = config_from_dict(config["cfg"])
        self.tcfg = tcfg = cfg.training
        self.spec = InputSpec.from_manifest(config["manifest"])
        self.device = ray.train.torch.get_device() if tcfg.use_gpu else torch.device("cpu")
        torch.manual_seed(tcfg.seed)
        model = RankingModel(self.spec, cfg.model)
        if config.get("warm_start"):  # the parent's weights (a resumed run's checkpoint wins)
            from safetensors.torch import load_file

            model.load_state_dict(load_file(config["warm_start"]))
        prepare_for_training(model, tcfg, self.device)  # bf16 / fused experts for steps
        self.d = distribute(
            model, tcfg, self.device,
            expert_parallel_=config["expert_parallel"],
            sharding_types=config.get("sharding_types"),
        )  # fmt: skip
        self.client = self._mlflow_client()
        self._announce_layout()
        self.stopping = self._resumed_stopping()
        self.held = self._held_rows()
        self.rows_per_rank = (
            len(self.held["train"]) if self.held else config["train_rows"] // self.world
        )
        # training.batch_size is the global batch: W workers on B/W rows each take the same
        # steps as one process on B rows (and the sharded model computes the same gradients)
        self.batch_size = max(1, tcfg.batch_size // self.world)
        self.monitor = RouterMonitor.for_training(self.spec.domains, tcfg)
        # decisions from the load summed over workers: every rank revives the same experts
        import torch.distributed as dist

        self.reviver = ExpertReviver.for_training(self.d.module, tcfg, all_reduce=dist.all_reduce)

    # ---------------------------------------------------------------- set-up steps

    def _mlflow_client(self):
        """Rank 0's MLflow client, which logs the sharding plan now and epochs later."""
        config = self.config
        if self.rank != 0 or not config.get("run_id"):
            return None
        from mlflow import MlflowClient

        client = MlflowClient(config["tracking_uri"])
        client.log_dict(config["run_id"], self.d.plan_summary(), "sharding_plan.json")
        client.log_param(config["run_id"], "train.expert_parallel", self.d.expert_parallel)
        # how the rows reached the workers: the store's files read in place, or Ray Data
        client.log_param(
            config["run_id"], "train.ingest", "files" if config.get("files") else "ray_data"
        )
        return client

    def _announce_layout(self) -> None:
        """Rank 0 says how many workers on how many nodes, and how the model is laid out."""
        import ray
        import torch.distributed as dist

        d = self.d
        nodes = [None] * self.world
        dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
        if self.rank != 0:
            return
        plan = ", ".join(
            f"{t}:{p['sharding']}@{','.join(map(str, p['ranks']))}"
            for t, p in d.plan_summary().items()
        )
        experts = (
            f"{self.world} x {d.module.experts.n_local}" if d.expert_parallel else "replicated"
        )
        layout = (
            f"tables {plan}; experts {experts}"
            if d.plan is not None
            else "one process, nothing sharded (tables on "
            f"{next(iter(d.plan_summary().values()))['kernel']} kernels)"
        )
        print(
            f"[train] {self.world} worker(s) on {len(set(nodes))} node(s), "
            f"{torch.get_num_threads()} threads each; {layout}",
            flush=True,
        )
        if self.client is not None:
            self.client.log_param(self.config["run_id"], "train.nodes", len(set(nodes)))

    def _resumed_stopping(self) -> EarlyStopping:
        """Early stopping from the last checkpoint (a resumed or restarted run), else new."""
        import ray.train

        from recsys_moe.distributed.sharding import load_checkpoint

        stopping = EarlyStopping(
            self.tcfg.promote_metric.removeprefix("valid/"), self.tcfg.early_stopping_patience
        )
        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as path:
                stopping = EarlyStopping.from_state(load_checkpoint(self.d, path)["stopping"])
            if self.rank == 0:
                print(f"[train] resumed after epoch {stopping.epoch} from {ckpt.path}", flush=True)
        return stopping

    def _held_rows(self) -> dict[str, ExampleTensors]:
        """This rank's rows as tensors, read once (training.in_memory); {} when streamed.
        A refit's train shard holds the valid rows; it never validates. A world of one on
        one node (``config["files"]``) reads the store's files itself, in file order."""
        import ray.train

        splits = ["train"] if self.config["refit"] else ["train", "valid"]
        files = self.config.get("files")
        if files:
            self.train_it = self.valid_it = None  # no Ray Data shards in this run
            return {s: _read_tensors(self.spec, files[s]) for s in splits}
        self.train_it = ray.train.get_dataset_shard("train")
        self.valid_it = ray.train.get_dataset_shard("valid")
        if not self.tcfg.in_memory:
            return {}
        its = {"train": self.train_it, "valid": self.valid_it}
        return {s: _shard_tensors(self.spec, its[s]) for s in splits}

    # ---------------------------------------------------------------- the epoch loop's

    def _batches(self, epoch: int):
        """This rank's training batches of ``epoch``, shuffled by a seed of the epoch (a
        resumed run shuffles alike)."""
        seed = self.tcfg.seed + 1000 * epoch + self.rank
        if self.held:
            gen = torch.Generator().manual_seed(seed)
            batches = self.held["train"].batches(self.batch_size, shuffle=True, generator=gen)
            return (b.to(self.device) for b in batches)
        return (
            ExampleTensors(self.spec, tbl).batch(slice(None)).to(self.device)
            for tbl in self.train_it.iter_batches(
                batch_size=self.batch_size,
                batch_format="pyarrow",
                local_shuffle_buffer_size=self.config["shuffle_buffer"],
                local_shuffle_seed=seed,
            )
        )

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One epoch on this rank's rows; the epoch's global figures (summed over ranks)."""
        import torch.distributed as dist

        from recsys_moe.distributed.sharding import reduce_monitor

        self.monitor.reset()
        before = len(self.reviver.events)
        next_report = [0.25]

        def report(seen: int, losses: list[float]) -> None:
            # at a quarter, a half, three quarters (the epoch's own line says the end)
            due = next_report[0] < 1 and seen >= next_report[0] * self.rows_per_rank
            if self.rank == 0 and self.config["progress"] and due:
                print(f"[train] epoch {epoch} {min(seen / self.rows_per_rank, 1):4.0%} "
                      f"loss {np.mean(losses[-50:]):.4f}", flush=True)  # fmt: skip
                next_report[0] += 0.25

        d = self.d
        mine = train_batches(
            lambda b: train_step(d.module, b, d.optimizer, self.monitor, forward=d.model,
                                 reviver=self.reviver),
            self._batches(epoch), progress=False, on_step=report,
        )  # fmt: skip
        if self.client is not None:
            log_revivals(self.client, self.config["run_id"], self.reviver.events[before:], epoch)
        # every rank's loss sum, steps and samples -> the epoch's global figures
        steps = mine["train/steps"]
        sums = torch.tensor([mine["train/loss"] * steps if steps else 0.0, steps,
                             mine["train/samples"]])  # fmt: skip
        dist.all_reduce(sums)
        reduce_monitor(self.monitor)
        return {
            "train/loss": float(sums[0] / sums[1]),
            "train/samples": float(sums[2]),
            "train/seconds": mine["train/seconds"],
            "train/samples_per_s": float(sums[2]) / mine["train/seconds"],
            **{f"train/{k}": v for k, v in self.monitor.metrics().items()},
            **revival_metrics(self.reviver, before),
        }

    def valid_batches(self):
        if self.held:
            return self.held["valid"].batches(8192)
        return (
            ExampleTensors(self.spec, tbl).batch(slice(None))
            for tbl in self.valid_it.iter_batches(batch_size=8192, batch_format="pyarrow")
        )

    def checkpoint(self, epoch: int, st: EarlyStopping, record: dict[str, float] | None) -> None:
        """Log the epoch (rank 0) and report every rank's checkpoint to Ray Train."""
        import ray.train
        from ray.train import Checkpoint

        from recsys_moe.distributed.sharding import save_checkpoint

        if self.client is not None and record is not None:
            from recsys_moe.tracking import log_metrics

            log_metrics(self.client, self.config["run_id"], record, step=epoch)
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(self.d, tmp, {"stopping": st.state()})
            ray.train.report(
                {"epoch": epoch, "valid_score": st.last_score},
                checkpoint=Checkpoint.from_directory(tmp),
            )

    def refit_epoch(self, epoch: int) -> dict[str, float]:
        train = self.train_epoch(epoch)
        if self.rank == 0:
            print(f"[train] refit epoch {epoch}: train loss {train['train/loss']:.4f}, "
                  f"{train['train/samples_per_s']:,.0f} samples/s", flush=True)  # fmt: skip
        if self.client is not None:
            from recsys_moe.tracking import log_metrics

            log_metrics(self.client, self.config["run_id"],
                        {f"refit/{k}": v for k, v in train.items()}, step=epoch)  # fmt: skip
        return train

    def refit_checkpoint(self, epoch: int, st: EarlyStopping, _: dict[str, float] | None) -> None:
        st.epoch = epoch  # a resumed refit continues after its last epoch
        self.checkpoint(epoch, st, None)


def _shard_tensors(spec: InputSpec, it) -> ExampleTensors:
    """A worker's whole share of a dataset as tensors (its blocks read once)."""
    import pyarrow as pa

    blocks = list(it.iter_batches(batch_size=None, batch_format="pyarrow"))
    return ExampleTensors(spec, pa.concat_tables(blocks) if blocks else pa.table({}))


def _read_tensors(spec: InputSpec, files: list[str]) -> ExampleTensors:
    """A split's files as tensors, read in the given order (the rows Ray Data's ordered
    ingest hands a world of one)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return ExampleTensors(spec, pa.concat_tables([pq.read_table(f) for f in files]))


# ------------------------------------------------------------------ the driver


def _split_files(store: str | Path, refit: bool = False) -> dict[str, list[str]]:
    """The store's train and valid files, in order; a refit trains on train + valid."""
    files = {split: example_files(store, split) for split in ("train", "valid")}
    if refit:
        files["train"] = files["train"] + files["valid"]
    return files


def _datasets(files: dict[str, list[str]]) -> dict[str, Any]:
    """The workers' train and valid datasets over ``files``."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the trainer prints its own progress
    ctx.print_on_execution_start = False
    return {
        split: ray.data.read_parquet(f, file_extensions=["parquet"]) for split, f in files.items()
    }


def ordered_ingest() -> Any:
    """Ray Train's data config with blocks handed to the workers in file order: without
    it the order follows which read task finishes first, so the same config and seed
    trained different models from one process to the next."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(execution_options=options)


def fit_distributed(
    cfg: Config,
    *,
    workers: int,
    run_name: str,
    storage: str | Path,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    expert_parallel: bool = True,
    sharding_types: list[str] | None = None,
    max_failures: int = 2,
    progress: bool = True,
    refit: bool = False,
    warm_start: str | None = None,
) -> tuple[Any, EarlyStopping]:
    """Run the TorchTrainer; returns the best checkpoint and the loop's final state (the
    best epoch and the history). ``refit``: train on train + valid for
    ``cfg.training.epochs`` epochs, no validation; returns the last checkpoint.
    ``warm_start``: a safetensors file of the weights every worker starts from
    (:func:`warm_start_state`)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from recsys_moe.cluster import init_ray

    init_ray(dashboard=True)
    one_each = default_workers(cfg.training.use_gpu)  # one worker per node (or GPU)
    workers = workers or one_each
    store = cfg.features.store_dir
    manifest = load_manifest(store)
    rows = manifest["splits"]["rows"]
    train_rows = int(rows["train"]) + (int(rows["valid"]) if refit else 0)
    cpus = float(ray.cluster_resources().get("CPU", 1))
    # a worker reserves at most one CPU, leaving the rest to Ray Data's readers
    cpus_per_worker = max(0.25, min(1.0, (cpus - 1) / workers))
    if cfg.training.in_memory:
        # the rows are read before the first step: the workers then have every core
        threads = max(1, int(cpus // workers))
    else:
        threads = max(1, int(cpus // workers) - 1) if cpus > 2 * workers else 1
    # Ray's workers sleep between OpenMP regions (cluster.WORKER_ENV: spinning threads of
    # several processes stall each other on a small box); a worker alone on its node's
    # cores spins, as a plain process does: half the step time of sleeping threads
    alone = cfg.training.in_memory and workers <= one_each
    omp = {"OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "ACTIVE" if alone else "PASSIVE"}
    files = _split_files(store, refit)
    # a world of one on one node, holding its rows, reads the store's files itself: Ray
    # Data's split of them (its coordinator actors, started per run and kept through the
    # epochs beside the training threads) has nothing to split there
    direct = cfg.training.in_memory and workers == 1 and _cpu_nodes() == 1
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={
            "cfg": cfg.to_dict(),
            "manifest": manifest,
            "run_id": run_id,
            "tracking_uri": tracking_uri,
            "expert_parallel": expert_parallel,
            "sharding_types": sharding_types,
            "threads": threads,
            "train_rows": train_rows,
            "shuffle_buffer": cfg.training.shuffle_buffer,
            "progress": progress,
            "refit": refit,
            "warm_start": warm_start,
            "files": {k: [str(Path(f).resolve()) for f in v] for k, v in files.items()}
            if direct
            else None,
        },
        torch_config=TorchConfig(backend="nccl" if cfg.training.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=cfg.training.use_gpu,
            resources_per_worker={"CPU": cpus_per_worker},
            placement_strategy=cfg.training.placement_strategy,
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(Path(storage).resolve()),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=None,
                checkpoint_score_attribute="valid_score",
                checkpoint_score_order="max",
            ),
            worker_runtime_env={"env_vars": {**omp, "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        ),
        datasets=None if direct else _datasets(files),
        dataset_config=ordered_ingest(),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if refit:
        return result.checkpoint, EarlyStopping()
    scored = [(c, m) for c, m in (result.best_checkpoints or []) if "valid_score" in m]
    if not scored:
        raise RuntimeError(f"training run {run_name} reported no checkpoint")
    best, _ = max(scored, key=lambda cm: (cm[1]["valid_score"], -cm[1]["epoch"]))
    with result.checkpoint.as_directory() as path:  # the last epoch's: the whole history
        meta = json.loads((Path(path) / "meta.json").read_text())
    return best, EarlyStopping.from_state(meta["stopping"])


def model_from_checkpoint(checkpoint, spec: InputSpec, cfg: Config) -> RankingModel:
    """The single-process model from a (sharded) training checkpoint."""
    from recsys_moe.distributed.sharding import read_model_state

    model = RankingModel(spec, cfg.model)
    with checkpoint.as_directory() as path:
        model.load_state_dict(read_model_state(path, model))
    return model.eval()


def evaluate_test(
    cfg: Config, model: RankingModel, manifest: dict[str, Any]
) -> tuple[dict[str, float], dict[str, float] | None, RouterMonitor, np.ndarray, pl.DataFrame]:
    """Metrics on the held-out split (test, or valid in a store without one), with per-user
    AUC and slices; oracle metrics; the router monitor over those rows."""
    spec = model.spec
    test_df = read_examples(cfg.features.store_dir, held_out_split(manifest))
    test = ExampleTensors(spec, test_df)
    monitor = RouterMonitor.for_training(spec.domains, cfg.training)
    users = test_df[manifest["keys"]["user_id"]].to_numpy()
    res, preds = evaluate_model(model, test, users, monitor=monitor)
    res |= slice_metrics(cfg.features.store_dir, manifest, test, preds)
    return res, oracle_metrics(cfg, test_df, test, spec), monitor, preds, test_df


def store_slices(
    store: str | Path, manifest: dict[str, Any], data: ExampleTensors
) -> dict[str, np.ndarray]:
    """The evaluation slices of ``data`` (cold users / items, each user segment by the
    store's segment vocabulary): :func:`recsys_moe.training.evaluation_slices`."""
    vocab = read_vocabs(store, manifest).get(SEGMENT)
    segments = (
        dict(zip(vocab["value"].to_list(), vocab["index"].to_list(), strict=True))
        if vocab is not None
        else None
    )
    return evaluation_slices(manifest, data, segments)


def slice_metrics(
    store: str | Path, manifest: dict[str, Any], data: ExampleTensors, preds: np.ndarray
) -> dict[str, float]:
    """AUC per task and row count of each of :func:`store_slices` (``<slice>/<task>/auc``)."""
    tasks = [(t.name, t.kind) for t in data.spec.tasks]
    return evaluate_slices(data.labels.numpy(), preds, tasks, store_slices(store, manifest, data))


CHALLENGE_ROWS = 100_000


def challenge_rows(bundle: Path, store: str | Path) -> pl.DataFrame:
    """The rows the promotion gate scores both models on: the validation split (at most
    :data:`CHALLENGE_ROWS`, a fixed sample) as raw request rows plus one column per task."""
    from recsys_moe.scorer import Scorer

    valid = read_examples(store, "valid")
    if valid.height > CHALLENGE_ROWS:
        valid = valid.sample(CHALLENGE_ROWS, seed=0)
    scorer = Scorer.from_dir(bundle)
    labels = valid.select(pl.col(t.column).alias(t.name) for t in scorer.model.spec.tasks)
    return pl.concat([scorer.example_rows(valid), labels], how="horizontal")


class WarmStartError(ValueError):
    """The model named by ``--warm-start`` cannot start this training (the message says why)."""


def warm_start_state(
    ref: str, cfg: Config, manifest: dict[str, Any], path: Path
) -> tuple[Config, dict[str, Any]]:
    """Write to ``path`` the weights a retrain starts from: the model ``ref``'s, its
    embedding rows matched to the store's vocabularies by value
    (:func:`recsys_moe.model.grow.warm_state`). Returns the config with the parent's
    ``[model]`` (a warm start continues that model), its learning rates scaled by
    ``training.warm_start_lr_scale``, and the lineage to record."""
    from safetensors.torch import save_file

    from recsys_moe.bundle import BundleError, load_model
    from recsys_moe.bundle import read_vocabs as bundle_vocabs
    from recsys_moe.model.grow import warm_state
    from recsys_moe.registry import ModelNotFound, comparable, resolve_model

    try:
        resolved = resolve_model(ref)
        parent, meta = load_model(resolved.bundle)
        differ = comparable(manifest, meta["manifest"])
        if differ:
            raise WarmStartError(f"it models other data ({'; '.join(differ)})")
        child = RankingModel(InputSpec.from_manifest(manifest), parent.cfg)
        state, known = warm_state(
            parent,
            bundle_vocabs(resolved.bundle, meta["manifest"]),
            child,
            read_vocabs(cfg.features.store_dir, manifest),
        )
    except (ModelNotFound, BundleError, ValueError) as e:
        raise WarmStartError(f"--warm-start {ref}: {e}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    sizes = {f.name: f.vocab_size - 1 for f in child.spec.sparse}
    new = {f: sizes[f] - known[f] for f in sizes if sizes[f] > known[f]}
    print(f"[train] warm start from {resolved.name} v{resolved.version}: every weight "
          f"carried over; values new to it (rows started as its unknown row): "
          f"{', '.join(f'{f} {n:,}' for f, n in new.items()) or 'none'}", flush=True)  # fmt: skip
    if parent.cfg != cfg.model:
        print("[train] warm start: the model keeps the parent's [model] settings, not the "
              "config's", flush=True)  # fmt: skip
    t = cfg.training
    scale = t.warm_start_lr_scale
    training = dataclasses.replace(t, lr=t.lr * scale, embedding_lr=t.embedding_lr * scale)
    if scale != 1:
        print(f"[train] warm start: learning rates x{scale:g} (training.warm_start_lr_scale): "
              f"lr {training.lr:g}, embedding_lr {training.embedding_lr:g}", flush=True)  # fmt: skip
    window = manifest.get("splits", {})
    lineage = {
        "parent.model": resolved.name,
        "parent.version": str(resolved.version),
        "parent.run_id": resolved.run_id,
        "parent.uri": resolved.uri,
        "warm_start.new_values": json.dumps(new),
        "window.days": str(window.get("window_days") or 0),
        "window.since": str(window.get("since") or ""),
        "warm_start.lr_scale": str(scale),
    }
    return cfg.replace(model=parent.cfg, training=training), lineage


def run_training(
    cfg: Config,
    *,
    workers: int,
    output: str | Path,
    resume: str | None = None,
    register: bool = True,
    expert_parallel: bool | None = None,
    sharding_types: list[str] | None = None,
    max_failures: int | None = None,
    force_promote: bool = False,
    progress: bool = True,
    warm_start: str | None = None,
    alias: str | None = None,
) -> dict[str, Any]:
    """The whole train command; returns a summary (also written to <output>/metrics.json).
    ``warm_start``: a model reference; training starts from its weights
    (:func:`warm_start_state`) and the run records it as the parent. ``alias``: the alias
    the registered version may take (default: the config's, ``champion``), e.g.
    ``challenger`` for a model to prove on live traffic first."""
    from recsys_moe import registry, tracking

    started = time.perf_counter()
    store = cfg.features.store_dir
    manifest = load_manifest(store)
    spec = InputSpec.from_manifest(manifest)
    run_name = resume or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = Path(cfg.training.checkpoint_dir)
    lineage: dict[str, str] = {}
    warm_file = None
    if warm_start:  # before Ray starts: a wrong model is a quick error
        # absolute: Ray Train's workers run in a directory of their own
        warm_file = (storage / f"{run_name}-warm-start.safetensors").resolve()
        cfg, lineage = warm_start_state(warm_start, cfg, manifest, warm_file)
    if not workers:
        from recsys_moe.cluster import init_ray

        init_ray(dashboard=True)
        workers = default_workers(cfg.training.use_gpu)
    tracker = tracking.Tracker.open(cfg, run_name)
    with tracker:
        tracker.log_start(cfg, manifest, workers=workers, run_name=run_name, storage=storage)
        if lineage:
            import mlflow

            mlflow.set_tags(lineage)  # the parent version and the window: the run's lineage
        fit_kw = {
            "workers": workers,
            "storage": storage,
            "run_id": tracker.run_id,
            "tracking_uri": tracker.uri,
            "expert_parallel": (
                cfg.training.expert_parallel if expert_parallel is None else expert_parallel
            ),
            "sharding_types": sharding_types,
            "max_failures": cfg.training.max_failures if max_failures is None else max_failures,
            "progress": progress,
            "warm_start": str(warm_file) if warm_file else None,
        }
        best, stopping = fit_distributed(cfg, run_name=run_name, **fit_kw)
        history, best_epoch, valid = stopping.history, stopping.best_epoch, stopping.best_valid()
        selected = model = model_from_checkpoint(best, spec, cfg)
        if cfg.training.refit:  # a fresh model on train + valid, as many epochs as chosen
            print(f"[train] refit on train + valid for {best_epoch + 1} epoch(s)", flush=True)
            again = cfg.replace(training=dataclasses.replace(cfg.training, epochs=best_epoch + 1))
            best, _ = fit_distributed(again, run_name=f"{run_name}-refit", refit=True, **fit_kw)
            model = model_from_checkpoint(best, spec, cfg)
        # the held-out rows' metrics come from a model that never trained on them: the
        # refit model where the store has a test split, else the selected one (its
        # validation rows are the refit's training rows)
        judged = model if held_out_split(manifest) == "test" else selected
        test_metrics, oracle, monitor, preds, test_df = evaluate_test(cfg, judged, manifest)
        # the bundle is written beside its folder, logged and registered from there, then
        # swapped in whole: a killed run leaves the previous bundle, and two runs with one
        # output folder take turns here instead of mixing their files (pipelines/publish.py)
        with published(output, "train") as staging:
            out = write_bundle(
                model, staging, manifest, store=store,
                extra={"config": cfg.to_dict(), "valid": valid, "test": test_metrics,
                       "run_name": run_name, "router_load": monitor.load_shares()},
            )  # fmt: skip
            samples = [h["train/samples_per_s"] for h in history]
            summary = {
                "model_dir": str(Path(output).resolve()),
                "run_name": run_name,
                "workers": workers,
                "best_epoch": best_epoch,
                "epochs_run": len(history),
                "seconds": round(time.perf_counter() - started, 1),
                "samples_per_s": round(float(np.mean(samples))) if samples else 0,
                "valid": valid,
                # metrics of the held-out rows: test, or valid where the store has no test split
                "evaluated_on": held_out_split(manifest),
                "test": test_metrics,
                "oracle": oracle,
                "router": monitor.metrics(),
                "history": history,
                "checkpoint": best.path,
                # the registered model trained on train + valid for best_epoch + 1 epochs
                "refit": cfg.training.refit,
                "parent": lineage,
            }
            (Path(out) / "metrics.json").write_text(json.dumps(summary, indent=2, default=float))
            tracker.log_end(summary, model, monitor, preds, test_df, out)
            if register:
                metric = cfg.training.promote_metric
                score = valid.get(metric.removeprefix("valid/"), float("nan"))
                rows = challenge_rows(out, store)
                with tempfile.TemporaryDirectory() as tmp:
                    # a refit model has trained on the validation rows: the gate judges the
                    # selected model, which has not, against the champion on them
                    challenger = (
                        write_bundle(selected, tmp, manifest, store=store)
                        if cfg.training.refit
                        else out
                    )
                    summary["registry"] = registry.register_and_promote(
                        tracker,
                        cfg,
                        {"promote_metric": metric, "valid_score": f"{score:.6f}",
                         "refit": str(cfg.training.refit).lower(), **lineage},
                        lambda version: registry.challenge(
                            challenger, rows, name=cfg.model_name,
                            alias=alias or cfg.serving.model_alias, metric=metric,
                            force=force_promote, uri=tracker.uri,
                        ),
                        alias=alias,
                    )  # fmt: skip
    summary["run_id"] = tracker.run_id
    summary["tracking_uri"] = tracker.uri
    print(table(spec, test_metrics, oracle), flush=True)
    print(slice_table(spec, test_metrics), flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = command_parser("train", __doc__)
    ap.add_argument(
        "--workers",
        type=int,
        default=None,
        help="Ray Train workers (default: training.workers; 0 there: one per node, or per "
        "GPU with --use-gpu, each with every core of its node)",
    )
    ap.add_argument("--use-gpu", action="store_true", help="GPU workers with NCCL")
    ap.add_argument("--output", default=None, help="model folder (default: models/<config name>)")
    ap.add_argument("--resume", default=None, metavar="RUN", help="continue this stopped run")
    ap.add_argument(
        "--no-expert-parallel",
        action="store_true",
        help="replicate the experts on every worker (training.expert_parallel = false)",
    )
    ap.add_argument("--no-register", action="store_true", help="log the run, skip the registry")
    ap.add_argument(
        "--force-promote",
        action="store_true",
        help="move the alias even if the champion scores higher or models other data",
    )
    ap.add_argument(
        "--warm-start", nargs="?", const="", default=None, metavar="MODEL",
        help="start from this model's weights (a retrain; its [model] settings are kept); "
        "without a value: the config's model at its alias",
    )  # fmt: skip
    ap.add_argument(
        "--alias", default=None,
        help="the alias the registered version may take, through the same gate (default: "
        "[serving] model_alias, champion; e.g. challenger, for a shadow or canary first)",
    )  # fmt: skip
    args, cfg = config_from_args(ap, argv, {"use_gpu": "training.use_gpu"})
    workers = args.workers or cfg.training.workers  # 0: run_training picks the layout
    output = args.output or f"models/{cfg.name}"
    warm = None if args.warm_start is None else (args.warm_start or cfg.model_uri)
    try:
        s = _train(cfg, args, workers, output, warm)
    except WarmStartError as e:
        print(f"recsys-moe train: error: {e}", file=sys.stderr)
        return 2
    _print_summary(s)
    return 0


def _train(cfg: Config, args: Any, workers: int, output: str, warm: str | None) -> dict[str, Any]:
    return run_training(
        cfg,
        workers=workers,
        output=output,
        resume=args.resume,
        register=not args.no_register,
        expert_parallel=False if args.no_expert_parallel else None,
        force_promote=args.force_promote,
        progress=not args.no_progress,
        warm_start=warm,
        alias=args.alias,
    )


def _print_summary(s: dict[str, Any]) -> None:
    reg = s.get("registry") or {}
    print(
        f"trained on {s['workers']} worker{'s' if s['workers'] != 1 else ''} in {s['seconds']}s ({s['samples_per_s']:,} samples/s), "
        f"best epoch {s['best_epoch']}; valid auc_mean {s['valid'].get('auc_mean', float('nan')):.4f}, "
        + (
            f"test auc_mean {s['test'].get('auc_mean', float('nan')):.4f}, "
            if s["evaluated_on"] == "test"
            else "no test split (trained on every row before the validation window), "
        )
        + f"worst-domain AUC {s['test'].get('auc_worst_domain', float('nan')):.4f}\n"
        f"MLflow run: {s['run_id']} ({s['tracking_uri']})\n"
        + (
            f"registered: {reg['name']} version {reg['version']}; {reg['decision']}\n"
            if reg
            else ""
        )
        + f"model: {s['model_dir']}\ncheckpoints: {s['checkpoint']}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
