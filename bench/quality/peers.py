"""The project's default model against the stock libraries users would otherwise pick,
trained in the same run on the same examples.

    python -m bench.quality.peers --config configs/sparse.toml [--config ...] [--seeds 3]

For each config: the feature store is built if missing; then, on the same train / valid
/ test split of the store and the same categorical and numeric features (every ``cat__``
and ``num__`` column, history features included; multi-valued features as mean-pooled
bags), on this machine's cores with the same batch size:

- **recsys-moe**: the config's model trained by what ``recsys-moe train`` runs
  (``pipelines.train.run_training``: Ray Train, the default worker layout, the config's
  [training] section, early stopping on validation; no registry), then the bundle it
  wrote scores the test rows;
- **recsys-moe as torch-rechub MMoE** (the peer reproduction; ``--no-as-rechub`` skips
  it): the same path with :func:`as_rechub_mmoe`, the project's model made torch-rechub's
  MMoE, which must land within the seed spread of torch-rechub's own;
- **torch-rechub 0.9** (the ``peers`` extra): its MMoE, PLE and SharedBottom, one head per
  task, trained by its own ``MTLTrainer`` (Adam lr 1e-3, weight decay 1e-5, early
  stopping on the first task's validation AUC, earlystop_patience 1, at most the
  config's epochs).

Each model trains ``--seeds`` times (recsys-moe: ``training.seed`` + i; torch-rechub:
``torch.manual_seed(i)``, before the model is built). Reported: test AUC per task x domain for every model, mean ±
standard deviation over the seeds (the same metric code,
``recsys_moe.metrics.evaluate``), cold-start slices (rows whose user / item is not in the
training vocabulary) and per user segment, train samples/s (the training epochs only),
wall time; the oracle's AUC for synthetic data. Written to ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from bench.common import ensure_store, load_bench_config, machine, write_section
from pipelines.cli import parse_sets
from recsys_moe.config import Config
from recsys_moe.metrics import evaluate

PEERS = ("MMOE", "PLE", "SharedBottom")

# recsys-moe made torch-rechub's MMoE (the peer reproduction): the same inputs (the store's
# columns, no crosses), embedding 16 started N(0, 1e-4), 4 experts [64] with BatchNorm
# before their ReLU, one softmax gate per task with BatchNorm on its logits, towers [32]
# with BatchNorm, Adam 1e-3 on tables and dense weights, stopping at the first epoch
# without a better validation AUC of the first task and keeping the best epoch, every
# task its own tower, probability and loss (no funnel product). Weight decay:
# torch-rechub's trainer averages the task losses where recsys-moe sums them, so its 1e-5
# is T x 1e-5 here (:func:`as_rechub_mmoe`; Adam's step does not change when the loss is
# scaled, the decay's share of the gradient does).
# torch-rechub's MMoE without the experts' BatchNorm lost 0.0024 / 0.0052 AUC on the sparse
# config, with the tasks' losses summed 0.0025 / 0.0025 (3 seeds each, 2026-12-07)
AS_RECHUB_MMOE = {
    "model.arch": "mmoe",
    "model.embedding_dim": 16,
    "model.embedding_init_std": 1e-4,
    "model.n_experts": 4,
    "model.expert_hidden": [64],
    "model.tower_hidden": [32],
    "model.tower_norm": "batch",
    "model.gate_norm": "batch",
    "model.expert_norm": "batch",
    "model.funnel": "independent",
    "model.interactions": [],
    "model.input_norm": "none",
    "model.gates": "task",
    "model.gate_by_domain": False,
    "model.routing": "softmax",
    "model.expert_groups": [],
    "model.dropout": 0.0,
    "model.id_dropout": 0.0,
    "model.aux_loss_coef": 0.0,
    "model.z_loss_coef": 0.0,
    "training.embedding_optimizer": "adam",
    "training.embedding_lr": 1e-3,
    "training.lr": 1e-3,
    "training.lr_decay": 1.0,
    # torch-rechub's earlystop_patience=1 stops at the first epoch without a better
    # validation AUC; recsys-moe's patience counts the epochs it lets pass
    "training.early_stopping_patience": 0,
    "training.revive_after_steps": 0,
}
AS_RECHUB = "recsys-moe as torch-rechub MMoE"
RECHUB_WEIGHT_DECAY = 1e-5


def as_rechub_mmoe(cfg: Config) -> dict:
    """:data:`AS_RECHUB_MMOE` for ``cfg``'s tasks: the weight decay of torch-rechub's mean
    task loss on recsys-moe's summed one, and its early-stopping metric."""
    decay = RECHUB_WEIGHT_DECAY * len(cfg.data.tasks)
    return {
        **AS_RECHUB_MMOE,
        "training.weight_decay": decay,
        "training.embedding_weight_decay": decay,
        # torch-rechub keeps the epoch with the best validation AUC of the first task
        "training.promote_metric": f"valid/{cfg.data.tasks[0].name}/all/auc",
    }


