"""Ranking-service latency: a bounded load test of the Ray Serve application on loopback,
and the same model scoring the same requests in-process, in one run.

    python -m bench.serve_latency [--model models/default] [--requests 2000]

The service is started from ``serving/config.yaml`` (its segments and blends) serving the
bundle folder ``--model`` (the ``make train`` model). Each request: a user drawn from the
store's users (5% unknown), a domain, 100 distinct candidate items (2% unknown), context.
Fixed concurrency levels (closed loop: each client thread sends its next request when the
previous answer arrives, keep-alive HTTP). In-process: one Python loop calling
``Scorer.score_frame`` on the same requests' rows (no HTTP, no Serve), the reference for
the overhead ratio. Results go to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import requests

from bench.common import machine, write_section

CANDIDATES = 100


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_requests(bundle: Path, n: int, seed: int = 0) -> list[dict]:
    from recsys_moe.scorer import Scorer

    sc = Scorer.from_dir(bundle)
    rng = np.random.default_rng(seed)
    users = sc.tables["users"][sc.spec.user_id].to_numpy()
    items = sc.tables["items"][sc.spec.item_id].to_numpy()
    domains = sc.model.spec.domains
    out = []
    for _ in range(n):
        u = (
            int(rng.choice(users))
            if rng.random() > 0.05
            else int(users.max()) + 1 + int(rng.integers(1e6))
        )
        cands = rng.choice(items, size=CANDIDATES, replace=False).astype(int).tolist()
        if rng.random() < 0.5:
            cands[-1] = int(items.max()) + 1 + int(rng.integers(1e6))  # an unknown item
        out.append({
            "user_id": u,
            "domain": str(rng.choice(domains)),
            "candidates": cands,
            "context": {"hour": str(int(rng.integers(24))), "device": str(rng.choice(["ios", "android", "web"]))},
        })  # fmt: skip
    return out


def load(url: str, reqs: list[dict], concurrency: int) -> dict:
    lat: list[float] = []
    errors: list[str] = []
    it = iter(reqs)
    lock = threading.Lock()

    def client():
        s = requests.Session()
        while True:
            with lock:
                body = next(it, None)
            if body is None:
                return
            t = time.perf_counter()
            r = s.post(f"{url}/rank", json=body, timeout=30)
            dt = time.perf_counter() - t
            with lock:
                if r.status_code == 200:
                    lat.append(dt)
                else:
                    errors.append(r.text[:200])

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if not lat:
        raise RuntimeError(f"no request succeeded at concurrency {concurrency}: {errors[:3]}")
    ms = np.array(lat) * 1e3
    return {
        "concurrency": concurrency,
        "requests": len(lat),
        "errors": len(errors),
        "p50": float(np.percentile(ms, 50)),
        "p95": float(np.percentile(ms, 95)),
        "p99": float(np.percentile(ms, 99)),
        "rps": len(lat) / wall,
    }


def in_process(bundle: Path, reqs: list[dict]) -> dict:
    import torch

    from recsys_moe.config import ScoringConfig
    from recsys_moe.scorer import Scorer
    from serving.app import _rows as request_rows

    torch.set_num_threads(1)  # like one ranker replica
    sc = Scorer.from_dir(bundle)
    blend = ScoringConfig()
    lat = []
    t0 = time.perf_counter()
    for r in reqs:
        t = time.perf_counter()
        scored = sc.score_frame(request_rows(r, sc), blend)  # the rows a ranker builds
        scored["score"].to_numpy().argsort()
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    ms = np.array(lat) * 1e3
    return {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
            "rps": len(reqs) / wall}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/default", help="a model bundle folder")
    ap.add_argument("--requests", type=int, default=2000, help="requests per concurrency level")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    args = ap.parse_args(argv)
    bundle = Path(args.model).resolve()
    if not (bundle / "model.json").exists():
        raise SystemExit(f"{bundle}: no model bundle (run `make train` first)")

    from ray import serve

    from serving.run import DEFAULT, read_serve_config, start

    reqs = make_requests(bundle, args.requests)
    local = in_process(bundle, reqs[: min(500, len(reqs))])
    print(f"in-process: p50 {local['p50']:.2f} ms, p99 {local['p99']:.2f} ms, "
          f"{local['rps']:.0f} req/s", flush=True)  # fmt: skip

    raw = copy.deepcopy(read_serve_config(DEFAULT))
    raw["http_options"] = {"host": "127.0.0.1", "port": _port()}
    raw["applications"][0]["args"]["model_dir"] = str(bundle)
    t = time.perf_counter()
    url = start(raw)
    startup = time.perf_counter() - t
    load(url, reqs[:100], 4)  # warm-up: every replica, every code path
    results = []
    for c in args.concurrency:
        r = load(url, reqs, c)
        results.append(r)
        print(f"concurrency {c:>2}: p50 {r['p50']:.1f} ms  p95 {r['p95']:.1f} ms  p99 "
              f"{r['p99']:.1f} ms  {r['rps']:.0f} req/s  {r['rps'] * CANDIDATES:,.0f} "
              f"candidates/s  errors {r['errors']}", flush=True)  # fmt: skip
    serve.shutdown()
    # the architecture's floor: the same hops with a ranker that does nothing
    from bench import serve_floor

    floor_url = serve_floor.start(_port())
    load(floor_url, reqs[:100], 4)
    floor = {c: load(floor_url, reqs, c) for c in args.concurrency}
    for c, r in floor.items():
        print(f"floor (no-op ranker), concurrency {c:>2}: p50 {r['p50']:.1f} ms  p99 "
              f"{r['p99']:.1f} ms  {r['rps']:.0f} req/s", flush=True)  # fmt: skip
    serve.shutdown()

    segs = raw["applications"][0]["args"]["segments"]
    lines = [
        f"Machine: {machine()}. Model: `{args.model}` (the `make train` bundle). Service: "
        f"`serving/config.yaml` ({len(segs)} ranker segments x 1 replica + 1 ingress, one "
        f"torch thread per replica; Serve's request path tuned by `recsys_moe/cluster.SERVE_ENV`), "
        f"loopback HTTP with keep-alive, closed-loop clients in "
        f"the same machine (they share the 2 cores). {CANDIDATES} candidates per request "
        f"(users 5% unknown, 1 unknown item in half the requests); {args.requests} requests "
        f"per level after 100 warm-up; Serve start-up {startup:.0f} s (excluded).",
        "",
        "| concurrency | p50 ms | p95 ms | p99 ms | req/s | candidates/s | errors |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['concurrency']} | {r['p50']:.1f} | {r['p95']:.1f} | {r['p99']:.1f} | "
            f"{r['rps']:.0f} | {r['rps'] * CANDIDATES:,.0f} | {r['errors']} |"
        )
    lines.append(
        f"| in-process (1 thread, no HTTP) | {local['p50']:.1f} | | {local['p99']:.1f} | "
        f"{local['rps']:.0f} | {local['rps'] * CANDIDATES:,.0f} | |"
    )
    for c, r in floor.items():
        lines.append(
            f"| floor, no-op ranker, c={c} (bench/serve_floor.py) | {r['p50']:.1f} | "
            f"{r['p95']:.1f} | {r['p99']:.1f} | {r['rps']:.0f} | | {r['errors']} |"
        )
    at8 = next((r for r in results if r["concurrency"] == 8), results[-1])
    lines += [
        "",
        f"At concurrency {at8['concurrency']}: p99 {at8['p99']:.1f} ms (target < 50 ms); "
        f"Serve overhead: in-process req/s / Serve req/s = {local['rps'] / at8['rps']:.2f}x, "
        f"p50 latency ratio {at8['p50'] / local['p50']:.2f}x (target: overhead < 2x).",
        f"The same hops with a ranker that does no work reach p99 "
        f"{floor[at8['concurrency']]['p99']:.1f} ms at concurrency {at8['concurrency']} "
        f"({floor[at8['concurrency']]['rps']:.0f} req/s): the floor of this architecture "
        f"(proxy, ingress, handle call, client) on this machine.",
    ]
    write_section("Serving latency (Ray Serve vs in-process)", "\n".join(lines))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    raise SystemExit(main())
