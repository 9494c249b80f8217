"""The regime suite: the shipped models against torch-rechub on eight generated logs that
differ the way real multi-domain logs differ, and on every real dataset with a loader.

    python -m bench.quality.regimes [--half tune|holdout|all] [--regime NAME ...]
                                    [--real] [--seeds 3]
    python -m bench.quality.regimes --half tune --trial model.n_experts=4 [--trial ...]

Each regime is the embedded generator (``recsys_moe.data.synthetic``) with a few of its
knobs turned: how far users' tastes differ between domains (``domain_divergence``), how
much of a user's / item's taste its attributes explain (``idiosyncratic``), how many
users and items arrive during the log (``arrival_fraction``), drift in item popularity
(``drift``), how heavy-tailed user activity is (``user_activity_sigma``). Every regime has
the sparse config's shape (string ids, click with conversion as a funnel under it, three
domains, user / item attributes and context columns) at 250k rows, and a generator seed
of its own.

The regimes were split in two before any model ran on them (the commit that added this
file): ``tune`` is where model and training changes may be tried; ``holdout`` is reported,
never tuned on. The holdout half is what counts.

Models, on the same train / valid / test split (the benches' own test window, the last
10% of time) and batch, ``--seeds`` times each: the project's model with the ``[model]``
and ``[training]`` sections of ``configs/default.toml`` (what ``make train`` runs) and of
``configs/sparse.toml``, trained by what ``recsys-moe train`` runs; torch-rechub's MMoE,
PLE and SharedBottom (``bench.quality.peers``). With ``--real``, the real datasets in
``../shared/data`` with their own shipped configs are added to the table. Written to
``bench/RESULTS.md`` as one table: regimes x models, mean ± seed spread per task.
``--trial`` trains the default model with and without the given overrides on the tune
half (no peers, nothing written): how a change is judged before it may become a default.
"""

from __future__ import annotations

import argparse
import json
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.common import commit, load_bench_config, machine, write_section
from bench.quality.peers import PEERS, Measured, measure

BASE = "configs/sparse.toml"
OUT = Path("bench/out/regimes")
MODELS = {"recsys-moe default": "configs/default.toml", "recsys-moe sparse": "configs/sparse.toml"}
SHAPE = {
    "n_rows": 250_000,
    "n_users": 10_000,
    "n_items": 2_500,
    "days": 30,
    "idiosyncratic": 0.6,
    "zipf_exponent": 0.9,
    "user_activity_sigma": 1.4,
    "arrival_fraction": 0.33,
    "domain_divergence": 0.6,
    "drift": 0.0,
    "string_ids": True,
}
REAL = {  # config -> the folder under ../shared/data it reads
    "configs/movielens.toml": "movielens_100k",
    "configs/census.toml": "census_income_kdd",
    "configs/douban.toml": "douban_book_music",
    "configs/womens_ecommerce.toml": "womens_ecommerce_reviews",
}


@dataclass(frozen=True)
class Regime:
    name: str
    half: str  # "tune" or "holdout", fixed before any model ran
    what: str
    knobs: dict = field(default_factory=dict)


REGIMES = [
    Regime("base", "tune", "the sparse config's shape", {}),
    Regime("divergent_tastes", "tune", "tastes differ much between domains",
           {"domain_divergence": 1.5}),
    Regime("weak_attributes", "tune", "attributes explain little of a taste",
           {"idiosyncratic": 1.5}),
    Regime("many_arrivals", "tune", "60% of users and items arrive during the log",
           {"arrival_fraction": 0.6}),
    Regime("shared_tastes", "holdout", "the same tastes in every domain",
           {"domain_divergence": 0.0}),
    Regime("drift", "holdout", "item popularity and appeal trend across the log",
           {"drift": 1.0}),
    Regime("strong_attributes", "holdout", "attributes explain most of a taste",
           {"idiosyncratic": 0.25}),
    Regime("heavy_tail", "holdout", "20k users, very heavy-tailed activity (12 events each on "
           "average)", {"n_users": 20_000, "user_activity_sigma": 2.2}),
]  # fmt: skip


def _sections(path: str) -> dict:
    raw = tomllib.loads(Path(path).read_text())
    return {"model": raw["model"], "training": raw["training"]}


def regime_overrides(regime: Regime, index: int) -> dict:
    """load_config overrides that turn the base config into ``regime``'s log and store."""
    synthetic = {**SHAPE, **regime.knobs, "seed": 101 + index, "chunk_rows": 50_000}
    return {
        "name": f"regime_{regime.name}",
        **{f"synthetic.{k}": v for k, v in synthetic.items()},
        "data.raw_dir": f"data/raw/regimes/{regime.name}",
        "features.store_dir": f"data/features/regimes/{regime.name}",
    }