# ------------------------------------------------------------------ torch-rechub


def _rechub_inputs(manifest: dict, df: pl.DataFrame) -> tuple[dict[str, torch.Tensor], Any]:
    """The store's encoded columns as torch-rechub's input dict, and its feature objects."""
    from torch_rechub.basic.features import DenseFeature, SequenceFeature, SparseFeature

    x, feats = {}, []
    for f in manifest["features"]["categorical"]:
        col = df[f["column"]]
        if f["multi_valued"]:
            width = max(1, int(col.list.len().max() or 1))
            padded = col.list.concat(pl.lit([0] * width, dtype=pl.List(pl.Int32))).list.head(width)
            x[f["name"]] = torch.tensor(np.stack(padded.to_numpy()), dtype=torch.long)
            feats.append(SequenceFeature(f["name"], f["vocab_size"], embed_dim=16,
                                         pooling="mean", padding_idx=0))  # fmt: skip
        else:
            x[f["name"]] = torch.from_numpy(col.to_numpy().astype(np.int64))
            feats.append(SparseFeature(f["name"], f["vocab_size"], embed_dim=16))
    for f in manifest["features"]["numeric"]:
        v = (df[f["column"]].to_numpy().astype(np.float32) - f["mean"]) / f["std"]
        x[f["name"]] = torch.from_numpy(v)
        feats.append(DenseFeature(f["name"]))
    return x, feats


class _Rows(torch.utils.data.Dataset):
    def __init__(self, x: dict[str, torch.Tensor], y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.x.items()}, self.y[i]


