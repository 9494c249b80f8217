"""Feature-pipeline throughput: the Ray pipeline vs the single-process Polars reference vs
a pandas equivalent, on generated logs of 1M and 10M rows, in one run.

    python -m bench.features [--rows 1000000 10000000] [--skip-pandas-above N]

Ray's start-up is measured once and reported separately; every variant reads the raw
log from Parquet and writes the examples as Parquet. Results go to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl

from bench.common import machine, write_section
from recsys_moe.config import Config, load_config

OUT = Path(__file__).resolve().parent / "out" / "features"


def config_for(rows: int) -> Config:
    users, items = max(2_000, rows // 30), max(500, rows // 120)
    return load_config(
        "configs/default.toml",
        {
            "synthetic.n_rows": rows,
            "synthetic.n_users": users,
            "synthetic.n_items": items,
            "data.raw_dir": str(OUT / f"raw_{rows}"),
            "features.store_dir": str(OUT / f"store_{rows}"),
            "features.partitions": 4,
            "features.test_fraction": 0.1,  # the pandas baseline below splits three ways
        },
    )


def run_polars(cfg: Config) -> int:
    from pipelines.build_features import build_reference

    out, _, _, _ = build_reference(cfg)
    dest = OUT / "polars_out"
    shutil.rmtree(dest, ignore_errors=True)
    for (split,), part in out.partition_by("split", as_dict=True).items():
        (dest / f"split={split}").mkdir(parents=True)
        part.drop("split").write_parquet(dest / f"split={split}" / "part.parquet")
    return out.height


def run_pandas(cfg: Config) -> int:
    """The same features written the usual pandas way (groupby-cumsum, merge, map)."""
    d, f = cfg.data, cfg.features
    raw = Path(d.raw_dir)
    inter = pd.read_parquet(raw / "interactions")
    users = pd.read_parquet(raw / "users.parquet")
    items = pd.read_parquet(raw / "items.parquet")
    ts, tasks = d.timestamp, d.task_names
    q = inter[ts].quantile(
        [1 - f.valid_fraction - f.test_fraction, 1 - f.test_fraction], interpolation="lower"
    )
    v0, t0 = int(q.iloc[0]), int(q.iloc[1])
    inter["split"] = np.where(inter[ts] < v0, "train", np.where(inter[ts] < t0, "valid", "test"))
    train = inter[inter[ts] < v0]
    priors = {t: train[t].mean() for t in tasks}
    m = f.smoothing_strength
    for grain, keys in (
        ("user", [d.user_id]),
        ("userdom", [d.user_id, d.domain]),
        ("item", [d.item_id]),
        ("itemdom", [d.item_id, d.domain]),
    ):
        g = (
            inter.groupby([*keys, ts], sort=True)
            .agg(_n=(ts, "size"), **{f"_s{t}": (t, "sum") for t in tasks})
            .reset_index()
        )
        grp = g.groupby(keys, sort=False)
        g[f"{grain}_n"] = grp["_n"].cumsum() - g["_n"]
        for t in tasks:
            g[f"{grain}_s_{t}"] = grp[f"_s{t}"].cumsum() - g[f"_s{t}"]
        g[f"{grain}_last"] = grp[ts].shift(1)
        g = g.drop(columns=["_n", *(f"_s{t}" for t in tasks)])
        inter = inter.merge(g, on=[*keys, ts], how="left")
        inter[f"hist_{grain}_cnt"] = np.log1p(inter[f"{grain}_n"]).astype("float32")
        for t in tasks:
            inter[f"hist_{grain}_rate_{t}"] = (
                (inter[f"{grain}_s_{t}"] + priors[t] * m) / (inter[f"{grain}_n"] + m)
            ).astype("float32")
    for who in ("user", "item"):
        days = ((inter[ts] - inter[f"{who}_last"]) / 86400.0).clip(0, 365).fillna(365.0)
        inter[f"hist_{who}_recency"] = np.log1p(days).astype("float32")
    n = inter["user_n"]
    inter["user_segment"] = np.where(
        n >= f.power_min, "power", np.where(n >= f.casual_min, "casual", "cold")
    )
    inter = inter.merge(users, on=d.user_id, how="left").merge(items, on=d.item_id, how="left")
    is_train = inter["split"] == "train"
    cats = [
        d.user_id,
        d.item_id,
        d.domain,
        "user_segment",
        *d.context_categorical,
        *d.user_categorical,
        *d.item_categorical,
    ]
    for c in cats:
        if c in d.multi_valued:
            exploded = inter[c].explode()
            counts = exploded[is_train.reindex(exploded.index)].value_counts()
            vocab = {v: i + 1 for i, v in enumerate(counts.index)}
            inter["cat__" + c] = (
                exploded.map(vocab).fillna(0).astype("int32").groupby(level=0).agg(list)
            )
        else:
            counts = inter.loc[is_train, c].value_counts()
            vocab = {v: i + 1 for i, v in enumerate(counts.index)}
            inter["cat__" + c] = inter[c].map(vocab).fillna(0).astype("int32")
    nums = [c for c in inter.columns if c.startswith("hist_")] + [*d.user_numeric, *d.item_numeric]
    for c in nums:
        inter["num__" + c] = inter[c].fillna(inter.loc[is_train, c].mean()).astype("float32")
    keep = [
        d.user_id,
        d.item_id,
        d.domain,
        ts,
        *(k for k in inter.columns if k.startswith(("cat__", "num__"))),
        *tasks,
        "split",
    ]
    dest = OUT / "pandas_out"
    shutil.rmtree(dest, ignore_errors=True)
    inter[keep].to_parquet(dest, partition_cols=["split"])
    return len(inter)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--skip-pandas-above", type=int, default=10_000_000)
    args = ap.parse_args()

    import ray

    from pipelines.build_features import build_features
    from pipelines.generate import run_generate
    from recsys_moe.cluster import init_ray

    t = time.perf_counter()
    init_ray()
    # start-up = ray.init + one tiny run, so worker processes exist and have imported Polars/Arrow
    warm = config_for(20_000)
    if not (Path(warm.data.raw_dir) / "generator.json").exists():
        run_generate(warm, progress=False)
    build_features(warm, progress=False)
    ray_start = time.perf_counter() - t
    rows_out = []
    for rows in args.rows:
        cfg = config_for(rows)
        if not (Path(cfg.data.raw_dir) / "generator.json").exists():
            print(f"generating {rows:,} rows ...", flush=True)
            run_generate(cfg, progress=False)
        res = {}
        t = time.perf_counter()
        n_polars = run_polars(cfg)
        res["polars"] = time.perf_counter() - t
        t = time.perf_counter()
        manifest = build_features(cfg, progress=False)
        res["ray"] = time.perf_counter() - t
        assert sum(manifest["splits"]["rows"].values()) == n_polars == rows
        if rows <= args.skip_pandas_above:
            t = time.perf_counter()
            assert run_pandas(cfg) == rows
            res["pandas"] = time.perf_counter() - t
        print(
            f"{rows:,} rows: "
            + ", ".join(f"{k} {v:.1f}s ({rows / v:,.0f} rows/s)" for k, v in res.items()),
            flush=True,
        )
        rows_out.append((rows, res, manifest["timings_s"]))
    lines = [
        f"Machine: {machine()}. Ray {ray.__version__}, Polars {pl.__version__}, pandas {pd.__version__}.",
        f"Ray start-up (ray.init plus one 20k-row warm-up run that starts the worker processes; measured once, not included below): {ray_start:.1f} s.",
        "Each variant reads the generated Parquet log and writes the examples as Parquet;",
        "the Ray pipeline also writes vocabularies, lookup tables and the manifest.",
        "",
        "| rows | Polars (1 process) | Ray pipeline | pandas | Ray / Polars time | pandas / Polars time |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for rows, res, _ in rows_out:
        pd_cell = (
            f"{res['pandas']:.1f} s ({rows / res['pandas']:,.0f} rows/s)"
            if "pandas" in res
            else "skipped"
        )
        pd_ratio = f"{res['pandas'] / res['polars']:.2f}x" if "pandas" in res else "-"
        lines.append(
            f"| {rows:,} | {res['polars']:.1f} s ({rows / res['polars']:,.0f} rows/s) | "
            f"{res['ray']:.1f} s ({rows / res['ray']:,.0f} rows/s) | {pd_cell} | "
            f"{res['ray'] / res['polars']:.2f}x | {pd_ratio} |"
        )
    lines += ["", "Ray pipeline phases (s): " + "; ".join(
        f"{rows:,} rows: " + ", ".join(f"{k} {v:.1f}" for k, v in tim.items() if k not in ("ray_init", "total"))
        for rows, _, tim in rows_out
    )]  # fmt: skip
    write_section("Feature pipeline throughput (bench/features.py)", "\n".join(lines))


if __name__ == "__main__":
    main()
