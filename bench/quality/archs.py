"""Architecture comparison on a config's feature store: every architecture's test AUC per
task x domain, next to the generator's oracle AUC when the data is synthetic.

    python -m bench.quality.archs --config configs/default.toml [--archs shared_bottom mmoe ple star]
    python -m bench.quality.archs --config configs/census.toml --archs shared_bottom mmoe ple

Builds the raw log and the feature store if they are missing (Ray), then trains each
architecture with the config's [model] and [training] sections (single process).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from bench.common import load_bench_config, machine, write_section

OUT = Path(__file__).resolve().parent.parent / "out" / "quality"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default.toml")
    ap.add_argument("--archs", nargs="+", default=["shared_bottom", "mmoe", "ple", "star"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--note", default="")
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="report from each run's saved metrics.json under bench/out instead of training",
    )
    args = ap.parse_args()

    from bench.quality.common import train_as_cli
    from pipelines.build_features import build_features
    from pipelines.generate import raw_log_is_current, run_generate

    cfg = load_bench_config(args.config)
    fresh = not raw_log_is_current(cfg)
    if fresh:
        run_generate(cfg, progress=False)
    if fresh or not (Path(cfg.features.store_dir) / "manifest.json").exists():
        build_features(cfg, progress=False)
        import ray

        ray.shutdown()
    results: dict[str, list[dict]] = {}
    oracle = None
    t0 = time.perf_counter()
    train_seconds = 0.0  # --reuse: the saved runs' training time
    for arch in args.archs:
        for seed in args.seeds:
            c = cfg.replace(
                model=dataclasses.replace(cfg.model, arch=arch),
                training=dataclasses.replace(cfg.training, seed=seed),
            )
            out = OUT / cfg.name / f"{arch}_s{seed}"
            if args.reuse:
                s = json.loads((out / "metrics.json").read_text())
                train_seconds += s["seconds"]
            else:
                print(f"== {arch} seed {seed}", flush=True)
                s = train_as_cli(c, out, progress=False)
            results.setdefault(arch, []).append(s)
            oracle = s["oracle"] or oracle
    first = next(iter(results.values()))[0]
    tasks = [k.split("/")[0] for k in first["test"] if k.endswith("/all/auc")]
    # "<task>/<domain>/auc" (slice metrics are "<slice>/<task>/auc")
    domains = sorted(
        {k.split("/")[1] for k in first["test"] if k.endswith("/auc") and k.split("/")[0] in tasks}
        - {"all", "oov"}
    )
    rows = []
    head = "| task | domain | " + " | ".join(args.archs) + (" | oracle |" if oracle else " |")
    rows += [head, "|---|---|" + "---:|" * (len(args.archs) + (1 if oracle else 0))]
    for t in tasks:
        for d in [*domains, "all"]:
            key = f"{t}/{d}/auc"
            cells = []
            for a in args.archs:
                vals = [r["test"].get(key, float("nan")) for r in results[a]]
                cells.append(f"{np.mean(vals):.4f}")
            o = f" | {oracle[key]:.4f}" if oracle and key in oracle else ""
            rows.append(f"| {t} | {d} | " + " | ".join(cells) + o + " |")
    worst = {
        a: np.mean(
            [
                min(
                    r["test"][f"{t}/{d}/auc"]
                    for t in tasks
                    for d in domains
                    if f"{t}/{d}/auc" in r["test"]
                )
                for r in results[a]
            ]
        )
        for a in args.archs
    }
    rows += [
        "",
        "Worst task x domain test AUC: "
        + ", ".join(f"{a} {v:.4f}" for a, v in worst.items())
        + ".",
    ]
    if oracle:
        gaps = {
            a: max(
                oracle[f"{t}/{d}/auc"] - np.mean([r["test"][f"{t}/{d}/auc"] for r in results[a]])
                for t in tasks
                for d in domains
            )
            for a in args.archs
        }
        rows.append(
            "Largest gap to the oracle over task x domain: "
            + ", ".join(f"{a} {v:.4f}" for a, v in gaps.items())
            + "."
        )
    m, tr = cfg.model, cfg.training
    intro = [
        f"Machine: {machine()}. Config `{args.config}`; seeds {args.seeds}; {train_seconds or time.perf_counter() - t0:.0f} s in all.",
        f"Data: {first['train_rows']:,} training rows (time split; test = last {cfg.features.test_fraction:.0%}). "
        f"Training: up to {tr.epochs} epochs (early stopping on validation {tr.promote_metric}), batch {tr.batch_size}, "
        f"Adam lr {tr.lr}, tables {tr.embedding_optimizer} {tr.embedding_lr}, x{tr.lr_decay} per epoch, precision {tr.precision}. Model: embedding dim {m.embedding_dim}, experts {m.expert_hidden}, "
        f"{m.n_experts} experts (MMoE), {m.shared_experts} shared + {m.specific_experts} specific (PLE/STAR), "
        f"interactions {m.interactions or 'none'}, routing {m.routing}. Metric: test AUC.",
    ]
    if args.note:
        intro.append(args.note)
    write_section(
        f"Quality: architectures on {cfg.name} (bench/quality/archs.py)",
        "\n".join([*intro, "", *rows]),
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
