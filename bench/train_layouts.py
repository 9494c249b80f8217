"""Training layouts: what ``recsys-moe train`` runs, epoch by epoch, in each worker layout.

    python -m bench.train_layouts [--config configs/sparse.toml] [--epochs 2]
                                  [--model configs/default.toml ...]

Each layout trains the config's model through ``pipelines.train.fit_distributed`` (the
function ``recsys-moe train`` calls: Ray Train workers, the loop, validation and a
checkpoint every epoch), on the config's feature store (built if missing). Reported: the
training samples/s of the epochs as the workers time them (validation excluded), mean
over the epochs, and the ratio to the layout ``recsys-moe train`` used before this bench
(2 sharded workers streaming their rows from Ray Data). In the same run, on the same
store, batch and epochs: the ``[model]`` and ``[training]`` sections of every ``--model``
config in the default layout, and torch-rechub's MMoE (``bench.quality.peers``, one
process, the same threads), the library a user would otherwise pick. Results go to
bench/RESULTS.md, section "Training layouts"; ``training.workers = 0`` (the default)
follows it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile

import numpy as np

from bench.common import commit, ensure_store, machine, write_section

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


def rechub_throughput(cfg, threads: int) -> float:
    """torch-rechub's MMoE on the same store's rows, batch and epochs: its training
    epochs' samples/s (bench.quality.peers times them the same way)."""
    import torch

    from bench.quality.peers import run_peer
    from features.store import load_manifest, read_examples

    torch.set_num_threads(threads)
    store = cfg.features.store_dir
    splits = {s: read_examples(store, s) for s in ("train", "valid")}
    splits["test"] = splits["valid"]  # only its speed is read here
    with tempfile.TemporaryDirectory() as tmp:
        return float(run_peer("MMOE", load_manifest(store), splits, cfg, tmp)["samples_per_s"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/sparse.toml")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--model", action="append", default=["configs/default.toml"],
                    help="also train this config's [model] and [training] on --config's "
                    "store in the default layout")  # fmt: skip
    args = ap.parse_args(argv)
    from bench.quality.regimes import _sections
    from recsys_moe.config import load_config

    over = {"training.epochs": args.epochs}
    cfg = load_config(args.config, over)
    ensure_store(cfg)
    rows = []
    for label, workers, in_memory in LAYOUTS:
        rate, ran = layout_throughput(cfg, workers, in_memory)
        rows.append((label, ran, rate))
        print(f"{label}: {rate:,.0f} samples/s", flush=True)
    for path in dict.fromkeys(args.model):
        if path == args.config:
            continue
        other = load_config(args.config, {**_sections(path), **over})
        rate, ran = layout_throughput(other, 0, True)
        rows.append((f"default layout, the model and training of {path}", ran, rate))
        print(f"{path}: {rate:,.0f} samples/s", flush=True)
    threads = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    peer = rechub_throughput(cfg, threads)
    print(f"torch-rechub MMoE: {peer:,.0f} samples/s", flush=True)
    base = rows[0][2]
    m, t = cfg.model, cfg.training
    lines = [
        f"Machine: {machine()}. Commit {commit()}. `python -m bench.train_layouts --config "
        f"{args.config}`: {m.arch}, {m.n_experts} experts {m.expert_hidden}, embedding "
        f"{m.embedding_dim}, precision `{t.precision}`, experts `{t.expert_impl}` while "
        f"training, global batch {t.batch_size}, {args.epochs} epochs each through "
        "`fit_distributed` (what `recsys-moe train` runs); training samples/s as the "
        "workers time their epochs, mean over the epochs. torch-rechub's MMoE (embedding "
        f"16, 4 experts [64], towers [32], Adam) on the same rows, batch and epochs, one "
        f"process with {threads} threads, timed the same way, in the same run.",
        "",
        "| layout | workers | train samples/s | vs the former default | vs torch-rechub MMoE |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {label} | {ran} | {rate:,.0f} | {rate / base:.2f}x | {rate / peer:.2f}x |"
            for label, ran, rate in rows
        ),
        f"| torch-rechub MMoE | 1 | {peer:,.0f} | {peer / base:.2f}x | 1.00x |",
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