def _loader(x, y, batch: int, shuffle: bool):
    """Batches sliced from whole tensors (torch-rechub's trainer takes any loader of
    (dict, labels)); no per-row Python, so the comparison measures the training loops."""

    class Batches:
        def __init__(self) -> None:
            self.n = len(y)

        def __len__(self) -> int:
            return -(-self.n // batch)

        def __iter__(self):
            order = torch.randperm(self.n) if shuffle else torch.arange(self.n)
            for s in range(0, self.n, batch):
                idx = order[s : s + batch]
                yield {k: v[idx] for k, v in x.items()}, y[idx]

    return Batches()


def run_peer(name: str, manifest: dict, splits: dict[str, pl.DataFrame], cfg: Config,
             out: Path, seed: int = 0) -> dict[str, Any]:  # fmt: skip
    import torch_rechub.models.multi_task as mt
    from torch_rechub.trainers import MTLTrainer

    tasks = [t["name"] for t in manifest["tasks"]]
    data = {}
    for split, df in splits.items():
        x, feats = _rechub_inputs(manifest, df)
        y = torch.from_numpy(
            np.stack([df[t["column"]].to_numpy() for t in manifest["tasks"]], 1).astype(np.float32)
        )
        data[split] = (x, y)
    kinds = ["classification"] * len(tasks)
    towers = [{"dims": [32]} for _ in tasks]
    expert = {"dims": [64]}
    # the seed sets the initial weights too (not only the shuffles): a run repeats
    torch.manual_seed(seed)
    if name == "MMOE":
        model = mt.MMOE(feats, kinds, n_expert=4, expert_params=expert, tower_params_list=towers)
    elif name == "PLE":
        model = mt.PLE(feats, kinds, n_level=1, n_expert_specific=2, n_expert_shared=2,
                       expert_params=expert, tower_params_list=towers)  # fmt: skip
    else:
        model = mt.SharedBottom(feats, kinds, bottom_params={"dims": [64]},
                                tower_params_list=towers)  # fmt: skip
    torch.manual_seed(seed)
    B = cfg.training.batch_size
    trainer = MTLTrainer(model, kinds,
                         optimizer_params={"lr": 1e-3, "weight_decay": RECHUB_WEIGHT_DECAY},
                         n_epoch=cfg.training.epochs, earlystop_patience=1,
                         model_path=str(out))  # fmt: skip
    train_seconds: list[float] = []
    one_epoch = trainer.train_one_epoch

    def timed(loader):
        t = time.perf_counter()
        res = one_epoch(loader)
        train_seconds.append(time.perf_counter() - t)
        return res

    trainer.train_one_epoch = timed
    t0 = time.perf_counter()
    trainer.fit(_loader(*data["train"], B, True), _loader(*data["valid"], 8192, False))
    wall = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        preds = torch.cat([model(x) for x, _ in _loader(*data["test"], 8192, False)]).numpy()
    n = len(data["train"][1])
    return {"preds": preds, "samples_per_s": n * len(train_seconds) / sum(train_seconds),
            "epochs": len(train_seconds), "wall": wall}  # fmt: skip


# ------------------------------------------------------------------ recsys-moe


def run_project(cfg: Config, splits: dict[str, pl.DataFrame], tag: str = "") -> dict[str, Any]:
    """The config's model trained by what ``recsys-moe train`` runs (Ray Train, the
    default worker layout; no registry), then the bundle it wrote scores the test rows."""
    from bench.quality.common import train_as_cli
    from recsys_moe.bundle import load_model
    from recsys_moe.model.inputs import ExampleTensors
    from recsys_moe.training import predict

    out = Path("bench/out/peers") / cfg.name / f"recsys-moe{tag}-seed{cfg.training.seed}"
    s = train_as_cli(cfg, out, progress=False)
    model, _ = load_model(s["model_dir"])
    preds = predict(model, ExampleTensors(model.spec, splits["test"]))
    return {"preds": preds, "samples_per_s": s["samples_per_s"], "epochs": s["epochs_run"],
            "wall": s["seconds"]}  # fmt: skip


# ------------------------------------------------------------------ report


def _slices(manifest: dict, store: str, test: pl.DataFrame) -> dict[str, np.ndarray]:
    from pipelines.train import store_slices
    from recsys_moe.model.inputs import ExampleTensors, InputSpec

    return store_slices(store, manifest, ExampleTensors(InputSpec.from_manifest(manifest), test))


@dataclasses.dataclass
class Measured:
    """One config's models over seeds: test metrics (mean and seed spread), speed."""

    cfg: Config
    manifest: dict
    res: dict[str, dict[str, float]]  # model -> metric -> mean over seeds
    spread: dict[str, dict[str, float]]  # model -> metric -> std over seeds
    speed: dict[str, dict[str, float]]  # model -> samples_per_s / epochs / wall (means)
    masks: dict[str, np.ndarray]
    oracle: dict[str, float] | None
    n_train: int


def measure(
    cfg: Config,
    variants: dict[str, Config],
    peers: tuple[str, ...] = PEERS,
    seeds: int = 1,
    threads: int = 2,
) -> Measured:
    """Train every recsys-moe variant (a config each, on ``cfg``'s store) and every
    torch-rechub peer ``seeds`` times; score the store's test rows with each."""
    from features.store import load_manifest, read_examples
    from pipelines.train import oracle_metrics
    from recsys_moe.model.inputs import ExampleTensors, InputSpec

    torch.set_num_threads(threads)
    ensure_store(cfg)
    store = cfg.features.store_dir
    manifest = load_manifest(store)
    splits = {s: read_examples(store, s) for s in ("train", "valid", "test")}
    test = splits["test"]
    spec = InputSpec.from_manifest(manifest)
    labels = np.stack([test[t["column"]].to_numpy() for t in manifest["tasks"]], 1)
    domains = test[spec.domain_column].to_numpy()
    tasks = [(t["name"], t["kind"]) for t in manifest["tasks"]]
    out = Path("bench/out/peers") / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    masks = _slices(manifest, store, test)
    per_seed: dict[str, list[dict[str, float]]] = {}
    runs: dict[str, list[dict[str, Any]]] = {}
    for seed in range(seeds):
        who_runs = {}
        for i, (who, vcfg) in enumerate(variants.items()):
            print(f"[peers] {cfg.name} seed {seed}: {who} ...", flush=True)
            vcfg = vcfg.replace(
                training=dataclasses.replace(vcfg.training, seed=vcfg.training.seed + seed)
            )
            who_runs[who] = run_project(vcfg, splits, f"-v{i}" if i else "")
        for name in peers:
            print(f"[peers] {cfg.name} seed {seed}: torch-rechub {name} ...", flush=True)
            who_runs[f"torch-rechub {name}"] = run_peer(name, manifest, splits, cfg, out, seed)
        for who, r in who_runs.items():
            m = evaluate(labels, r["preds"], domains, tasks, manifest["domains"])
            for sl, mask in masks.items():
                if mask.any():
                    sub = evaluate(labels[mask], r["preds"][mask], domains[mask], tasks,
                                   manifest["domains"])  # fmt: skip
                    m |= {f"{sl}:{k}": v for k, v in sub.items() if k.endswith("/all/auc")}
            per_seed.setdefault(who, []).append(m)
            runs.setdefault(who, []).append(r)
    speed = {who: {k: float(np.mean([r[k] for r in rs])) for k in ("samples_per_s", "epochs",
                                                                  "wall")}
             for who, rs in runs.items()}  # fmt: skip
    oracle = None
    if cfg.source.kind == "synthetic":
        oracle = oracle_metrics(cfg, test, ExampleTensors(spec, test), spec)
    return Measured(
        cfg, manifest,
        res={who: _mean(ms) for who, ms in per_seed.items()},
        spread={who: _std(ms) for who, ms in per_seed.items()},
        speed=speed, masks=masks, oracle=oracle, n_train=len(splits["train"]),
    )  # fmt: skip


def compare(
    config: str,
    threads: int,
    overrides: dict | None = None,
    peers: tuple[str, ...] = PEERS,
    seeds: int = 1,
    as_rechub: bool = True,
) -> str:
    cfg = load_bench_config(config, overrides)
    variants = {"recsys-moe": cfg}
    if as_rechub:
        variants[AS_RECHUB] = load_bench_config(
            config, {**(overrides or {}), **as_rechub_mmoe(cfg)}
        )
    m = measure(cfg, variants, peers, seeds, threads)
    return report(cfg, m.manifest, m.speed, m.res, m.spread, m.oracle, m.masks, threads,
                  m.n_train, seeds)  # fmt: skip


def _mean(ms: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([m[k] for m in ms if k in m])) for k in ms[0]}


