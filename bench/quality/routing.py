"""Routing health: what the load-balancing loss, the router z-loss and dead-expert
revival do to sparse routing on the default data, measured.

    python -m bench.quality.routing [--config configs/default.toml] [--train-rows 400000]

MMoE with the config's experts, top-1 and top-2 routing (capacity factor as configured,
tokens over capacity dropped in training), each with the regularisers off
(``aux_loss_coef = z_loss_coef = 0``) and at typical values (Switch Transformer's 0.01
and ST-MoE's 0.001), and with dead-expert revival; then a collapse run (every gate
starts on one expert) without treatment, with revival and with the regularisers. Same
training rows (a seeded sample of the train split), same
epochs and seed. Per setting: the per-expert load's coefficient of variation (mean over
gates and domains; 0 = perfectly balanced), dead experts, the dropped share in training,
the regularisers' values and the test AUC. Writes bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import numpy as np

from bench.common import load_bench_config, machine, write_section

REVIVE = 25  # training.revive_after_steps where revival is on
SETTINGS = [  # (top_k, aux_loss_coef, z_loss_coef, revive_after_steps, start collapsed)
    (1, 0.0, 0.0, 0, False),
    (1, 0.01, 0.001, 0, False),
    (1, 0.0, 0.0, REVIVE, False),
    (2, 0.0, 0.0, 0, False),
    (2, 0.01, 0.001, 0, False),
    (2, 0.0, 0.0, REVIVE, False),
    # a collapse run: every gate starts sending every row to expert 0
    (1, 0.0, 0.0, 0, True),
    (1, 0.0, 0.0, REVIVE, True),
    (1, 0.01, 0.001, 0, True),
]


def load_cv(router: dict[str, float]) -> float:
    """Mean over gates x domains of the coefficient of variation of the expert load."""
    groups: dict[str, list[float]] = {}
    for k, v in router.items():
        head, _, last = k.rpartition("/")
        if last.startswith("load_e"):
            groups.setdefault(head, []).append(v)
    cvs = [float(np.std(v) / max(np.mean(v), 1e-12)) for v in groups.values() if len(v) > 1]
    return float(np.mean(cvs)) if cvs else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default.toml")
    ap.add_argument("--train-rows", type=int, default=400_000)
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args(argv)

    import torch

    from features.store import load_manifest, read_examples
    from recsys_moe.model.inputs import ExampleTensors, InputSpec
    from recsys_moe.model.observe import RouterMonitor
    from recsys_moe.model.ranker import RankingModel
    from recsys_moe.model.revive import collapse_router
    from recsys_moe.training import evaluate_model, fit

    cfg = load_bench_config(args.config)
    store = cfg.features.store_dir
    if not os.path.exists(os.path.join(store, "manifest.json")):
        raise SystemExit(f"{store}: no feature store (run `make train` or `make features`)")
    torch.set_num_threads(max(1, min(os.cpu_count() or 1, 4)))
    manifest = load_manifest(store)
    spec = InputSpec.from_manifest(manifest)
    train_df = read_examples(store, "train")
    train_df = train_df.sample(min(args.train_rows, train_df.height), seed=0)
    train = ExampleTensors(spec, train_df)
    valid = ExampleTensors(spec, read_examples(store, "valid"))
    test = ExampleTensors(spec, read_examples(store, "test"))
    rows = []
    for k, aux, z, revive, collapsed in SETTINGS:
        mcfg = dataclasses.replace(cfg.model, arch="mmoe", routing="topk", top_k=k,
                                   aux_loss_coef=aux, z_loss_coef=z)  # fmt: skip
        tcfg = dataclasses.replace(cfg.training, epochs=args.epochs, revive_after_steps=revive)
        torch.manual_seed(tcfg.seed)
        model = RankingModel(spec, mcfg)
        if collapsed:
            collapse_router(model)
        t0 = time.perf_counter()
        res = fit(model, train, valid, tcfg, progress=False)
        seconds = time.perf_counter() - t0
        mon = RouterMonitor(spec.domains)
        test_metrics, _ = evaluate_model(model, test, monitor=mon)
        r_train, r_test = res.router, mon.metrics()
        row = {
            "k": k, "aux": aux, "z": z, "revive": revive, "collapsed": collapsed,
            "revivals": len(res.revivals),
            "cv_train": load_cv(r_train), "cv_test": load_cv(r_test),
            "dead_test": r_test.get("router/dead_experts", 0.0),
            "collapsed_test": r_test.get("router/collapsed_gates", 0.0),
            "dropped": r_train.get("router/gates/dropped_fraction", 0.0),
            "aux_loss": r_train.get("router/aux_loss"), "z_loss": r_train.get("router/z_loss"),
            "auc": test_metrics["auc_mean"], "seconds": seconds,
        }  # fmt: skip
        rows.append(row)
        print(f"top-{k} aux {aux} z {z} revive {revive} collapsed {collapsed}: "
              f"{row['revivals']} revivals, load CV train {row['cv_train']:.3f} test "
              f"{row['cv_test']:.3f}, dead {row['dead_test']:.0f}, dropped "
              f"{row['dropped']:.3f}, test AUC {row['auc']:.4f}, {seconds:.0f} s",
              flush=True)  # fmt: skip

    def val(x):
        return "-" if x is None else f"{x:.3f}"

    lines = [
        f"Machine: {machine()}. `{args.config}`'s store, MMoE with {cfg.model.n_experts} "
        f"experts {cfg.model.expert_hidden}, top-k routing (capacity factor "
        f"{cfg.model.capacity_factor}, sparse expert compute), {train.n:,} training rows (a "
        f"seeded sample), {args.epochs} epoch(s) with the config's early stopping, seed "
        f"{cfg.training.seed}; test split {test.n:,} rows. Load CV: coefficient of variation "
        "of the expert load share, mean over gates x domains (0 = balanced); dead: experts "
        "under 0.1 / E of a gate's test load, summed over gates x domains; collapsed: gates "
        "whose top expert took > 90%; aux / z: the regularisers' training values before "
        "their coefficients (`-`: not computed); revive: `training.revive_after_steps` (0: "
        "off) and the revivals it made; start: `collapsed` = every gate's logit for expert 0 "
        "raised by 20 before training (`recsys_moe.model.revive.collapse_router`).",
        "",
        "| start | top-k | aux coef | z coef | revive | revivals | load CV train | load CV test "
        "| dead (test) | collapsed (test) | dropped (train) | aux loss | z loss | test AUC mean "
        "| s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {'collapsed' if r['collapsed'] else 'fresh'} | {r['k']} | {r['aux']} | "
            f"{r['z']} | {r['revive']} | {r['revivals']} | {r['cv_train']:.3f} | {r['cv_test']:.3f} | "
            f"{r['dead_test']:.0f} | {r['collapsed_test']:.0f} | {r['dropped']:.3f} | "
            f"{val(r['aux_loss'])} | {val(r['z_loss'])} | {r['auc']:.4f} | {r['seconds']:.0f} |"
        )
    best = max((r for r in rows if not r["collapsed"]), key=lambda r: r["auc"])
    lines += ["", f"Highest test AUC from a fresh start: top-{best['k']}, aux {best['aux']}, "
              f"z {best['z']}, revive {best['revive']} ({best['auc']:.4f})."]  # fmt: skip
    write_section("Routing health (bench/quality/routing.py)", "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
