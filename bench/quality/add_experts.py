"""Add experts to one domain without retraining (``recsys-moe extend --add-experts``),
against a full retrain with the same added capacity.

    python -m bench.quality.add_experts [--config configs/default.toml] [--domain video]
        [--parent-experts 4] [--experts 2] [--lr 1e-3]

1. The parent: the config's model with ``--parent-experts`` experts, trained on the
   config's feature store (``train_as_cli``: what ``recsys-moe train`` runs, without the registry).
2. ``extend --add-experts N --domain D`` on the parent's bundle: N experts of D's own
   plus D's gates train on D's rows, everything else frozen.
3. The full retrain: the same model with ``parent-experts + N`` experts trained from
   scratch on every domain (same trainer, settings and seed as the parent).

Per domain, test AUC (mean over tasks) of the three; the time of the extension against
the full retrain; the largest |score change| against the parent on the other domains'
test rows (the extension: 0, bit-identical; the retrain: everything moves). Writes
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

from bench.common import load_bench_config, machine, write_section

OUT = Path(__file__).resolve().parent.parent / "out" / "add_experts"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default.toml")
    ap.add_argument("--domain", default="video")
    ap.add_argument("--parent-experts", type=int, default=4)
    ap.add_argument("--experts", type=int, default=2, help="experts added to the domain")
    ap.add_argument("--lr", type=float, default=1e-3, help="[extend] lr for the extension")
    args = ap.parse_args(argv)

    from bench.quality.common import train_as_cli
    from features.store import load_manifest, read_examples
    from pipelines.extend import run_extend
    from recsys_moe.bundle import load_model
    from recsys_moe.model.inputs import ExampleTensors, InputSpec
    from recsys_moe.training import evaluate_model

    base = load_bench_config(args.config)
    store = base.features.store_dir
    if not (Path(store) / "manifest.json").is_file():
        from pipelines.build_features import build_features

        print(f"building the feature store {store} ...", flush=True)
        build_features(base, progress=False)
    spec = InputSpec.from_manifest(load_manifest(store))
    if args.domain not in spec.domains:
        raise SystemExit(f"--domain {args.domain!r}: not one of {spec.domains}")

    def with_experts(n: int):
        return base.replace(model=dataclasses.replace(base.model, n_experts=n))

    E, N = args.parent_experts, args.experts
    print(f"parent: {base.model.arch} with {E} experts ...", flush=True)
    parent = train_as_cli(with_experts(E), OUT / "parent", progress=False)
    print(f"extend --add-experts {N} --domain {args.domain} ...", flush=True)
    t = time.perf_counter()
    ext_cfg = with_experts(E).replace(extend=dataclasses.replace(base.extend, lr=args.lr))
    ext = run_extend(ext_cfg, model=parent["model_dir"], domain=args.domain,
                     add_experts=N, output=OUT / "child", register=False, progress=False)  # fmt: skip
    ext_seconds = time.perf_counter() - t
    print(f"full retrain with {E + N} experts ...", flush=True)
    full = train_as_cli(with_experts(E + N), OUT / "full", progress=False)

    test = ExampleTensors(spec, read_examples(store, "test"))
    dom = test.domain.numpy()
    models = {"parent": parent["model_dir"], "extend": ext["bundle"], "full": full["model_dir"]}
    metrics, preds = {}, {}
    for name, path in models.items():
        model, _ = load_model(path)
        metrics[name], preds[name] = evaluate_model(model, test)
    tasks = spec.task_names
    k = spec.domains.index(args.domain) + 1

    def auc(name: str, domain: str) -> float:
        return float(np.mean([metrics[name][f"{t}/{domain}/auc"] for t in tasks]))

    others = dom != k
    change = {n: float(np.abs(preds[n][others] - preds["parent"][others]).max()) for n in models}
    lines = [
        f"Machine: {machine()}. Config `{args.config}` ({len(test):,} test rows). Parent: "
        f"`{base.model.arch}` with {E} experts {base.model.expert_hidden}, trained by "
        f"`train_as_cli` ({parent['seconds']:.0f} s). Extension: `recsys-moe extend "
        f"--add-experts {N} --domain {args.domain}` ([extend]: {base.extend.epochs} epochs "
        f"max, lr {args.lr}, the start kept unless an epoch beats it; best epoch "
        f"{ext['best_epoch']} (-1: the start); {ext['trainable_params']:,} of {ext['total_params']:,} "
        f"parameters trained, on {ext['rows']['train']:,} rows). Full retrain: the same model "
        f"with {E + N} experts on every domain, same trainer and seed. Test AUC, mean over "
        "tasks:",
        "",
        "| domain | parent | parent + extend | full retrain |",
        "|---|---:|---:|---:|",
    ]
    for d in spec.domains:
        mark = " (extended)" if d == args.domain else ""
        lines.append(f"| {d}{mark} | {auc('parent', d):.4f} | {auc('extend', d):.4f} | "
                     f"{auc('full', d):.4f} |")  # fmt: skip
    lines.append(f"| all | {metrics['parent']['auc_mean']:.4f} | "
                 f"{metrics['extend']['auc_mean']:.4f} | {metrics['full']['auc_mean']:.4f} |")  # fmt: skip
    gain_ext = auc("extend", args.domain) - auc("parent", args.domain)
    gain_full = auc("full", args.domain) - auc("parent", args.domain)
    lines += [
        "",
        f"- {args.domain!r}: extension {gain_ext:+.4f} AUC over the parent, full retrain "
        f"{gain_full:+.4f}; validation auc_mean of the domain {ext['parent_valid']['auc_mean']:.4f}"
        f" -> {ext['valid']['auc_mean']:.4f}; promotion gates {ext['gates']}.",
        f"- Time: extension {ext_seconds:.0f} s (training {ext['seconds']['train']:.0f} s) vs "
        f"full retrain {full['seconds']:.0f} s: {ext_seconds / full['seconds']:.1%}.",
        f"- Other domains, largest |score change| against the parent on their "
        f"{int(others.sum()):,} test rows: extension {change['extend']:.3g} (bit-identical: "
        f"{change['extend'] == 0.0}), full retrain {change['full']:.3g}.",
    ]
    write_section("Quality: add experts to a domain (bench/quality/add_experts.py)",
                  "\n".join(lines))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
