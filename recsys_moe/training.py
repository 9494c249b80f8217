"""The training loop, defined once: optimisers, the step, the epoch loop with its
evaluation, learning-rate schedule and early stopping.

:func:`run_epochs` is the loop every trainer calls: :func:`fit` (one process), the Ray
Train workers (``pipelines/train``: sharded model, evaluation gathered on rank 0, rank
0's decision broadcast, a checkpoint every epoch) and growing a model
(:func:`recsys_moe.model.grow.train_extension`). Each passes its own epoch of steps and
its own evaluation; the schedule (:class:`LrSchedule`), early stopping
(:class:`EarlyStopping`), progress lines and the history are the same for all.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

from recsys_moe import console
from recsys_moe import metrics as M
from recsys_moe.config import ExtendConfig, TrainingConfig
from recsys_moe.model.inputs import Batch, ExampleTensors, InputSpec
from recsys_moe.model.observe import RouterMonitor
from recsys_moe.model.ranker import RankingModel, task_losses
from recsys_moe.model.revive import ExpertReviver


@dataclass
class FitResult:
    """What :func:`fit` returns: the best epoch's validation metrics and the history."""

    best_epoch: int
    valid: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    router: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    samples_per_s: float = 0.0
    # dead experts revived (training.revive_after_steps): step, expert, donor, load share
    revivals: list[dict[str, Any]] = field(default_factory=list)


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    return torch.Generator().manual_seed(seed)


def embedding_optimizer(cfg: TrainingConfig) -> tuple[type[torch.optim.Optimizer], dict]:
    """The embedding tables' optimiser class and arguments. The same classes select the
    fused FBGEMM update when torchrec shards the tables, so both paths train alike."""
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    cls = {
        "adagrad": torch.optim.Adagrad,
        "rowwise_adagrad": RowWiseAdagrad,
        "sgd": torch.optim.SGD,
        "adam": torch.optim.Adam,
    }[cfg.embedding_optimizer]
    kw: dict[str, Any] = {"lr": cfg.embedding_lr}
    if cfg.embedding_optimizer != "sgd":
        kw["eps"] = EMBEDDING_EPS
    if cfg.embedding_weight_decay:  # adam on CPU only (TrainingConfig refuses the rest)
        kw["weight_decay"] = cfg.embedding_weight_decay
    return cls, kw


EMBEDDING_EPS = 1e-8


def dense_optimizer(params, cfg: TrainingConfig) -> torch.optim.Optimizer:
    """Adam, as one fused kernel over every parameter (CPU and CUDA) instead of a few
    ops per parameter tensor."""
    params = list(params)
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


@dataclass
class LrSchedule:
    """Learning rates by epoch: each optimiser's groups at ``base * decay ** epoch`` (a
    schedule, not optimiser state: a resumed run sets the same rates)."""

    parts: list[tuple[Any, float]]  # (optimiser, its base learning rate)
    decay: float = 1.0

    def apply(self, epoch: int) -> None:
        for opt, base in self.parts:
            lr = base * self.decay**epoch
            for group in opt.param_groups:
                # left alone when it already is the rate (FBGEMM's fused optimisers keep it
                # as float32: writing the float64 back changes their updates)
                if not math.isclose(group["lr"], lr, rel_tol=1e-6):
                    group["lr"] = lr


