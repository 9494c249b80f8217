"""Soak: the ranking service as `make serve` runs it, for minutes at a fixed concurrency,
with a hot swap of the champion in the middle.

    python -m bench.soak [--model models/default] [--minutes 10] [--concurrency 16]

The bundle ``--model`` (the ``make train`` model) is logged and registered twice, as
versions 1 and 2 of ``recsys_moe_default``, in a temporary MLflow store (never the
repository's ``mlruns/``); version 1 is ``@champion``. The service starts from
``serving/config.yaml`` unchanged (HAProxy ingress, inline rankers, ``poll_s`` as
shipped) over that store. ``wrk`` (one thread, ``--concurrency`` connections, a new
run per minute) posts the same kind of requests as bench/serve_latency.py. Halfway
through, ``@champion`` moves to version 2: every ranker must swap to it without an error.

Per minute: requests, req/s, latency percentiles, errors (connection, timeout or any
non-2xx answer) and the resident memory of the ingress replica (the process that holds
the rankers). Targets (issue 27): zero errors; that memory at the end within 5% of its
value after warm-up. Results go to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import recsys_moe.cluster  # noqa: F401  (first: Ray reads its auth setting when imported)
from bench.common import machine, write_section


def register_twice(bundle: Path, store: Path) -> tuple[str, str]:
    """Versions 1 and 2 of the config's model, both ``bundle``, in the tracking store the
    environment names; ``@champion`` on 1. Returns (model name, alias)."""
    import mlflow

    from features.store import held_out_split, load_manifest, read_examples
    from recsys_moe import registry
    from recsys_moe.config import load_config
    from recsys_moe.tracking import Tracker

    cfg = load_config("configs/default.toml")
    rows = read_examples(store, held_out_split(load_manifest(store))).head(5)
    versions = []
    for v in (1, 2):
        with Tracker.open(cfg, f"soak-v{v}") as tracker:
            tracker.log_model(bundle, rows)
            versions.append(registry.register(tracker.model_info.model_uri, cfg.model_name,
                                              {"run_id": tracker.run_id}))  # fmt: skip
    alias = cfg.serving.model_alias
    mlflow.MlflowClient().set_registered_model_alias(cfg.model_name, alias, versions[0])
    return cfg.model_name, alias


def replica() -> Any:
    """The ingress replica's process (the rankers live in it: every segment inline)."""
    import psutil

    for p in psutil.process_iter(["name", "cmdline"]):
        text = " ".join([p.info["name"] or "", *(p.info["cmdline"] or [])])
        if "ServeReplica:ranking:Ingress" in text:
            return p
    raise RuntimeError("no ingress replica process found")


def served_versions(url: str) -> set[str]:
    import requests

    body = requests.get(f"{url}/readyz", timeout=10).json()
    parts = [body["router"], *body["segments"].values()]
    return {str(p.get("model_version")) for p in parts}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/default", help="a model bundle folder")
    ap.add_argument("--store", default="data/features/default",
                    help="its feature store (example rows for the logged model)")  # fmt: skip
    ap.add_argument("--minutes", type=int, default=10)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--warmup-s", type=float, default=30)
    args = ap.parse_args(argv)
    bundle = Path(args.model).resolve()
    if not (bundle / "model.json").exists():
        raise SystemExit(f"{bundle}: no model bundle (run `make train` first)")
    from bench import wrk

    if not wrk.available():
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    from ray import serve

    from bench.serve_latency import make_requests
    from recsys_moe.cluster import free_port, ingress
    from serving.run import DEFAULT, read_serve_config, start

    tmp = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    name, alias = register_twice(bundle, Path(args.store))
    reqs = make_requests(bundle, 2000)
    raw = read_serve_config(DEFAULT)
    raw["http_options"]["port"] = free_port()
    a = raw["applications"][0]["args"]
    a.update(model_name=name, model_alias=alias, tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    url = start(raw)
    print(f"soak: service at {url} ({ingress()}), version {served_versions(url)}", flush=True)
    wrk.run(url, reqs, args.concurrency, args.warmup_s)
    proc = replica()
    rss0 = proc.memory_info().rss
    swap_at = args.minutes * 60 / 2
    t0 = time.monotonic()
    swapped: dict[str, float] = {}

    def swap() -> None:
        import mlflow

        time.sleep(swap_at)
        mlflow.MlflowClient().set_registered_model_alias(name, alias, "2")
        swapped["moved"] = time.monotonic() - t0
        while served_versions(url) != {"2"}:
            time.sleep(0.5)
        swapped["served"] = time.monotonic() - t0

    mover = threading.Thread(target=swap, daemon=True)
    mover.start()
    minutes = []
    for m in range(args.minutes):
        r = wrk.run(url, reqs, args.concurrency, 60)
        r["rss"] = proc.memory_info().rss
        r["minute"] = m + 1
        minutes.append(r)
        print(f"soak minute {m + 1}: {r['rps']:.0f} req/s, p50 {r['p50']:.1f} ms, p99 "
              f"{r['p99']:.1f} ms, errors {r['errors']}, replica RSS "
              f"{r['rss'] / 2**20:.0f} MiB", flush=True)  # fmt: skip
    mover.join(timeout=120)
    end = served_versions(url)
    serve.shutdown()

    errors = sum(r["errors"] for r in minutes)
    growth = minutes[-1]["rss"] / rss0 - 1
    swap_min = int(swapped.get("moved", 0) // 60) + 1
    lines = [
        f"Machine: {machine()}. Model: `{args.model}` (the `make train` bundle), registered "
        f"twice in a temporary MLflow store; the service from `serving/config.yaml` as "
        f"shipped ({ingress()} ingress, {len(a['segments'])} inline segments, poll every "
        f"{a.get('poll_s', 10)} s). `wrk`, one thread, {args.concurrency} connections, a new "
        f"60 s run per minute, after {args.warmup_s:g} s of warm-up; 100 candidates per "
        f"request. `@{alias}` moved from version 1 to 2 at "
        f"{swapped.get('moved', float('nan')):.0f} s (minute {swap_min}); every ranker "
        f"served version 2 from {swapped.get('served', float('nan')):.0f} s; versions "
        f"served at the end: {sorted(end)}. RSS: the ingress replica (all rankers), "
        f"{rss0 / 2**20:.0f} MiB after warm-up.",
        "",
        "| minute | requests | req/s | p50 ms | p95 ms | p99 ms | errors | replica RSS MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in minutes:
        mark = " (swap)" if r["minute"] == swap_min else ""
        lines.append(
            f"| {r['minute']}{mark} | {r['requests']:,} | {r['rps']:.0f} | {r['p50']:.1f} | "
            f"{r['p95']:.1f} | {r['p99']:.1f} | {r['errors']} | {r['rss'] / 2**20:.0f} |"
        )
    lines += [
        "",
        f"Errors: {errors} of {sum(r['requests'] for r in minutes):,} requests (target 0: "
        f"{'met' if errors == 0 else 'not met'}). Replica RSS {rss0 / 2**20:.0f} -> "
        f"{minutes[-1]['rss'] / 2**20:.0f} MiB, {100 * growth:+.1f}% (target < 5%: "
        f"{'met' if growth < 0.05 else 'not met'}).",
    ]
    write_section("Serving soak (bench/soak.py)", "\n".join(lines))
    return 0 if errors == 0 and growth < 0.05 else 1


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    raise SystemExit(main())
