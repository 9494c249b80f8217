"""Day-by-day retraining on a log with drift: yesterday's champion warm-started on the
newest day, against a full retrain on everything so far and against never retraining.

    python -m bench.quality.retrain [--rows 4000000] [--steps 5] [--window-days 1]

The log is the regime suite's ``drift`` regime (item popularity and appeal trend across
it; the sparse config's shape: string ids, click with conversion under it, three domains)
at ``--rows`` rows over 30 days. Day 0 is the log up to the last ``--steps`` days: a model
is trained on it (``recsys-moe train``'s own function, the ``[model]`` and ``[training]``
of ``configs/default.toml``) and registered as the champion in a bench-local MLflow store.
Then, for each of the next ``--steps`` days, with the log so far:

- **warm start** (``make retrain``): a store of the newest ``--window-days`` days grown from
  the champion (``features.window_days``, ``features.grow_from``), trained from the
  champion's weights (``--warm-start``), registered, and promoted only by the usual gate;
  the champion after the gate is what serves the next day;
- **full retrain**: a store of the whole log so far and a model trained from scratch,
  registered and gated as well (under a model name of its own);
- **never retrain**: day 0's model.

Each is scored on the next day's rows as serving scores them (its bundle's lookup tables
as of the end of its log). Times are the commands' own: the feature store build and the
train command (Ray Train start-up included). Writes its section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import numpy as np
import polars as pl

from bench.common import commit, ensure_raw, machine, write_section
from bench.quality.common import BENCH_OUT, train_as_cli
from bench.quality.newest import future_auc
from bench.quality.regimes import REGIMES, _sections, regime_overrides
from recsys_moe.config import load_config

OUT = Path(BENCH_OUT) / "retrain"
BASE, MODEL = "configs/sparse.toml", "configs/default.toml"
DAY = 86_400


def log_overrides(rows: int) -> dict:
    """The drift regime's log at ``rows`` rows, the default model and training."""
    regime = next(r for r in REGIMES if r.name == "drift")
    over = regime_overrides(regime, REGIMES.index(regime))
    return over | {
        "name": "retrain_drift",
        "synthetic.n_rows": rows,
        "data.raw_dir": str(OUT / "raw"),
        "features.test_fraction": 0.0,  # the shipped default: the next day is the test
        **{f"{section}.{k}": v for section, body in _sections(MODEL).items()
           for k, v in body.items()},
    }  # fmt: skip


def cut(over: dict, inter: pl.DataFrame, end: int, name: str) -> dict:
    """The log before ``end`` (epoch seconds) as a raw log of its own: its overrides."""
    from recsys_moe.data.schema import find_table, read_table

    raw = OUT / name / "raw"
    shutil.rmtree(raw, ignore_errors=True)
    raw.mkdir(parents=True)
    inter.filter(pl.col("_t") < end).drop("_t").write_parquet(raw / "interactions.parquet")
    for table in ("users", "items"):
        read_table(find_table(Path(over["data.raw_dir"]), table)).write_parquet(
            raw / f"{table}.parquet"
        )
    return over | {"source.kind": "files", "data.raw_dir": str(raw)}


def build(over: dict, store: Path, **features: object):
    """The feature store of ``over``'s log at ``store``: its config and build seconds."""
    from pipelines.build_features import build_features

    cfg = load_config(BASE, over | {"features.store_dir": str(store)}
                      | {f"features.{k}": v for k, v in features.items()})  # fmt: skip
    shutil.rmtree(store, ignore_errors=True)
    t0 = time.perf_counter()
    build_features(cfg, progress=False)
    return cfg, time.perf_counter() - t0


def mean_auc(m: dict[str, float], tasks: list[str]) -> float:
    return float(np.mean([m[f"{t}/all/auc"] for t in tasks]))