def make_optimizer(
    model: RankingModel, cfg: TrainingConfig, fused: torch.optim.Optimizer | None = None
) -> tuple[CombinedOptimizer, LrSchedule]:
    """Adam for dense parameters; the embedding optimiser of ``cfg`` for the tables, or
    ``fused``: the tables' optimiser already inside their backward (:func:`fused_embeddings`),
    added so that zero_grad, learning rates and state reach it too. With the schedule of
    ``training.lr_decay``."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    emb = {n: p for n, p in named if n.startswith("embedding.")}
    rest = {n: p for n, p in named if not n.startswith("embedding.")}
    cls, kw = embedding_optimizer(cfg)
    parts = [(KeyedOptimizerWrapper(rest, lambda ps: dense_optimizer(ps, cfg)), cfg.lr)]
    if fused is not None:
        parts.append((fused, cfg.embedding_lr))
    elif emb:
        parts.append((KeyedOptimizerWrapper(emb, lambda ps: cls(ps, **kw)), cfg.embedding_lr))
    return CombinedOptimizer([o for o, _ in parts]), LrSchedule(parts, cfg.lr_decay)


# FBGEMM's CPU kernels fuse these optimisers into the lookup's backward (adam: GPU only)
_FUSED_ON_CPU = ("adagrad", "rowwise_adagrad", "sgd")


def prepare_for_training(model: RankingModel, cfg: TrainingConfig, device: torch.device) -> None:
    """What training steps compute with (eval-mode forwards are unaffected): the dtype of
    ``training.precision`` and the experts' ``training.expert_impl``; and this process's
    allocator keeps its memory between steps (recsys_moe.runtime.tune_allocator)."""
    from recsys_moe.model.experts import StackedExperts
    from recsys_moe.runtime import tune_allocator

    tune_allocator()
    model.train_dtype = training_dtype(cfg, device)
    for m in model.modules():
        if isinstance(m, StackedExperts):
            m.train_impl = None if cfg.expert_impl == "model" else cfg.expert_impl


def training_dtype(cfg: TrainingConfig, device: torch.device) -> torch.dtype | None:
    """The compute dtype of training steps for ``training.precision`` on ``device``
    (None = float32)."""
    if cfg.precision == "fp32":
        return None
    if cfg.precision == "bf16":
        return torch.bfloat16
    native = (
        torch.cuda.is_bf16_supported()
        if device.type == "cuda"
        else device.type == "cpu" and native_bf16_cpu()
    )
    return torch.bfloat16 if native else None


def native_bf16_cpu() -> bool:
    """This CPU multiplies bf16 in hardware: AMX tiles (Sapphire Rapids and later) or
    AVX512-BF16 dot products (Cooper Lake, AMD Zen 4 and later). Without either, bf16
    GEMMs are emulated and slower than fp32."""
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


@contextmanager
def fused_embeddings(model: RankingModel, cfg: TrainingConfig) -> Iterator[Any]:
    """Single-process training on torchrec's ``FusedEmbeddingBagCollection``: all tables in
    FBGEMM's table-batched kernels with the optimiser update fused into the backward (no
    table gradients, no separate step; bench/kernels.py compares it with per-table
    ``nn.EmbeddingBag``). Yields its optimiser (None where FBGEMM has no fused kernel
    for ``cfg.embedding_optimizer`` on the device, or the tables are frozen: the model is
    left as it is). On exit the plain collection is back, holding the trained weights."""
    ebc = model.embedding.ebc
    fused_opt = fuse_tables(model, cfg)
    if fused_opt is None:
        yield None
        return
    try:
        yield fused_opt
    finally:
        ebc.load_state_dict(model.embedding.ebc.state_dict())
        model.embedding.ebc = ebc


def fuse_tables(model: RankingModel, cfg: TrainingConfig) -> torch.optim.Optimizer | None:
    """Swap the model's tables for torchrec's ``FusedEmbeddingBagCollection`` (same
    weights, same state-dict keys; the optimiser of ``cfg`` inside the backward) and return
    its optimiser; None, leaving the model as it is, where FBGEMM has no fused kernel for
    ``cfg.embedding_optimizer`` on the device or the tables are frozen. For a process that
    trains until it ends (a Ray Train worker); :func:`fused_embeddings` swaps back."""
    from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection

    ebc = model.embedding.ebc
    weights = list(ebc.parameters())
    device = weights[0].device
    if (
        not all(p.requires_grad for p in weights)
        or device.type not in ("cpu", "cuda")
        or (device.type == "cpu" and cfg.embedding_optimizer not in _FUSED_ON_CPU)
    ):
        return None
    cls, kw = embedding_optimizer(cfg)
    fused = FusedEmbeddingBagCollection(
        tables=ebc.embedding_bag_configs(), optimizer_type=cls, optimizer_kwargs=kw,
        device=device,
    )  # fmt: skip
    fused.load_state_dict(ebc.state_dict())
    model.embedding.ebc = fused
    return fused.fused_optimizer()


def prediction_loss(model: RankingModel, out, labels: torch.Tensor) -> torch.Tensor:
    """The task losses weighted by the tasks' weights: what validation reports as ``loss``
    in every trainer (the routing regularisers are training terms, not quality)."""
    w = torch.tensor([t.weight for t in model.spec.tasks])
    return (task_losses(model, out, labels) * w).sum()


def loss_of(model: RankingModel, out, labels: torch.Tensor) -> torch.Tensor:
    """The training loss: :func:`prediction_loss` + aux and z losses times their
    coefficients."""
    return (
        prediction_loss(model, out, labels)
        + model.cfg.aux_loss_coef * out.aux_loss
        + model.cfg.z_loss_coef * out.z_loss
    )


def train_step(
    model: RankingModel,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    monitor: RouterMonitor | None = None,
    forward: torch.nn.Module | None = None,
    reviver: ExpertReviver | None = None,
) -> float:
    """One optimiser step on ``batch``; returns the loss. ``forward``: the module that
    computes the batch (a sharded wrapper of ``model``; default ``model`` itself);
    ``reviver``: treats dead experts after the step."""
    forward = forward if forward is not None else model
    forward.train()
    optimizer.zero_grad(set_to_none=True)
    out = forward(batch)
    total = loss_of(model, out, batch.labels)
    total.backward()
    optimizer.step()
    if monitor is not None:
        monitor.update(out, batch.domain.cpu())
    if reviver is not None:
        reviver.observe(out, batch.domain, optimizer)
    return float(total.detach())


@torch.no_grad()
def _predict_and_loss(
    model: RankingModel,
    data: ExampleTensors,
    batch_size: int,
    monitor: RouterMonitor | None = None,
) -> tuple[np.ndarray, float]:
    """One pass: predictions (n, T) in row order and, with labels, the mean weighted loss."""
    model.eval()
    outs, loss_sum = [], 0.0
    for b in data.batches(batch_size):
        out = model(b)
        if monitor is not None:
            monitor.update(out, b.domain)
        if b.labels is not None:
            loss_sum += float(prediction_loss(model, out, b.labels)) * len(b)
        outs.append(out.preds)
    T = len(model.spec.tasks)
    preds = torch.cat(outs).numpy() if outs else np.zeros((0, T), dtype=np.float32)
    return preds, loss_sum / max(len(data), 1)


def predict(
    model: RankingModel,
    data: ExampleTensors,
    batch_size: int = 8192,
    monitor: RouterMonitor | None = None,
) -> np.ndarray:
    """Predictions (n, T) in row order."""
    return _predict_and_loss(model, data, batch_size, monitor)[0]


def task_metrics(
    spec: InputSpec,
    labels: np.ndarray,
    preds: np.ndarray,
    domains: np.ndarray,
    users: np.ndarray | None = None,
) -> dict[str, float]:
    """recsys_moe.metrics.evaluate with the spec's tasks and domains."""
    tasks = [(t.name, t.kind) for t in spec.tasks]
    return M.evaluate(labels, preds, domains, tasks, spec.domains, users)


