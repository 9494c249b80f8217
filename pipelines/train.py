"""``recsys-moe train``: train the ranking model on a feature store and evaluate it.

This is the single-process path (``--workers 1``): the loop from ``recsys_moe.train``
on the whole training split in memory, early stopping on validation, metrics per task
x domain on the test split (next to the generator's oracle AUC for synthetic data),
the model saved to ``<output>/`` as safetensors + config + manifest.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl
import torch

from features.store import load_manifest, read_examples
from recsys_moe import metrics as M
from recsys_moe.config import Config, load_config
from recsys_moe.model.inputs import ExampleTensors, InputSpec
from recsys_moe.model.ranker import RankingModel
from recsys_moe.train import evaluate_model, fit, save_model


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
    return M.evaluate(
        data.labels.numpy(),
        p,
        data.domain.numpy(),
        [(t.name, t.kind) for t in spec.tasks],
        spec.domains,
    )


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


def train_single(cfg: Config, output: str | Path, progress: bool = True) -> dict[str, Any]:
    """Fit, evaluate on test and save; returns a summary dict."""
    torch.set_num_threads(max(1, min(os.cpu_count() or 1, 4)))
    store = cfg.features.store_dir
    manifest = load_manifest(store)
    spec = InputSpec.from_manifest(manifest)
    train = ExampleTensors(spec, read_examples(store, "train"))
    valid = ExampleTensors(spec, read_examples(store, "valid"))
    test_df = read_examples(store, "test")
    test = ExampleTensors(spec, test_df)
    torch.manual_seed(cfg.training.seed)
    model = RankingModel(spec, cfg.model)
    started = time.perf_counter()
    res = fit(
        model,
        train,
        valid,
        cfg.training,
        metric=cfg.training.promote_metric.removeprefix("valid/"),
        progress=progress,
    )
    users = test_df[manifest["keys"]["user_id"]].to_numpy()
    test_metrics, _ = evaluate_model(model, test, users=users)
    oracle = oracle_metrics(cfg, test_df, test, spec)
    out = save_model(
        model, output, manifest, {"config": cfg.to_dict(), "valid": res.valid, "test": test_metrics}
    )
    summary = {
        "model_dir": str(Path(out).resolve()),
        "best_epoch": res.best_epoch,
        "train_rows": len(train),
        "seconds": round(time.perf_counter() - started, 1),
        "samples_per_s": round(res.samples_per_s),
        "valid": res.valid,
        "test": test_metrics,
        "oracle": oracle,
        "router": res.router,
    }
    (Path(out) / "metrics.json").write_text(json.dumps(summary, indent=2, default=float))
    print(table(spec, test_metrics, oracle), flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="recsys-moe train", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default.toml")
    ap.add_argument(
        "--workers",
        type=int,
        default=1,
        help="1 = single process (distributed training: see README)",
    )
    ap.add_argument("--output", default=None, help="model folder (default: models/<config name>)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    if args.workers != 1:
        print("recsys-moe train: only --workers 1 is available in this version", file=sys.stderr)
        return 2
    output = args.output or f"models/{cfg.name}"
    s = train_single(cfg, output, progress=not args.no_progress)
    print(
        f"trained in {s['seconds']}s ({s['samples_per_s']:,} samples/s), best epoch {s['best_epoch']}; "
        f"test auc_mean {s['test'].get('auc_mean', float('nan')):.4f}\nmodel: {s['model_dir']}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
