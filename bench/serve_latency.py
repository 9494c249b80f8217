"""Ranking-service latency per serving layout, against the same ranker in-process, in one
run.

    python -m bench.serve_latency [--model models/default] [--requests 1500]

The service is started from ``serving/config.yaml`` (its segments and blends) serving the
bundle folder ``--model`` (the ``make train`` model), once per layout: every segment
``placement: inline`` (the rankers in the ingress replica) and every segment
``placement: deployment`` (a ranker deployment per segment behind the ingress). Each
request: a user drawn from the store's users (5% unknown), a domain, 100 distinct
candidate items (1 unknown in half the requests), context. Closed loop at fixed
concurrency levels (each client thread sends its next request when the previous answer
arrives, keep-alive HTTP), the clients on the same cores as the service.

In-process reference: the ranker's own work for a request (encode from the pre-encoded
arrays, the domain slice's forward, blend, sort, response) on the same requests, driven
at the same concurrency levels by a thread pool over one scorer (one torch thread, the
same cores). Floor: the same hops with a no-op ranker (``bench/serve_floor.py``), per
layout. Results go to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

import recsys_moe.cluster  # noqa: F401  (first: Ray reads its auth setting when imported)
from bench.common import machine, write_section

CANDIDATES = 100
LAYOUTS = ("inline", "deployment")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_requests(bundle: Path, n: int, seed: int = 0) -> list[dict]:
    from recsys_moe.scorer import Scorer

    sc = Scorer.from_dir(bundle)
    rng = np.random.default_rng(seed)
    users = sc.tables["users"][sc.spec.user_id].to_list()
    items = sc.tables["items"][sc.spec.item_id].to_list()
    domains = sc.model.spec.domains

    def unknown(known: list[Any]) -> Any:  # an id of the store's type it has never seen
        if isinstance(known[0], str):
            return f"unseen-{int(rng.integers(1e9))}"
        return max(known) + 1 + int(rng.integers(1e6))

    out = []
    for _ in range(n):
        u = users[int(rng.integers(len(users)))] if rng.random() > 0.05 else unknown(users)
        cands = [items[i] for i in rng.choice(len(items), size=CANDIDATES, replace=False)]
        if rng.random() < 0.5:
            cands[-1] = unknown(items)
        out.append({
            "user_id": u,
            "domain": str(rng.choice(domains)),
            "candidates": cands,
            "context": {"hour": str(int(rng.integers(24))), "device": str(rng.choice(["ios", "android", "web"]))},
        })  # fmt: skip
    return out


def _summary(lat: list[float], wall: float, errors: int, concurrency: int) -> dict:
    ms = np.array(lat) * 1e3
    return {
        "concurrency": concurrency,
        "requests": len(lat),
        "errors": errors,
        "p50": float(np.percentile(ms, 50)),
        "p95": float(np.percentile(ms, 95)),
        "p99": float(np.percentile(ms, 99)),
        "rps": len(lat) / wall,
    }


def closed_loop(call, reqs: list[dict], concurrency: int) -> dict:
    """``concurrency`` threads, each sending its next request when the last one returns;
    ``call(body)`` returns None on success or an error text."""
    lat: list[float] = []
    errors: list[str] = []
    it = iter(reqs)
    lock = threading.Lock()

    def client():
        while True:
            with lock:
                body = next(it, None)
            if body is None:
                return
            t = time.perf_counter()
            err = call(body)
            dt = time.perf_counter() - t
            with lock:
                (errors.append(err) if err else lat.append(dt))

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if not lat:
        raise RuntimeError(f"no request succeeded at concurrency {concurrency}: {errors[:3]}")
    return _summary(lat, wall, len(errors), concurrency)


def load(url: str, reqs: list[dict], concurrency: int) -> dict:
    """The service under a closed loop of HTTP clients (one keep-alive session each)."""
    from serving.client import RankingClient, RankingError

    local = threading.local()

    def call(body: dict) -> str | None:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = RankingClient(url, timeout_s=30, retries=0)
        try:
            client.rank(**body)
        except RankingError as e:
            return str(e)[:200]
        return None

    return closed_loop(call, reqs, concurrency)


def in_process(bundle: Path, reqs: list[dict], levels: list[int]) -> dict[int, dict]:
    """The rankers' work per request, no HTTP and no Serve, at each concurrency level."""
    import torch

    from recsys_moe.config import ScoringConfig
    from recsys_moe.scorer import Scorer
    from serving.app import rank_requests

    torch.set_num_threads(1)  # like one ranker replica
    sc = Scorer.from_dir(bundle)
    sc.slice_domains(sc.model.spec.domains)  # as the rankers serve
    blend = ScoringConfig()

    def call(r: dict) -> str | None:  # the rankers' own code, for a batch of one
        return rank_requests(sc, blend, [r], "local")[0][0].get("error")

    closed_loop(call, reqs[:100], 1)  # warm-up
    return {c: closed_loop(call, reqs, c) for c in levels}


