"""The single-process training loop (a function, not a method of the model) and model
files: ``save_model`` / ``load_model`` (safetensors weights + config + manifest).

Distributed training (pipelines/train) reuses :func:`train_step`, :func:`evaluate_model`
and the early-stopping logic here.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

from recsys_moe import metrics as M
from recsys_moe.config import ModelConfig, TrainingConfig
from recsys_moe.model.inputs import ExampleTensors, InputSpec
from recsys_moe.model.observe import RouterMonitor
from recsys_moe.model.ranker import Extension, RankingModel, task_losses


@dataclass
class FitResult:
    """What :func:`fit` returns: the best epoch's validation metrics and the history."""

    best_epoch: int
    valid: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    router: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    samples_per_s: float = 0.0


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
    return cls, kw


EMBEDDING_EPS = 1e-8


def dense_optimizer(params, cfg: TrainingConfig) -> torch.optim.Optimizer:
    """Adam, as one fused kernel over every parameter (CPU and CUDA) instead of a few
    ops per parameter tensor."""
    params = list(params)
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


def make_optimizer(
    model: RankingModel, cfg: TrainingConfig, fused: torch.optim.Optimizer | None = None
) -> CombinedOptimizer:
    """Adam for dense parameters; the embedding optimiser of ``cfg`` for the tables, or
    ``fused``: the tables' optimiser already inside their backward (:func:`fused_embeddings`),
    added so that zero_grad, learning rates and state reach it too."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    emb = {n: p for n, p in named if n.startswith("embedding.")}
    rest = {n: p for n, p in named if not n.startswith("embedding.")}
    cls, kw = embedding_optimizer(cfg)
    parts = [KeyedOptimizerWrapper(rest, lambda ps: dense_optimizer(ps, cfg))]
    if fused is not None:
        parts.append(fused)
    elif emb:
        parts.append(KeyedOptimizerWrapper(emb, lambda ps: cls(ps, **kw)))
    return CombinedOptimizer(parts)


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
        else device.type == "cpu" and torch.cpu._is_amx_tile_supported()
    )
    return torch.bfloat16 if native else None


@contextmanager
def fused_embeddings(model: RankingModel, cfg: TrainingConfig) -> Iterator[Any]:
    """Single-process training on torchrec's ``FusedEmbeddingBagCollection``: all tables in
    FBGEMM's table-batched kernels with the optimiser update fused into the backward (no
    table gradients, no separate step); 2x the per-table ``nn.EmbeddingBag`` step at batch
    4096 (bench/kernels.py). Yields its optimiser (None where FBGEMM has no fused kernel
    for ``cfg.embedding_optimizer`` on the device, or the tables are frozen: the model is
    left as it is). On exit the plain collection is back, holding the trained weights."""
    from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection

    ebc = model.embedding.ebc
    weights = list(ebc.parameters())
    device = weights[0].device
    if (
        not all(p.requires_grad for p in weights)
        or device.type not in ("cpu", "cuda")
        or (device.type == "cpu" and cfg.embedding_optimizer not in _FUSED_ON_CPU)
    ):
        yield None
        return
    cls, kw = embedding_optimizer(cfg)
    fused = FusedEmbeddingBagCollection(
        tables=ebc.embedding_bag_configs(), optimizer_type=cls, optimizer_kwargs=kw,
        device=device,
    )  # fmt: skip
    fused.load_state_dict(ebc.state_dict())
    model.embedding.ebc = fused
    try:
        yield fused.fused_optimizer()
    finally:
        ebc.load_state_dict(fused.state_dict())
        model.embedding.ebc = ebc


def loss_of(model: RankingModel, out, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Total loss (weighted tasks + aux + z) and the per-task losses (T,)."""
    per_task = task_losses(model, out, labels)
    w = torch.tensor([t.weight for t in model.spec.tasks])
    total = (
        (per_task * w).sum()
        + model.cfg.aux_loss_coef * out.aux_loss
        + model.cfg.z_loss_coef * out.z_loss
    )
    return total, per_task