def run(rows: int, steps: int, window_days: float) -> int:
    from features.examples import timestamp_seconds
    from recsys_moe.data.schema import bad_row_reason, find_table, read_table
    from recsys_moe.registry import resolve_model

    shutil.rmtree(OUT, ignore_errors=True)  # a fresh registry and models every run
    OUT.mkdir(parents=True)
    tracking = f"sqlite:///{OUT.resolve()}/mlflow.db"
    user_uri = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = tracking  # where grow_from finds the champion
    over = log_overrides(rows)
    cfg = load_config(BASE, over)
    ensure_raw(cfg)
    ts = cfg.data.timestamp
    inter = read_table(find_table(Path(cfg.data.raw_dir), "interactions"))
    inter = inter.filter(bad_row_reason(cfg.data).is_null()).with_columns(
        timestamp_seconds(ts, inter.schema[ts]).alias("_t")
    )
    last = int(inter["_t"].max())
    # day k (0..steps) is [cuts[k], cuts[k+1]): the log before it trains, it is scored
    cuts = [last + 1 - (steps + 1 - k) * DAY for k in range(steps + 2)]
    tasks = [t.name for t in cfg.data.tasks]

    def next_day(k: int) -> pl.DataFrame:
        return inter.filter((pl.col("_t") >= cuts[k]) & (pl.col("_t") < cuts[k + 1])).drop("_t")

    print(f"[retrain] day 0: the log before the last {steps + 1} days", flush=True)
    o0 = cut(over, inter, cuts[0], "day0")
    c0, _ = build(o0, OUT / "day0" / "store")
    s0 = train_as_cli(c0, OUT / "day0" / "model", False, tracking=tracking, register=True)
    initial, champion = Path(s0["model_dir"]), c0.model_uri
    days = []
    for k in range(1, steps + 1):
        print(f"[retrain] day {k}: full retrain, then warm start", flush=True)
        ok = cut(over, inter, cuts[k], f"day{k}")
        # registered and gated too (a model of its own name), as a daily full retrain is
        cf, feat_full = build(ok | {"name": "retrain_drift_full"}, OUT / f"day{k}" / "store-full")
        sf = train_as_cli(cf, OUT / f"day{k}" / "full", False, tracking=tracking, register=True)
        cw, feat_warm = build(ok, OUT / f"day{k}" / "store-window",
                              window_days=window_days, grow_from=champion)  # fmt: skip
        sw = train_as_cli(cw, OUT / f"day{k}" / "warm", False, tracking=tracking,
                          register=True, warm_start=champion)  # fmt: skip
        rows_next = next_day(k)
        served = resolve_model(champion).bundle
        auc = {
            "warm start": future_auc(served, rows_next),
            "warm start, as trained": future_auc(Path(sw["model_dir"]), rows_next),
            "full retrain": future_auc(Path(sf["model_dir"]), rows_next),
            "never retrain": future_auc(initial, rows_next),
        }
        days.append({
            "day": k, "rows": int((inter["_t"] < cuts[k]).sum()), "next": rows_next.height,
            "auc": {who: mean_auc(m, tasks) for who, m in auc.items()},
            "tasks": {who: {t: m[f"{t}/all/auc"] for t in tasks} for who, m in auc.items()},
            "time": {"features full": feat_full, "train full": sf["seconds"],
                     "features warm": feat_warm, "train warm": sw["seconds"]},
            "trained": {"full": sf["train_rows"], "warm": sw["train_rows"]},
            "decision": sw["registry"]["decision"],
        })  # fmt: skip
        print(f"[retrain] day {k}: " + ", ".join(
            f"{w} {a:.4f}" for w, a in days[-1]["auc"].items()), flush=True)  # fmt: skip
    if user_uri is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = user_uri
    body = report(days, tasks, rows, steps, window_days, c0.training.warm_start_lr_scale)
    print(body, flush=True)
    write_section(section_title(window_days), body)
    return 0


def section_title(window: float) -> str:
    """One section per window, so a run with another window keeps the first one's."""
    if window == 1:
        return "Quality: day-by-day retraining (bench/quality/retrain.py)"
    return (f"Quality: day-by-day retraining, a {window:g}-day window "
            f"(bench/quality/retrain.py --window-days {window:g})")  # fmt: skip