def _row(label: str, r: dict, candidates: bool = True) -> str:
    cands = f"{r['rps'] * CANDIDATES:,.0f}" if candidates else ""
    return (
        f"| {label} | {r['concurrency']} | {r['p50']:.1f} | {r['p95']:.1f} | {r['p99']:.1f} | "
        f"{r['rps']:.0f} | {cands} | {r['errors']} |"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/default", help="a model bundle folder")
    ap.add_argument("--requests", type=int, default=1500, help="requests per concurrency level")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    args = ap.parse_args(argv)
    bundle = Path(args.model).resolve()
    if not (bundle / "model.json").exists():
        raise SystemExit(f"{bundle}: no model bundle (run `make train` first)")

    from ray import serve

    from bench import serve_floor
    from serving.run import DEFAULT, read_serve_config, start

    levels = args.concurrency
    reqs = make_requests(bundle, args.requests)
    local = in_process(bundle, reqs, levels)
    for c, r in local.items():
        print(f"in-process, concurrency {c:>2}: p50 {r['p50']:.2f} ms, p99 {r['p99']:.2f} ms, "
              f"{r['rps']:.0f} req/s", flush=True)  # fmt: skip

    service: dict[str, dict[int, dict]] = {}
    floor: dict[str, dict[int, dict]] = {}
    startup: dict[str, float] = {}
    base = read_serve_config(DEFAULT)
    for layout in args.layouts:
        raw = copy.deepcopy(base)
        raw["http_options"] = {"host": "127.0.0.1", "port": _port()}
        a = raw["applications"][0]["args"]
        a["model_dir"] = str(bundle)
        for seg in a["segments"]:
            seg["placement"] = layout
        t = time.perf_counter()
        url = start(raw)
        startup[layout] = time.perf_counter() - t
        load(url, reqs[:100], 4)  # warm-up: every replica, every code path
        service[layout] = {}
        for c in levels:
            r = service[layout][c] = load(url, reqs, c)
            print(f"{layout}, concurrency {c:>2}: p50 {r['p50']:.1f} ms  p95 {r['p95']:.1f} ms  "
                  f"p99 {r['p99']:.1f} ms  {r['rps']:.0f} req/s  errors {r['errors']}",
                  flush=True)  # fmt: skip
        serve.shutdown()
        floor_url = serve_floor.start(_port(), layout)
        load(floor_url, reqs[:100], 4)
        floor[layout] = {c: load(floor_url, reqs, c) for c in levels}
        for c, r in floor[layout].items():
            print(f"floor {layout}, concurrency {c:>2}: p50 {r['p50']:.1f} ms  p99 "
                  f"{r['p99']:.1f} ms  {r['rps']:.0f} req/s", flush=True)  # fmt: skip
        serve.shutdown()

    segs = base["applications"][0]["args"]["segments"]
    lines = [
        f"Machine: {machine()}. Model: `{args.model}` (the `make train` bundle). Service: "
        f"`serving/config.yaml`'s {len(segs)} segments, each layout in turn (`inline`: the "
        f"rankers in the one ingress replica; `deployment`: 1 ingress + {len(segs)} ranker "
        f"deployments x 1 replica), one torch thread per replica, Serve's request path tuned "
        f"by `recsys_moe/cluster.SERVE_ENV`; loopback HTTP with keep-alive, closed-loop "
        f"clients (`serving/client.py`) on the same 2 cores. {CANDIDATES} candidates per "
        f"request (users 5% unknown, 1 unknown item in half the requests); {args.requests} "
        f"requests per level after 100 warm-up; start-up excluded ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in startup.items())
        + "). In-process: the rankers' work per request (encode from the pre-encoded "
        "arrays, domain slice forward, blend, sort, response) by a thread pool over one "
        "scorer at the same concurrency, no HTTP. Floor: the same layout with a no-op "
        "ranker (`bench/serve_floor.py`).",
        "",
        "| path | concurrency | p50 ms | p95 ms | p99 ms | req/s | candidates/s | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in levels:
        lines.append(_row("in-process", local[c]))
    for layout in service:
        lines += [_row(f"service, {layout}", r) for r in service[layout].values()]
        lines += [_row(f"floor, {layout}", r, candidates=False) for r in floor[layout].values()]
    lines.append("")
    c8 = 8 if 8 in levels else levels[-1]
    c1 = 1 if 1 in levels else levels[0]
    best = min(service, key=lambda k: (service[k][c8]["p99"], service[k][c1]["p50"]))
    lines.append(
        f"In-process ranking, {CANDIDATES} candidates, one thread: p50 "
        f"{local[c1]['p50']:.2f} ms (target <= 3 ms)."
    )
    for layout in service:
        sv, fl = service[layout], floor[layout]
        lines.append(
            f"- `{layout}`: p50 at concurrency {c1} {sv[c1]['p50']:.1f} ms = "
            f"{sv[c1]['p50'] / local[c1]['p50']:.2f}x in-process (target <= 2x); at "
            f"concurrency {c8} p99 {sv[c8]['p99']:.1f} ms (target < 50 ms; this layout's "
            f"floor {fl[c8]['p99']:.1f} ms, ratio {sv[c8]['p99'] / fl[c8]['p99']:.2f}x, "
            f"fallback target <= 1.3x), {sv[c8]['rps']:.0f} req/s = "
            f"{sv[c8]['rps'] / local[c8]['rps']:.2f}x in-process throughput."
        )
    lines.append(f"\nFaster layout on this machine: `{best}` (lower p99 at concurrency {c8}).")
    write_section("Serving latency (Ray Serve vs in-process)", "\n".join(lines))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    raise SystemExit(main())