def _std(ms: list[dict[str, float]]) -> dict[str, float]:
    """The seed spread of each metric: its standard deviation over the seeds."""
    return {k: float(np.std([m[k] for m in ms if k in m])) for k in ms[0]}


def report(cfg, manifest, runs, res, spread, oracle, masks, threads, n_train, seeds) -> str:
    """Markdown: AUC per task x domain (mean ± std over ``seeds``), slices, throughput."""
    names = list(runs)
    peers = [n for n in names if not n.startswith("recsys-moe")]
    head = "| task | domain | " + " | ".join(names) + (" | oracle |" if oracle else " |")
    lines = [head, "|---|---|" + "---:|" * (len(names) + (1 if oracle else 0))]
    verdict = []
    for t in manifest["tasks"]:
        for d in [*manifest["domains"], "all"]:
            key = f"{t['name']}/{d}/auc"
            cells = [_cell(res[n], spread[n], key, seeds) for n in names]
            o = f" {oracle.get(key, float('nan')):.4f} |" if oracle else ""
            lines.append(f"| {t['name']} | {d} | " + " | ".join(cells) + " |" + o)
            best = max(peers, key=lambda n: res[n].get(key, -1.0), default=None)
            nan = float("nan")
            margin = res["recsys-moe"].get(key, nan) - (res[best].get(key, nan) if best else nan)
            # above the best peer by more than its seed spread (0 with one seed)
            clear = margin - (spread[best].get(key, 0.0) if best else nan)
            verdict.append((t["name"], d, margin, clear))
    seg_lines = ["| slice (rows) | task | " + " | ".join(names) + " |",
                 "|---|---|" + "---:|" * len(names)]  # fmt: skip
    for sl, mask in masks.items():
        for t in manifest["tasks"]:
            key = f"{sl}:{t['name']}/all/auc"
            cells = [f"{res[n].get(key, float('nan')):.4f}" for n in names]
            seg_lines.append(
                f"| {sl} ({int(mask.sum()):,}) | {t['name']} | " + " | ".join(cells) + " |"
            )
    speed = ["| model | train samples/s | epochs | wall s |", "|---|---:|---:|---:|"]
    for n in names:
        r = runs[n]
        speed.append(f"| {n} | {r['samples_per_s']:,.0f} | {r['epochs']} | {r['wall']:.0f} |")
    mmoe = runs.get("torch-rechub MMOE", runs["recsys-moe"])
    ratio = runs["recsys-moe"]["samples_per_s"] / mmoe["samples_per_s"]
    overall = [m for t, d, m, _ in verdict if d == "all"]
    clear = [c for t, d, m, c in verdict if d == "all"]
    per_domain = [m for t, d, m, _ in verdict if d != "all"]
    gap = ""
    if oracle:
        gaps = [
            oracle[k] - res["recsys-moe"][k]
            for k in oracle
            if k.endswith("/auc") and k in res["recsys-moe"]
        ]
        gap = f" Largest gap to the oracle: {max(gaps):.4f}."
    repro = ""
    if AS_RECHUB in res and "torch-rechub MMOE" in res:
        cells = []
        for t in manifest["tasks"]:
            key = f"{t['name']}/all/auc"
            d = res[AS_RECHUB][key] - res["torch-rechub MMOE"][key]
            sp = max(spread[AS_RECHUB].get(key, 0.0), spread["torch-rechub MMOE"].get(key, 0.0))
            cells.append(f"{t['name']} {d:+.4f} (spread {sp:.4f})")
        repro = (
            f" Peer reproduction ({AS_RECHUB} minus torch-rechub MMoE, overall): "
            + ", ".join(cells)
            + "."
        )
    summary = (
        "recsys-moe minus the best torch-rechub model, overall per task: "
        + ", ".join(f"{m:+.4f}" for m in overall)
        + "; minus that model's seed spread: "
        + ", ".join(f"{c:+.4f}" for c in clear)
        + f"; per task x domain: min {min(per_domain):+.4f}.{gap} Training samples/s "
        f"{ratio:.2f}x torch-rechub MMoE." + repro
    )
    body = "\n".join([
        f"Machine: {machine()}. Config `{cfg.name}`: {n_train:,} training rows; {seeds} seed(s), "
        "AUC as mean ± std over them; torch-rechub's torch threads "
        f"{threads}; batch {cfg.training.batch_size}. recsys-moe: trained by `recsys-moe "
        f"train`'s own function (Ray Train, the default worker layout), `{cfg.model.arch}`, "
        f"{cfg.model.n_experts} experts {cfg.model.expert_hidden}, embedding {cfg.model.embedding_dim}, "
        f"crosses {cfg.model.interactions or 'none'}; torch-rechub 0.9: embedding 16, experts [64], "
        "towers [32], Adam 1e-3.",
        "", summary, "", *lines, "",
        *(["Cold-start and segment slices (test AUC over all domains):", "", *seg_lines, ""]
          if len(seg_lines) > 2 else []),
        "Training throughput (the training epochs only, same cores and batch):", "", *speed,
    ])  # fmt: skip
    return body


def _cell(res: dict[str, float], spread: dict[str, float], key: str, seeds: int) -> str:
    v = res.get(key, float("nan"))
    return f"{v:.4f} ± {spread.get(key, 0.0):.4f}" if seeds > 1 else f"{v:.4f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", action="append", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="config override for recsys-moe (a trial: results are not written)",
    )
    ap.add_argument("--no-peers", action="store_true", help="recsys-moe only (a trial)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per model (mean ± std)")
    ap.add_argument(
        "--no-as-rechub",
        action="store_true",
        help=f"skip '{AS_RECHUB}' (the project's model with torch-rechub's MMoE settings)",
    )
    args = ap.parse_args(argv)
    overrides = parse_sets(args.set)
    trial = bool(overrides) or args.no_peers
    for config in args.config or ["configs/sparse.toml"]:
        body = compare(config, args.threads, overrides, () if args.no_peers else PEERS, args.seeds,
                       as_rechub=not args.no_as_rechub)  # fmt: skip
        print(body, flush=True)
        if not trial:
            write_section(
                f"Quality: against torch-rechub on {Path(config).stem} (bench/quality/peers.py)",
                body,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
