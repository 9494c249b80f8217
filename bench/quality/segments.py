"""Experts per user segment: what private experts for cold / casual / power users (and for
domains) do to each segment's AUC, on the dense default and the sparse config.

    python -m bench.quality.segments [--config configs/default.toml --config configs/sparse.toml]
        [--train-rows 400000]

Per config, the same model (the config's [model], MMoE) with ``model.expert_groups``:
none (the config's ``n_experts`` shared), ``["domain"]`` (STAR), ``["user_segment"]`` and
``["domain", "user_segment"]`` (``shared_experts`` + ``specific_experts`` per key value).
Same training rows (a seeded sample of the train split, at most ``--train-rows``), same
trainer (``fit``), seed and early stopping. Test AUC (mean over tasks) over all rows,
per user segment (point-in-time, as the store computes it) and for users never seen in
training. Writes bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import numpy as np

from bench.common import load_bench_config, machine, write_section

GROUPS = [[], ["domain"], ["user_segment"], ["domain", "user_segment"]]
SLICES = ["segment_cold", "segment_casual", "segment_power", "cold_user"]


def run(config: str, train_rows: int) -> str:
    import torch

    from features.store import load_manifest, read_examples
    from pipelines.train import slice_metrics
    from recsys_moe.model.inputs import ExampleTensors, InputSpec
    from recsys_moe.model.ranker import RankingModel
    from recsys_moe.training import evaluate_model, fit

    cfg = load_bench_config(config)
    store = cfg.features.store_dir
    if not os.path.exists(os.path.join(store, "manifest.json")):
        from pipelines.build_features import build_features

        build_features(cfg, progress=False)
    manifest = load_manifest(store)
    spec = InputSpec.from_manifest(manifest)
    train_df = read_examples(store, "train")
    train_df = train_df.sample(min(train_rows, train_df.height), seed=0)
    train = ExampleTensors(spec, train_df)
    valid = ExampleTensors(spec, read_examples(store, "valid"))
    test = ExampleTensors(spec, read_examples(store, "test"))
    tasks = spec.task_names
    rows, counts = [], {}
    for groups in GROUPS:
        mcfg = dataclasses.replace(cfg.model, arch="mmoe", expert_groups=groups)
        torch.manual_seed(cfg.training.seed)
        model = RankingModel(spec, mcfg)
        t0 = time.perf_counter()
        res = fit(model, train, valid, cfg.training, progress=False)
        seconds = time.perf_counter() - t0
        metrics, preds = evaluate_model(model, test)
        metrics |= slice_metrics(store, manifest, test, preds)
        row = {"groups": groups, "experts": model.experts.n_experts, "auc": metrics["auc_mean"],
               "epoch": res.best_epoch, "seconds": seconds}  # fmt: skip
        for s in SLICES:
            aucs = [metrics[f"{s}/{t}/auc"] for t in tasks if f"{s}/{t}/auc" in metrics]
            row[s] = float(np.mean(aucs)) if aucs else None
            counts[s] = int(metrics.get(f"{s}/n", 0))
        rows.append(row)
        print(f"{config} groups {groups}: {row['experts']} experts, test AUC {row['auc']:.4f}, "
              + ", ".join(f"{s} {row[s]:.4f}" for s in SLICES if row[s] is not None)
              + f", {seconds:.0f} s", flush=True)  # fmt: skip

    def val(x):
        return "-" if x is None else f"{x:.4f}"

    m = cfg.model
    lines = [
        f"Config `{config}`: {train.n:,} training rows (a seeded sample), {test.n:,} test rows "
        f"(cold {counts['segment_cold']:,}, casual {counts['segment_casual']:,}, power "
        f"{counts['segment_power']:,}; users never seen in training {counts['cold_user']:,}). "
        f"MMoE, experts {m.expert_hidden}, embedding {m.embedding_dim}; no groups: "
        f"{m.n_experts} shared experts; with groups: {m.shared_experts} shared + "
        f"{m.specific_experts} per key value. Test AUC, mean over tasks:",
        "",
        "| expert groups | experts | all | cold users | casual | power | never-seen users | "
        "best epoch | s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        name = " + ".join(r["groups"]) or "none (shared only)"
        lines.append(
            f"| {name} | {r['experts']} | {r['auc']:.4f} | {val(r['segment_cold'])} | "
            f"{val(r['segment_casual'])} | {val(r['segment_power'])} | {val(r['cold_user'])} | "
            f"{r['epoch']} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", action="append", default=None)
    ap.add_argument("--train-rows", type=int, default=400_000)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, min(os.cpu_count() or 1, 4)))
    configs = args.config or ["configs/default.toml", "configs/sparse.toml"]
    parts = [f"Machine: {machine()}.", ""]
    for c in configs:
        parts += [run(c, args.train_rows), ""]
    write_section("Quality: experts per user segment (bench/quality/segments.py)",
                  "\n".join(parts).rstrip())  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