def train_step(
    model: RankingModel,
    batch,
    optimizer: torch.optim.Optimizer,
    monitor: RouterMonitor | None = None,
) -> float:
    model.train()
    optimizer.zero_grad(set_to_none=True)
    out = model(batch)
    total, _ = loss_of(model, out, batch.labels)
    total.backward()
    optimizer.step()
    if monitor is not None:
        monitor.update(out, batch.domain)
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
    weights = torch.tensor([t.weight for t in model.spec.tasks])
    for b in data.batches(batch_size):
        out = model(b)
        if monitor is not None:
            monitor.update(out, b.domain)
        if b.labels is not None:
            loss_sum += float((task_losses(model, out, b.labels) * weights).sum()) * len(b)
        outs.append(out.preds)
    preds = torch.cat(outs).numpy() if outs else np.zeros((0, len(weights)), dtype=np.float32)
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
    """Train with early stopping on ``metric`` (higher is better; ``loss`` is minimised).

    Returns:
        the best epoch's validation metrics; the model holds the best epoch's weights.
    """
    from tqdm import tqdm

    gen = seed_everything(cfg.seed)
    prepare_for_training(model, cfg, next(model.parameters()).device)
    # tables on FBGEMM's fused kernels while training (swapped back before the best
    # epoch's weights are restored: the state dict is the same either way)
    with fused_embeddings(model, cfg) as fused_opt:
        opt = make_optimizer(model, cfg, fused_opt)
        monitor = RouterMonitor(model.spec.domains)
        best, best_state, best_epoch, bad = -float("inf"), None, -1, 0
        history: list[dict[str, float]] = []
        sign = -1.0 if metric == "loss" else 1.0
        started = time.perf_counter()
        seen = 0
        train_time = 0.0
        for epoch in range(cfg.epochs):
            monitor.reset()
            losses = []
            t0 = time.perf_counter()
            n_batches = (len(train) + cfg.batch_size - 1) // cfg.batch_size
            bar = tqdm(
                train.batches(cfg.batch_size, shuffle=True, generator=gen),
                total=n_batches,
                desc=f"epoch {epoch}",
                disable=not progress,
                leave=False,
            )
            for b in bar:
                losses.append(train_step(model, b, opt, monitor))
                seen += len(b)
                if len(losses) % 20 == 0:
                    bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
            train_time += time.perf_counter() - t0
            for group in opt.param_groups:
                group["lr"] *= cfg.lr_decay
            val, _ = evaluate_model(model, valid)
            rec = {
                "epoch": float(epoch),
                "train/loss": float(np.mean(losses)),
                **{f"valid/{k}": v for k, v in val.items()},
            }
            history.append(rec)
            if on_epoch is not None:
                on_epoch(epoch, rec)
            score = sign * val.get(metric, -val["loss"])
            if progress:
                print(
                    f"epoch {epoch}: train loss {rec['train/loss']:.4f}, valid loss {val['loss']:.4f}, valid {metric} {val.get(metric, float('nan')):.4f}",
                    flush=True,
                )
            if score > best:
                best, best_state, best_epoch, bad = (
                    score,
                    copy.deepcopy(model.state_dict()),
                    epoch,
                    0,
                )
                router = monitor.metrics()
            else:
                bad += 1
                if bad > cfg.early_stopping_patience:
                    break
    model.train_dtype = None
    if best_state is not None:
        model.load_state_dict(best_state)
    valid_best = {
        k.removeprefix("valid/"): v
        for k, v in history[best_epoch].items()
        if k.startswith("valid/")
    }
    return FitResult(
        best_epoch,
        valid_best,
        history,
        router,
        time.perf_counter() - started,
        seen / max(train_time, 1e-9),
    )


# ------------------------------------------------------------------ model files

WEIGHTS, META = "model.safetensors", "model.json"


def save_model(
    model: RankingModel,
    path: str | Path,
    manifest: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model.safetensors`` (weights) and ``model.json`` (model config + manifest)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS))
    meta = {
        "model_config": asdict(model.cfg),
        "manifest": manifest,
        "extensions": [asdict(e) for e in model.extension_specs],
        **(extra or {}),
    }
    (out / META).write_text(json.dumps(meta, indent=2, default=str))
    return out


def load_model(path: str | Path) -> tuple[RankingModel, dict[str, Any]]:
    """Rebuild a model saved by :func:`save_model` (tensors only: no pickled code runs)."""
    p = Path(path)
    meta = json.loads((p / META).read_text())
    model = RankingModel(
        InputSpec.from_manifest(meta["manifest"]),
        ModelConfig(**meta["model_config"]),
        extensions=[
            Extension(e["domain"], int(e["experts"]), tuple(e["reach"]), bool(e.get("cross")))
            for e in meta.get("extensions", [])
        ],
    )
    model.load_state_dict(load_file(str(p / WEIGHTS)))
    model.eval()
    return model, meta