def evaluation_slices(
    manifest: dict[str, Any], data: ExampleTensors, segments: dict[str, int] | None = None
) -> dict[str, np.ndarray]:
    """Row masks of the slices the model is judged on beyond the whole: ``cold_user`` /
    ``cold_item`` (the id is not in the training vocabulary: never seen, or too rare), and
    ``segment_<name>`` for each user segment (``segments``: segment -> its index in the
    user-segment vocabulary)."""
    out: dict[str, np.ndarray] = {}
    ids = {f["name"]: f for f in manifest["features"]["categorical"] if f["source"] == "id"}
    index = {f.name: i for i, f in enumerate(data.spec.sparse)}
    for who, key in (("user", manifest["keys"]["user_id"]), ("item", manifest["keys"]["item_id"])):
        if key in ids:
            out[f"cold_{who}"] = (data.values[index[key]] == 0).numpy()
    seg = next((f["name"] for f in manifest["features"]["categorical"] if f["source"] == "derived"),
               None)  # fmt: skip
    if seg is not None and segments:
        values = data.values[index[seg]].numpy()
        out |= {f"segment_{name}": values == i for name, i in segments.items()}
    return out


def evaluate_model(
    model: RankingModel,
    data: ExampleTensors,
    users: np.ndarray | None = None,
    batch_size: int = 8192,
    monitor: RouterMonitor | None = None,
) -> tuple[dict[str, float], np.ndarray]:
    """Metrics per task x domain (recsys_moe.metrics.evaluate) plus "loss", and the predictions."""
    preds, loss = _predict_and_loss(model, data, batch_size, monitor)
    res = task_metrics(model.spec, data.labels.numpy(), preds, data.domain.numpy(), users)
    res["loss"] = loss
    return res, preds


