"""Which model is better on the rows after the log ends: one that held out a test window,
one trained on every row but the validation window (``features.test_fraction = 0``), or
one refit on train + validation after the epoch count was chosen (``training.refit``)?

For each config: its raw log is cut by time at the ``--future`` quantile. The past is the
log a user has; the rest is what happens after it is served. Each variant builds its
feature store on the past, trains with ``recsys-moe train``'s own function
(:func:`bench.quality.common.train_as_cli`) over ``--seeds`` seeds, and its bundle scores
the future rows as serving would (:class:`recsys_moe.scorer.Scorer`: the store's tables as
of the end of the past, unknown users and items as such). Writes its section of
bench/RESULTS.md.

    python -m bench.quality.newest [--config configs/sparse.toml ...] [--seeds 3]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import polars as pl

from bench.common import ensure_raw, ensure_store, machine, write_section
from bench.quality.common import BENCH_OUT, fmt_mean_std, train_as_cli
from recsys_moe.config import load_config

OUT = Path(BENCH_OUT) / "newest"
VARIANTS = {  # label -> overrides
    "test window held out (test_fraction 0.1)": {"features.test_fraction": 0.1},
    "no test split (test_fraction 0)": {"features.test_fraction": 0.0},
    "no test split, refit on train + valid (training.refit)": {
        "features.test_fraction": 0.0,
        "training.refit": True,
    },
}
CONFIGS = ["configs/sparse.toml", "configs/movielens.toml"]


def cut_log(cfg, future: float) -> tuple[Path, pl.DataFrame]:
    """The config's raw log up to its ``1 - future`` time quantile, written as a raw log of
    its own, and the rows after it."""
    from recsys_moe.data.schema import bad_row_reason, find_table, read_table

    ensure_raw(cfg)  # generated or loaded
    raw = Path(cfg.data.raw_dir)
    inter = read_table(find_table(raw, "interactions"))
    ts = cfg.data.timestamp
    order = inter[ts].sort()
    cut = order[int((1.0 - future) * (len(order) - 1))]
    past_dir = OUT / cfg.name / "raw"
    shutil.rmtree(past_dir, ignore_errors=True)
    past_dir.mkdir(parents=True)
    inter.filter(pl.col(ts) < cut).write_parquet(past_dir / "interactions.parquet")
    for name in ("users", "items"):
        read_table(find_table(raw, name)).write_parquet(past_dir / f"{name}.parquet")
    later = inter.filter(pl.col(ts) >= cut)
    return past_dir, later.filter(bad_row_reason(cfg.data).is_null())


def future_auc(bundle: Path, rows: pl.DataFrame) -> dict[str, float]:
    """AUC per task x domain of ``bundle``'s scores of ``rows``, as served."""
    from recsys_moe.scorer import Scorer
    from recsys_moe.training import task_metrics

    sc = Scorer.from_dir(bundle)
    spec = sc.model.spec
    labels = rows.select([t.name for t in spec.tasks]).to_numpy().astype("float32")
    domain_of = {d: sc.domain_index(d) for d in spec.domains}
    raw_dom = rows[sc.spec.domain].cast(pl.String).to_list()
    domains = np.array([domain_of.get(d, 0) for d in raw_dom])
    return task_metrics(spec, labels, sc.score(rows), domains)


def run(config: str, seeds: int, future: float) -> tuple[str, list[str]]:
    base = load_config(config)
    past_dir, future_rows = cut_log(base, future)
    results: dict[str, list[dict[str, float]]] = {}
    rows: dict[str, dict[str, int]] = {}
    built: set[str] = set()
    for i, (label, overrides) in enumerate(VARIANTS.items()):
        tf = overrides["features.test_fraction"]
        store = str(OUT / base.name / f"store-tf{tf:g}")  # one store per split
        common = {"source.kind": "files", "data.raw_dir": str(past_dir),
                  "features.store_dir": store, **overrides}  # fmt: skip
        cfg = load_config(config, common)
        if store not in built:
            shutil.rmtree(store, ignore_errors=True)
            ensure_store(cfg)
            built.add(store)
        for seed in range(seeds):
            scfg = load_config(config, {**common, "training.seed": base.training.seed + seed})
            print(f"[newest] {base.name} {label} seed {seed} ...", flush=True)
            s = train_as_cli(scfg, OUT / base.name / f"model-{i}-{seed}", progress=False)
            results.setdefault(label, []).append(future_auc(Path(s["model_dir"]), future_rows))
            from features.store import load_manifest

            rows[label] = load_manifest(cfg.features.store_dir)["splits"]["rows"]
    tasks = [t.name for t in base.data.tasks]
    head = "| model | " + " | ".join(tasks) + " | trained on | validation | test |"
    lines = [head, "|---|" + "---:|" * (len(tasks) + 3)]
    means = {}
    for label, rs in results.items():
        r = rows[label]
        cells = [fmt_mean_std([m[f"{t}/all/auc"] for m in rs]) for t in tasks]
        means[label] = [float(np.mean([m[f"{t}/all/auc"] for m in rs])) for t in tasks]
        trained = r["train"] + (r["valid"] if VARIANTS[label].get("training.refit") else 0)
        lines.append(f"| {label} | " + " | ".join(cells)
                     + f" | {trained:,} | {r['valid']:,} | {r['test']:,} |")  # fmt: skip
    held, no_test, refit = (means[k] for k in VARIANTS)

    def gap(b: list[float], a: list[float]) -> str:
        return ", ".join(f"{t} {y - x:+.4f}" for t, x, y in zip(tasks, a, b, strict=True))

    text = (
        f"`{config}` cut at its {1 - future:.0%} time quantile: {future_rows.height:,} future rows "
        f"scored by each bundle as served; {seeds} seed(s), AUC mean ± std. No test split "
        f"minus held-out test window: {gap(no_test, held)}; refit minus no test split: "
        f"{gap(refit, no_test)}."
    )
    return text, lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", action="append", default=None)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--future", type=float, default=0.1, help="share of the log after the cut")
    args = ap.parse_args(argv)
    parts = [
        f"Machine: {machine()}. Each model trained by `recsys-moe train`'s own function "
        "(default layout) on the past part of the log; AUC on the rows after it.",
        "",
    ]
    for config in args.config or CONFIGS:
        text, lines = run(config, args.seeds, args.future)
        print(text, *lines, sep="\n", flush=True)
        parts += [text, "", *lines, ""]
    write_section("Quality: training on the newest rows (bench/quality/newest.py)",
                  "\n".join(parts))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
