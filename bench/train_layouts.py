"""Training layouts: what ``recsys-moe train`` runs, epoch by epoch, in each worker layout.

    python -m bench.train_layouts [--config configs/sparse.toml] [--epochs 2]

Each layout trains the config's model through ``pipelines.train.fit_distributed`` (the
function ``recsys-moe train`` calls: Ray Train workers, the loop, validation and a
checkpoint every epoch), on the config's feature store (built if missing). Reported: the
training samples/s of the epochs as the workers time them (validation excluded), mean
over the epochs, and the ratio to the layout ``recsys-moe train`` used before this bench
(2 sharded workers streaming their rows from Ray Data). Results go to bench/RESULTS.md,
section "Training layouts"; ``training.workers = 0`` (the default) follows it.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile

import numpy as np

from bench.common import ensure_store, machine, write_section

# (label, workers, rows in memory)
LAYOUTS = [
    ("2 workers, tables and experts sharded, rows streamed (the former default)", 2, False),
    ("2 workers, tables and experts sharded, rows in memory", 2, True),
    ("1 worker, rows streamed", 1, False),
    ("default: one worker per node, nothing sharded, rows in memory", 0, True),
]


def layout_throughput(cfg, workers: int, in_memory: bool) -> tuple[float, int]:
    """Mean training samples/s over the epochs of one ``fit_distributed`` run, and the
    workers it ran (0 resolves to the default layout)."""
    from pipelines.train import default_workers, fit_distributed

    cfg = cfg.replace(training=dataclasses.replace(cfg.training, in_memory=in_memory,
                                                   early_stopping_patience=99))  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        _, stopping = fit_distributed(cfg, workers=workers, run_name=f"layout-{workers}",
                                      storage=tmp, progress=False)  # fmt: skip
    rates = [h["train/samples_per_s"] for h in stopping.history]
    return float(np.mean(rates)), workers or default_workers(cfg.training.use_gpu)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/sparse.toml")
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args(argv)
    from recsys_moe.config import load_config

    cfg = load_config(args.config, {"training.epochs": args.epochs})
    ensure_store(cfg)
    rows = []
    for label, workers, in_memory in LAYOUTS:
        rate, ran = layout_throughput(cfg, workers, in_memory)
        rows.append((label, ran, rate))
        print(f"{label}: {rate:,.0f} samples/s", flush=True)
    base = rows[0][2]
    m, t = cfg.model, cfg.training
    lines = [
        f"Machine: {machine()}. `python -m bench.train_layouts --config {args.config}`: "
        f"{m.arch}, {m.n_experts} experts {m.expert_hidden}, embedding {m.embedding_dim}, "
        f"precision `{t.precision}`, experts `{t.expert_impl}` while training, global batch "
        f"{t.batch_size}, {args.epochs} epochs each through `fit_distributed` (what "
        "`recsys-moe train` runs); training samples/s as the workers time their epochs, "
        "mean over the epochs.",
        "",
        "| layout | workers | train samples/s | vs the former default |",
        "|---|---:|---:|---:|",
        *(f"| {label} | {ran} | {rate:,.0f} | {rate / base:.2f}x |" for label, ran, rate in rows),
        "",
        "On one node the sharded layout pays collectives (the expert all-to-all, DDP's "
        "all-reduce, gloo) and splits the node's cores between workers whose OpenMP "
        "threads must sleep between regions so as not to stall each other; one worker "
        "holding its rows in memory, with every core and spinning threads, trains as a "
        "plain process does. Several nodes or GPUs: one worker each, sharded.",
    ]
    write_section("Training layouts (bench/train_layouts.py)", "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