def run_regime(regime: Regime, index: int, seeds: int, threads: int, trial: dict | None = None,
               peers: tuple[str, ...] = PEERS) -> Measured:  # fmt: skip
    """``regime``'s log and store (made where missing), every model on it. ``trial``:
    overrides of the default model's sections (a trial on the tune half)."""
    over = regime_overrides(regime, index)
    cfg = load_bench_config(BASE, over)
    variants = {who: load_bench_config(BASE, {**over, **_sections(path)})
                for who, path in MODELS.items()}  # fmt: skip
    if trial is not None:
        default = load_bench_config(BASE, {**over, **_sections(MODELS["recsys-moe default"])})
        variants = {"recsys-moe default": default,
                    "recsys-moe trial": load_bench_config(BASE, {**over, **_sections(
                        MODELS["recsys-moe default"]), **trial})}  # fmt: skip
    return measure(cfg, variants, peers, seeds, threads)


def run_real(config: str, seeds: int, threads: int) -> Measured:
    """A real dataset with its own shipped config (its model and training sections)."""
    cfg = load_bench_config(config)
    return measure(cfg, {"recsys-moe default": cfg}, PEERS, seeds, threads)


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def trial_line(name: str, m: Measured) -> str:
    """The trial minus the default model, per task over all domains (mean ± spread)."""
    cells = []
    for t in m.manifest["tasks"]:
        key = f"{t['name']}/all/auc"
        d, base = m.res["recsys-moe trial"][key], m.res["recsys-moe default"][key]
        cells.append(f"{t['name']} {base:.4f} -> {d:.4f} ({d - base:+.4f}, spread "
                     f"{m.spread['recsys-moe trial'][key]:.4f})")  # fmt: skip
    sps = [m.speed[w]["samples_per_s"] for w in ("recsys-moe default", "recsys-moe trial")]
    return f"[trial] {name}: " + "; ".join(cells) + f"; samples/s {sps[0]:,.0f} -> {sps[1]:,.0f}"


@dataclass(frozen=True)
class Row:
    """One regime's (or real set's) results as the table needs them; kept as JSON under
    ``OUT`` so a table can be rebuilt (``--reuse``) without training again."""

    name: str
    half: str
    seeds: int
    tasks: list[str]
    domains: list[str]
    res: dict[str, dict[str, float]]
    spread: dict[str, dict[str, float]]
    speed: dict[str, dict[str, float]]
    oracle: dict[str, float] | None

    @classmethod
    def of(cls, name: str, half: str, seeds: int, m: Measured) -> Row:
        row = cls(name, half, seeds, [t["name"] for t in m.manifest["tasks"]],
                  list(m.manifest["domains"]), m.res, m.spread, m.speed, m.oracle)  # fmt: skip
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / f"{name}.json").write_text(json.dumps(asdict(row), indent=1))
        return row

    @classmethod
    def saved(cls, name: str, seeds: int) -> Row | None:
        path = OUT / f"{name}.json"
        if not path.exists():
            return None
        row = cls(**json.loads(path.read_text()))
        return row if row.seeds == seeds else None


def verdict(m: Row, who: str) -> tuple[list[float], float]:
    """``who`` minus the best peer's mean plus its seed spread, per task overall (>= 0: the
    acceptance bar met), and the worst task x domain cell minus the best peer's + spread.
    A cell no model has (a domain absent from the test window, or one class only in it)
    is left out."""
    peers = [n for n in m.res if n.startswith("torch-rechub")]
    overall, cells = [], []
    for t in m.tasks:
        for d in [*m.domains, "all"]:
            key = f"{t}/{d}/auc"
            if key not in m.res[who]:
                continue
            best = max(peers, key=lambda n: m.res[n].get(key, -1.0))
            margin = m.res[who][key] - m.res[best][key]
            (overall if d == "all" else cells).append(margin + (-1 if d == "all" else 1)
                                                      * m.spread[best].get(key, 0.0))  # fmt: skip
    return overall, min(cells)