def report(
    days: list[dict], tasks: list[str], rows: int, steps: int, window: float, lr_scale: float
) -> str:
    who = ["warm start", "warm start, as trained", "full retrain", "never retrain"]
    lines = [
        "| day | log so far | next day's rows | " + " | ".join(who) + " | warm − full |",
        "|---:|---:|---:|" + "---:|" * (len(who) + 1),
    ]
    for d in days:
        a = d["auc"]
        lines.append(f"| {d['day']} | {d['rows']:,} | {d['next']:,} | "
                     + " | ".join(f"{a[w]:.4f}" for w in who)
                     + f" | {a['warm start'] - a['full retrain']:+.4f} |")  # fmt: skip
    lines += [
        "",
        "| day | full: features s | full: train s | full: rows trained | warm: features s "
        "| warm: train s | warm: rows trained | warm / full, train | warm / full, both |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for d in days:
        t = d["time"]
        full, warm = t["features full"] + t["train full"], t["features warm"] + t["train warm"]
        lines.append(
            f"| {d['day']} | {t['features full']:.1f} | {t['train full']:.1f} | "
            f"{d['trained']['full']:,} | {t['features warm']:.1f} | {t['train warm']:.1f} | "
            f"{d['trained']['warm']:,} | {t['train warm'] / t['train full']:.2f} | "
            f"{warm / full:.2f} |"
        )
    gaps = [d["auc"]["warm start"] - d["auc"]["full retrain"] for d in days]
    task_gaps = [d["tasks"]["warm start"][t] - d["tasks"]["full retrain"][t]
                 for d in days for t in tasks]  # fmt: skip
    beat = all(d["auc"][w] > d["auc"]["never retrain"] for d in days
               for w in ("warm start", "full retrain"))  # fmt: skip
    train_ratio = sum(d["time"]["train warm"] for d in days) / sum(
        d["time"]["train full"] for d in days
    )
    both_ratio = sum(d["time"]["features warm"] + d["time"]["train warm"] for d in days) / sum(
        d["time"]["features full"] + d["time"]["train full"] for d in days
    )
    decisions = [f"day {d['day']}: {d['decision']}" for d in days]
    head = (
        f"Machine: {machine()}. Commit {commit()}. The regime suite's `drift` log at "
        f"{rows:,} rows over 30 days; day 0 is the log before the last {steps + 1} days. "
        f"Models: the [model] and [training] of `configs/default.toml`, trained by "
        f"`recsys-moe train`'s own function (default layout), one seed. Warm start: a store "
        f"of the newest {window:g} day(s) grown from the champion, trained from its weights "
        f"at x{lr_scale:g} its learning rates (`training.warm_start_lr_scale`), "
        f"registered and gated; `warm start` is the champion after the gate (what serves "
        f"the next day), `as trained` the day's warm-started model whatever the gate said. "
        f"AUC: mean over tasks ({', '.join(tasks)}) of the next day's rows, scored as served."
        "\n\n"
        f"Warm start minus full retrain, per day (mean over tasks): "
        f"{', '.join(f'{g:+.4f}' for g in gaps)}; worst task x day {min(task_gaps):+.4f} "
        f"(bar: -0.002). Time of the warm start over the full retrain, summed over the days: "
        f"train command {train_ratio:.2f}x, feature store + train {both_ratio:.2f}x "
        f"(bar: 0.25x). Both retrains beat never retraining every day: "
        f"{'yes' if beat else 'no'}.\n\nGate decisions: " + "; ".join(decisions)
    )
    return head + "\n\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4_000_000)
    ap.add_argument("--steps", type=int, default=5, help="simulated days of retraining")
    ap.add_argument("--window-days", type=float, default=1.0)
    args = ap.parse_args(argv)
    return run(args.rows, args.steps, args.window_days)


if __name__ == "__main__":
    raise SystemExit(main())