# ------------------------------------------------------------------ the epoch loop


@dataclass
class EarlyStopping:
    """Early stopping on a validation metric: higher is better (``loss`` is minimised);
    stop after more than ``patience`` epochs without improvement. Its fields are the loop's
    whole state (a checkpoint stores them; :meth:`from_state` resumes)."""

    metric: str = "auc_mean"
    patience: int = 1
    best: float = -math.inf
    best_epoch: int = -1
    bad: int = 0
    epoch: int = -1
    history: list[dict[str, float]] = field(default_factory=list)

    def score(self, valid: dict[str, float]) -> float:
        if self.metric == "loss":
            return -valid["loss"]
        return valid.get(self.metric, math.nan)

    def update(self, record: dict[str, float], valid: dict[str, float]) -> bool:
        """Record an epoch; True if it is the best so far (the first epoch always is)."""
        epoch = int(record["epoch"])
        s = self.score(valid)
        improved = self.best_epoch < 0 or s > self.best
        if improved:
            self.best, self.best_epoch, self.bad = s, epoch, 0
        else:
            self.bad += 1
        self.epoch = epoch
        self.history.append({k: v for k, v in record.items() if "/router/" not in k})
        return improved

    @property
    def should_stop(self) -> bool:
        return self.bad > self.patience

    @property
    def best_record(self) -> dict[str, float]:
        return next(h for h in self.history if int(h["epoch"]) == self.best_epoch)

    def best_valid(self) -> dict[str, float]:
        """The best epoch's validation metrics, without the ``valid/`` prefix."""
        return _valid(self.best_record)

    @property
    def last_score(self) -> float:
        """The score of the latest epoch."""
        return self.score(_valid(self.history[-1])) if self.history else math.nan

    def state(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> EarlyStopping:
        return cls(**state)


def _valid(record: dict[str, float]) -> dict[str, float]:
    return {k.removeprefix("valid/"): v for k, v in record.items() if k.startswith("valid/")}


def revival_metrics(reviver: ExpertReviver, before: int) -> dict[str, float]:
    """The epoch's ``train/revived_experts`` (revivals since the reviver had ``before``
    events); nothing when revival is off."""
    return {"train/revived_experts": float(len(reviver.events) - before)} if reviver.enabled else {}


def train_batches(
    step: Callable[[Any], float],
    batches: Iterable[Any],
    *,
    total: int | None = None,
    desc: str = "",
    progress: bool = True,
    on_step: Callable[[int, list[float]], None] | None = None,
    size: Callable[[Any], int] = len,
) -> dict[str, float]:
    """One epoch: ``step`` on every batch (a tqdm bar with ``progress``); ``on_step(seen,
    losses)`` after each. Returns ``train/loss`` (mean), ``train/steps``, ``train/samples``,
    ``train/seconds`` and ``train/samples_per_s``."""
    from tqdm import tqdm

    losses: list[float] = []
    seen, t0 = 0, time.perf_counter()
    bar = tqdm(batches, total=total, desc=desc, disable=not progress, leave=False,
               file=console.terminal())  # fmt: skip
    for b in bar:
        losses.append(step(b))
        seen += size(b)
        if progress and len(losses) % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        if on_step is not None:
            on_step(seen, losses)
    seconds = time.perf_counter() - t0
    return {
        "train/loss": float(np.mean(losses)) if losses else math.nan,
        "train/steps": float(len(losses)),
        "train/samples": float(seen),
        "train/seconds": seconds,
        "train/samples_per_s": seen / max(seconds, 1e-9),
    }


def run_epochs(
    *,
    epochs: int,
    stopping: EarlyStopping,
    train_epoch: Callable[[int], dict[str, float]],
    evaluate: Callable[[int], dict[str, float] | None],
    schedule: LrSchedule | None = None,
    sync: Callable[[EarlyStopping], EarlyStopping] | None = None,
    on_epoch: Callable[[int, EarlyStopping, dict[str, float] | None], None] | None = None,
    log: Callable[[str], None] | None = print,
) -> EarlyStopping:
    """The epoch loop, from the epoch after ``stopping.epoch`` (a resumed run) to
    ``epochs`` or early stopping.

    Args:
        train_epoch: trains one epoch; returns ``train/...`` metrics.
        evaluate: validation metrics (and ``loss``); None in a process that does not
            decide (a distributed rank other than 0).
        schedule: learning rates set for each epoch before it trains.
        sync: a distributed run hands the deciding process's ``stopping`` to every
            process (a broadcast); identity when absent.
        on_epoch: ``(epoch, stopping, record)`` after the decision, in every process
            (keep the best weights when ``stopping.best_epoch == epoch``, checkpoint, log);
            ``record``: the epoch's full metrics where this process evaluated, else None.
        log: where the one-line epoch summary goes (None: nowhere).
    Returns:
        ``stopping``: the best epoch, its score and the history.
    """
    for epoch in range(stopping.epoch + 1, epochs):
        if schedule is not None:
            schedule.apply(epoch)
        train = train_epoch(epoch)
        valid = evaluate(epoch)
        record = None
        if valid is not None:
            record = {"epoch": float(epoch), **train, **{f"valid/{k}": v for k, v in valid.items()}}
            stopping.update(record, valid)
            if log is not None:
                log(
                    f"epoch {epoch}: train loss {train['train/loss']:.4f}, valid loss "
                    f"{valid['loss']:.4f}, valid {stopping.metric} {stopping.score(valid):.4f}, "
                    f"{train.get('train/samples_per_s', 0):,.0f} samples/s"
                )
        if sync is not None:
            stopping = sync(stopping)
        if on_epoch is not None:
            on_epoch(epoch, stopping, record)
        if stopping.should_stop:
            break
    return stopping


def fit(
    model: RankingModel,
    train: ExampleTensors,
    valid: ExampleTensors,
    cfg: TrainingConfig,
    *,
    metric: str = "auc_mean",
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
) -> FitResult:
    """Train in this process with early stopping on ``metric`` (higher is better; ``loss``
    is minimised).

    Returns:
        the best epoch's validation metrics; the model holds the best epoch's weights.
    """
    gen = seed_everything(cfg.seed)
    prepare_for_training(model, cfg, next(model.parameters()).device)
    monitor = RouterMonitor.for_training(model.spec.domains, cfg)
    reviver = ExpertReviver.for_training(model, cfg)
    best: dict[str, Any] = {"state": None, "router": {}}
    started = time.perf_counter()
    # tables on FBGEMM's fused kernels while training (swapped back before the best
    # epoch's weights are restored: the state dict is the same either way)
    with fused_embeddings(model, cfg) as fused_opt:
        opt, schedule = make_optimizer(model, cfg, fused_opt)

        def train_epoch(epoch: int) -> dict[str, float]:
            monitor.reset()
            before = len(reviver.events)
            out = train_batches(
                lambda b: train_step(model, b, opt, monitor, reviver=reviver),
                train.batches(cfg.batch_size, shuffle=True, generator=gen),
                total=-(-len(train) // cfg.batch_size),
                desc=f"epoch {epoch}",
                progress=progress,
            )
            return out | revival_metrics(reviver, before)

        def keep(epoch: int, stopping: EarlyStopping, record: dict[str, float] | None) -> None:
            if stopping.best_epoch == epoch:
                best["state"] = copy.deepcopy(model.state_dict())
                best["router"] = monitor.metrics()
            if on_epoch is not None and record is not None:
                on_epoch(epoch, record)

        stopping = run_epochs(
            epochs=cfg.epochs,
            stopping=EarlyStopping(metric, cfg.early_stopping_patience),
            train_epoch=train_epoch,
            evaluate=lambda epoch: evaluate_model(model, valid)[0],
            schedule=schedule,
            on_epoch=keep,
            log=(lambda line: print(line, flush=True)) if progress else None,
        )
    model.train_dtype = None
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    seen = sum(h["train/samples"] for h in stopping.history)
    train_time = sum(h["train/seconds"] for h in stopping.history)
    return FitResult(
        stopping.best_epoch,
        stopping.best_valid(),
        stopping.history,
        best["router"],
        time.perf_counter() - started,
        seen / max(train_time, 1e-9),
        reviver.events,
    )


def train_extension(
    child: RankingModel,
    params: list[torch.nn.Parameter],
    train: ExampleTensors,
    valid: ExampleTensors,
    cfg: ExtendConfig,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a grown model's ``params`` (the new domain's) with Adam, early stopping on the
    new domain's validation ``auc_mean``. While only the newest extension trains, the
    parent's part of each row comes from an :class:`~recsys_moe.model.grow.ActivationCache`
    (same result, without the parent's experts in every step)."""
    from recsys_moe.model.grow import ActivationCache

    gen = seed_everything(cfg.seed)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    t0 = time.perf_counter()
    # where it starts is a candidate too: it equals the parent on these rows (a grown
    # domain) or the parent's unknown-domain treatment (a new one), and an extension that
    # only overfits must not end below it
    start_valid = evaluate_model(child, valid)[0]
    start_score = start_valid.get("auc_mean", -math.inf)
    start_state = {k: v.clone() for k, v in child.state_dict().items()}
    cache = ActivationCache.build(child, train, cfg.cache_gb)
    if progress:
        print(
            "extend: the parent's activations computed once and cached"
            if cache
            else "extend: training through the parent's experts every step",
            flush=True,
        )
    best: dict[str, Any] = {"state": None}

    def step(b: Any) -> float:
        child.train()
        opt.zero_grad(set_to_none=True)
        if cache is not None:  # b: row indices into the cache
            total = loss_of(child, cache.output(child, b), cache.labels[b])
        else:
            total = loss_of(child, child(b), b.labels)
        total.backward()
        opt.step()
        return float(total.detach())

    def train_epoch(epoch: int) -> dict[str, float]:
        if cache is not None:
            order = torch.randperm(len(train), generator=gen)
            batches: Iterable[Any] = order.split(cfg.batch_size)
        else:
            batches = train.batches(cfg.batch_size, shuffle=True, generator=gen)
        return train_batches(step, batches, total=-(-len(train) // cfg.batch_size),
                             desc=f"extend epoch {epoch}", progress=progress)  # fmt: skip

    def keep(epoch: int, stopping: EarlyStopping, record: dict[str, float] | None) -> None:
        if stopping.best_epoch == epoch:
            best["state"] = {k: v.clone() for k, v in child.state_dict().items()}

    stopping = run_epochs(
        epochs=cfg.epochs,
        stopping=EarlyStopping("auc_mean", cfg.early_stopping_patience),
        train_epoch=train_epoch,
        evaluate=lambda epoch: evaluate_model(child, valid)[0],
        schedule=LrSchedule([(opt, cfg.lr)], cfg.lr_decay),
        on_epoch=keep,
        log=(lambda line: print(f"extend {line}", flush=True)) if progress else None,
    )
    best_epoch = stopping.best_epoch
    if best["state"] is None or stopping.best <= start_score:
        best["state"], best_epoch = start_state, -1  # no epoch beat the start
    child.load_state_dict(best["state"])
    child.eval()
    return {
        "start_valid": start_valid,
        "best_epoch": best_epoch,
        "history": stopping.history,
        "seconds": time.perf_counter() - t0,
    }