def table(rows: list[Row], seeds: int) -> str:
    """One table: a row per regime (or real set) x task, a column per model."""
    models = [*MODELS, *(f"torch-rechub {p}" for p in PEERS)]
    head = (
        "| regime | half | task | "
        + " | ".join(models)
        + " | oracle | default − best peer − spread | worst cell |"
    )
    lines = [head, "|---|---|---|" + "---:|" * (len(models) + 3)]
    speed = ["| regime | " + " | ".join(models) + " | default / rechub MMoE |",
             "|---|" + "---:|" * (len(models) + 1)]  # fmt: skip
    summary = {"tune": [], "holdout": [], "real": []}
    for m in rows:
        name, half = m.name, m.half
        overall, worst = verdict(m, "recsys-moe default")
        summary[half].append(min(overall))
        for i, t in enumerate(m.tasks):
            key = f"{t}/all/auc"
            cells = [
                f"{m.res[w][key]:.4f} ± {m.spread[w][key]:.4f}" if w in m.res else "–"
                for w in models
            ]
            oracle = f"{m.oracle[key]:.4f}" if m.oracle and key in m.oracle else "–"
            tail = f"{overall[i]:+.4f} | {worst:+.4f}" if i == 0 else f"{overall[i]:+.4f} | "
            lines.append(f"| {name} | {half} | {t} | " + " | ".join(cells)
                         + f" | {oracle} | {tail} |")  # fmt: skip
        sps = [f"{m.speed[w]['samples_per_s']:,.0f}" if w in m.speed else "–" for w in models]
        ratio = (
            m.speed["recsys-moe default"]["samples_per_s"]
            / m.speed["torch-rechub MMOE"]["samples_per_s"]
        )
        speed.append(f"| {name} | " + " | ".join(sps) + f" | {ratio:.2f}x |")
    met = {h: f"{sum(v >= 0 for v in vs)} of {len(vs)}" for h, vs in summary.items() if vs}
    return "\n".join([
        f"Machine: {machine()}. Commit {commit()}. {seeds} seed(s) per model, test AUC over all "
        "domains as mean ± std over them, on the benches' own test window (the last 10% of "
        "time). Regimes: the generator at the sparse config's shape (250k rows, string ids, "
        "click + conversion funnel, 3 domains) with the knobs below, a generator seed each; "
        "`half` was fixed before any model ran (bench/quality/regimes.py). `recsys-moe "
        "default` / `sparse`: the [model] and [training] sections of configs/default.toml / "
        "configs/sparse.toml, trained by what `recsys-moe train` runs (on a real set: its "
        "own shipped config). `default − best peer − spread`: the default model's mean minus "
        "the best torch-rechub model's mean and its seed spread (≥ 0 meets the bar); `worst "
        "cell`: the lowest task x domain margin over the best peer's mean minus its spread "
        "(≥ 0 means no cell is below by more than the spread).",
        "",
        "Regimes: " + "; ".join(f"`{r.name}` ({r.half}): {r.what}" for r in REGIMES) + ".",
        "",
        "Every task above the best peer by its spread (`recsys-moe default`): "
        + ", ".join(f"{h} {v}" for h, v in met.items()) + ".",
        "",
        *lines,
        "",
        "Training samples/s (the training epochs only, same cores and batch):",
        "",
        *speed,
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--half", choices=("tune", "holdout", "all"), default="all")
    ap.add_argument("--regime", action="append", default=None, help="only these regimes (a trial)")
    ap.add_argument("--real", action="store_true", help="add the real datasets in ../shared/data")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reuse", action="store_true", help=f"take a regime's results from {OUT} "
                    "where a run with the same --seeds left them (rebuild the table)")  # fmt: skip
    ap.add_argument("--trial", action="append", default=None, metavar="SECTION.KEY=VALUE",
                    help="train the default model and the default model with these overrides, "
                    "no peers, on the tune half (not written to RESULTS)")  # fmt: skip
    args = ap.parse_args(argv)
    trial = None
    if args.trial:
        trial = {k: _value(v) for k, _, v in (t.partition("=") for t in args.trial)}
        if args.half != "tune" and not args.regime:
            ap.error("--trial runs on the tune half: add --half tune (the holdout is not tuned on)")
    rows = []
    for i, r in enumerate(REGIMES):
        if (args.regime and r.name not in args.regime) or args.half not in ("all", r.half):
            continue
        if trial:
            print(trial_line(r.name, run_regime(r, i, args.seeds, args.threads, trial, ())),
                  flush=True)  # fmt: skip
            continue
        row = Row.saved(r.name, args.seeds) if args.reuse else None
        rows.append(row or Row.of(r.name, r.half, args.seeds,
                                  run_regime(r, i, args.seeds, args.threads)))  # fmt: skip
        print(f"[regimes] {r.name} done ({len(rows)} so far)", flush=True)
    if args.real and not trial:
        for config, folder in REAL.items():
            name = Path(config).stem
            if (Path("../shared/data") / folder).exists():
                row = Row.saved(name, args.seeds) if args.reuse else None
                rows.append(row or Row.of(name, "real", args.seeds,
                                          run_real(config, args.seeds, args.threads)))  # fmt: skip
                print(f"[regimes] {name} done ({len(rows)} so far)", flush=True)
    if trial:
        return 0
    body = table(rows, args.seeds)
    print(body, flush=True)
    if args.half == "all" and not args.regime:
        write_section(
            "Quality: the regime suite against torch-rechub (bench/quality/regimes.py)", body
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
