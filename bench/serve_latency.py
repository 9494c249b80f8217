"""Ranking-service latency per ingress and serving layout, against the same ranker
in-process, in one run.

    python -m bench.serve_latency [--model models/default] [--seconds 10] [--requests 600]
    python -m bench.serve_latency --shadow [--concurrency 1 8] [--rounds 3]

The service is started from ``serving/config.yaml`` (its segments and blends) serving the
bundle folder ``--model`` (the ``make train`` model), for each HTTP ingress (``haproxy``,
the default, and Serve's own ``proxy``: a local Ray of its own each) and each layout:
every segment ``placement: inline`` (the rankers in the ingress replica: the shipped
config) and every segment ``placement: deployment`` (a ranker deployment per segment
behind the ingress). Each request: a user drawn from the store's users (5% unknown), a
domain, 100 distinct candidate items (1 unknown in half the requests), context. Closed
loop at fixed concurrency levels (each connection sends its next request when the
previous answer arrives, keep-alive HTTP), the clients on the same cores as the service,
by two generators: ``wrk`` (compiled, one thread, ``--seconds`` per level;
bench/wrk.py) and the Python client (``serving/client.py`` in threads, ``--requests``
per level). Each row carries its client's own CPU as a share of the machine.

In-process reference: the ranker's own work for a request (encode from the pre-encoded
arrays, the domain slice's forward, blend, sort, response) on the same requests, driven
at the same concurrency levels by a thread pool over one scorer (one torch thread, the
same cores). Floor: the same hops with a no-op ranker (``bench/serve_floor.py``), per
ingress, layout and generator. ``--shadow``: only the shipped service without and with a
shadow challenger in every segment, alternated, by ``wrk`` (a section of its own).
Results go to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

import recsys_moe.cluster  # noqa: F401  (first: Ray reads its auth setting when imported)
from bench.common import machine, write_section
from recsys_moe.cluster import free_port

CANDIDATES = 100
LAYOUTS = ("inline", "deployment")
INGRESSES = ("haproxy", "proxy")
CORES = os.cpu_count() or 1


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


def _row(label: str, ingress: str, client: str, r: dict, candidates: bool = True) -> str:
    cands = f"{r['rps'] * CANDIDATES:,.0f}" if candidates else ""
    cpu = f"{100 * r['client_cpu']:.0f}%" if r.get("client_cpu") is not None else ""
    return (
        f"| {label} | {ingress} | {client} | {r['concurrency']} | {r['p50']:.1f} | "
        f"{r['p95']:.1f} | {r['p99']:.1f} | {r['rps']:.0f} | {cands} | {cpu} | {r['errors']} |"
    )


def measure(url: str, reqs: list[dict], levels: list[int], seconds: float,
            python_client: bool) -> dict[str, dict[int, dict]]:  # fmt: skip
    """The service at ``url`` at each level, by each generator: {client: {c: summary}},
    each summary with ``client_cpu``, the client's CPU seconds per second of wall time
    over the machine's cores."""
    from bench import wrk

    out: dict[str, dict[int, dict]] = {}
    if wrk.available():
        out["wrk"] = {}
        for c in levels:
            r = wrk.run(url, reqs, c, seconds)
            r["client_cpu"] = r["client_cpu_s"] / (r["wall_s"] * CORES)
            out["wrk"][c] = r
    if python_client:
        out["python"] = {}
        for c in levels:
            cpu, t = time.process_time(), time.perf_counter()
            r = load(url, reqs, c)
            r["client_cpu"] = (time.process_time() - cpu) / ((time.perf_counter() - t) * CORES)
            out["python"][c] = r
    return out


def _service_config(
    bundle: Path, layout: str, max_batch_size: int | None = None, shadow_log: str | None = None
) -> dict:
    """The shipped serve config over ``bundle``; ``shadow_log``: every segment with a
    shadow challenger (with ``model_dir`` the same bundle, loaded a second time: the
    cost of a challenger of the champion's size) and the online log in that folder."""
    from serving.run import DEFAULT, read_serve_config

    raw = read_serve_config(DEFAULT)
    raw["http_options"] = {"host": "127.0.0.1", "port": free_port()}
    a = raw["applications"][0]["args"]
    a["model_dir"] = str(bundle)
    if shadow_log is not None:
        a["online_log_dir"] = shadow_log
    for seg in a["segments"]:
        seg["placement"] = layout
        if max_batch_size is not None:
            seg["max_batch_size"] = max_batch_size
        if shadow_log is not None:
            seg.update(challenger_alias="challenger", challenger_mode="shadow")
    return raw


def shadow_cost(bundle: Path, reqs: list[dict], levels: list[int], seconds: float,
                rounds: int) -> dict[str, list[dict[int, dict]]]:  # fmt: skip
    """The shipped service (HAProxy, inline) without and with a shadow challenger,
    alternated ``rounds`` times in one local Ray (the machine drifts between runs):
    {"plain" | "shadow": [{concurrency: wrk summary}, ...]}."""
    import tempfile

    import ray
    from ray import serve

    from serving.run import start

    os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
    out: dict[str, list[dict[int, dict]]] = {"plain": [], "shadow": []}
    try:
        with tempfile.TemporaryDirectory() as log_dir:
            for _ in range(rounds):
                for label in out:
                    cfg = _service_config(bundle, "inline",
                                          shadow_log=log_dir if label == "shadow" else None)  # fmt: skip
                    url = start(cfg)
                    load(url, reqs[:100], 4)
                    by_client = measure(url, reqs, levels, seconds, python_client=False)
                    out[label].append(by_client["wrk"])
                    _print(f"haproxy inline {label}", by_client)
                    serve.shutdown()
    finally:
        ray.shutdown()
        del os.environ["RAY_SERVE_ENABLE_HA_PROXY"]
    return out


def shadow_section(runs: dict[str, list[dict[int, dict]]], levels: list[int], args) -> str:
    from serving.app import SHADOW_BATCH, SHADOW_FLUSH_S

    def med(label: str, c: int, key: str) -> float:
        return float(np.median([r[c][key] for r in runs[label]]))

    lines = [
        f"Machine: {machine()}. Model: `{args.model}`. The shipped `serving/config.yaml` "
        f"(HAProxy ingress, every segment inline) without and with a shadow challenger in "
        f"every segment (the same bundle loaded a second time: a challenger of the "
        f"champion's size; the online log on, writing both versions' scores); "
        f"{len(runs['plain'])} alternating rounds of each in one local Ray, `wrk` "
        f"({args.seconds:g} s per level), {CANDIDATES} candidates per request; medians over "
        f"the rounds. The challengers score in the one `ShadowScorer` process (Linux's idle "
        f"scheduling class), which the answering replica feeds one call per "
        f"{SHADOW_FLUSH_S:g} s or {SHADOW_BATCH} requests.",
        "",
        "| concurrency | p50 ms, champion only | p50 ms, with shadow | p50 ratio | "
        "p99 ms, champion only | p99 ms, with shadow | req/s, champion only | "
        "req/s, with shadow |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in levels:
        a, b = med("plain", c, "p50"), med("shadow", c, "p50")
        lines.append(f"| {c} | {a:.1f} | {b:.1f} | {b / a:.2f}x | {med('plain', c, 'p99'):.1f} | "
                     f"{med('shadow', c, 'p99'):.1f} | {med('plain', c, 'rps'):.0f} | "
                     f"{med('shadow', c, 'rps'):.0f} |")  # fmt: skip
    c1 = levels[0]
    ratio = med("shadow", c1, "p50") / med("plain", c1, "p50")
    lines += ["", f"The champion's p50 at concurrency {c1} with a shadow challenger: "
              f"{ratio:.2f}x its p50 without one (target <= 1.10x: "
              f"{'met' if ratio <= 1.10 else 'not met'})."]  # fmt: skip
    return "\n".join(lines)


def run_ingress(ingress: str, bundle: Path, reqs: list[dict], args) -> dict:
    """Every layout's service and floor behind ``ingress``, in a local Ray of its own
    (started by the first service, as `recsys-moe serve` starts it)."""
    import ray
    from ray import serve

    from bench import serve_floor
    from serving.run import start

    os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1" if ingress == "haproxy" else "0"
    res: dict = {"service": {}, "floor": {}, "startup": {}}
    try:
        for layout in args.layouts:
            t = time.perf_counter()
            url = start(_service_config(bundle, layout))
            res["startup"][layout] = time.perf_counter() - t
            load(url, reqs[:100], 4)  # warm-up: every replica, every code path
            res["service"][layout] = measure(url, reqs, args.concurrency, args.seconds,
                                             args.python_client)  # fmt: skip
            _print(f"{ingress} {layout}", res["service"][layout])
            serve.shutdown()
            floor_url = serve_floor.start(free_port(), layout)
            load(floor_url, reqs[:100], 4)
            res["floor"][layout] = measure(floor_url, reqs, args.concurrency, args.seconds,
                                           args.python_client)  # fmt: skip
            _print(f"{ingress} floor {layout}", res["floor"][layout])
            serve.shutdown()
        if args.unbatched and ingress == INGRESSES[0] and "inline" in args.layouts:
            # what batching concurrent requests into one forward per domain buys: the
            # shipped layout with every ranker taking one request at a time
            url = start(_service_config(bundle, "inline", max_batch_size=1))
            load(url, reqs[:100], 4)
            res["unbatched"] = measure(url, reqs, args.concurrency, args.seconds, False)
            _print(f"{ingress} inline, one request per forward", res["unbatched"])
            serve.shutdown()
    finally:
        ray.shutdown()
        del os.environ["RAY_SERVE_ENABLE_HA_PROXY"]
    return res


def _print(what: str, by_client: dict[str, dict[int, dict]]) -> None:
    for client, levels in by_client.items():
        for c, r in levels.items():
            print(f"{what}, {client}, concurrency {c:>2}: p50 {r['p50']:.1f} ms  p99 "
                  f"{r['p99']:.1f} ms  {r['rps']:.0f} req/s  client CPU "
                  f"{100 * r['client_cpu']:.0f}%  errors {r['errors']}", flush=True)  # fmt: skip


def verdict(local: dict[int, dict], sv: dict[int, dict], fl: dict[int, dict], c1: int,
            c8: int) -> str:  # fmt: skip
    """The issue's three targets for one ingress x layout x generator."""
    p50_bar = 2 * local[c1]["p50"] + fl[c1]["p50"]
    p99_ok = sv[c8]["p99"] < 50 or sv[c8]["p99"] <= 1.3 * fl[c8]["p99"]
    rps = sv[c8]["rps"] / local[c8]["rps"]
    return (
        f"p50 at concurrency {c1} {sv[c1]['p50']:.1f} ms (target <= 2 x in-process "
        f"{local[c1]['p50']:.1f} + floor {fl[c1]['p50']:.1f} = {p50_bar:.1f} ms: "
        f"{'met' if sv[c1]['p50'] <= p50_bar else 'not met'}); p99 at concurrency {c8} "
        f"{sv[c8]['p99']:.1f} ms (target < 50 ms, or <= 1.3 x the floor's "
        f"{fl[c8]['p99']:.1f} ms = {1.3 * fl[c8]['p99']:.1f}: {'met' if p99_ok else 'not met'}); "
        f"{sv[c8]['rps']:.0f} req/s at concurrency {c8} = {rps:.2f}x in-process (target >= "
        f"0.8x: {'met' if rps >= 0.8 else 'not met'})"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/default", help="a model bundle folder")
    ap.add_argument("--seconds", type=float, default=10, help="wrk: seconds per level")
    ap.add_argument("--requests", type=int, default=600,
                    help="Python client: requests per level (also the wrk request pool)")  # fmt: skip
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    ap.add_argument("--ingresses", nargs="+", default=list(INGRESSES), choices=INGRESSES)
    ap.add_argument("--no-python-client", dest="python_client", action="store_false",
                    help="wrk only")  # fmt: skip
    ap.add_argument("--no-unbatched", dest="unbatched", action="store_false",
                    help="skip the run with batching off (max_batch_size 1)")  # fmt: skip
    ap.add_argument("--shadow", action="store_true",
                    help="only the cost of a shadow challenger (its own RESULTS section)")  # fmt: skip
    ap.add_argument("--rounds", type=int, default=3, help="--shadow: alternating rounds")
    args = ap.parse_args(argv)
    bundle = Path(args.model).resolve()
    if not (bundle / "model.json").exists():
        raise SystemExit(f"{bundle}: no model bundle (run `make train` first)")
    from bench import wrk

    if not wrk.available() and not args.python_client:
        raise SystemExit("wrk is not installed (apt-get install wrk) and --no-python-client")
    levels = args.concurrency
    if args.shadow:
        if not wrk.available():
            raise SystemExit("--shadow measures with wrk: apt-get install wrk")
        reqs = make_requests(bundle, args.requests)
        runs = shadow_cost(bundle, reqs, levels, args.seconds, args.rounds)
        write_section("Serving: the cost of a shadow challenger (bench/serve_latency.py --shadow)",
                      shadow_section(runs, levels, args))  # fmt: skip
        return 0
    reqs = make_requests(bundle, args.requests)
    local = in_process(bundle, reqs, levels)
    for c, r in local.items():
        print(f"in-process, concurrency {c:>2}: p50 {r['p50']:.2f} ms, p99 {r['p99']:.2f} ms, "
              f"{r['rps']:.0f} req/s", flush=True)  # fmt: skip
    runs = {ingress: run_ingress(ingress, bundle, reqs, args) for ingress in args.ingresses}

    from serving.run import DEFAULT, read_serve_config

    segs = read_serve_config(DEFAULT)["applications"][0]["args"]["segments"]
    startup = ", ".join(f"{i} {lay} {v:.0f} s" for i, r in runs.items()
                        for lay, v in r["startup"].items())  # fmt: skip
    clients = []
    if wrk.available():
        clients.append(f"`wrk` (one thread; {args.seconds:g} s per level)")
    if args.python_client:
        clients.append(f"the Python client (`serving/client.py`, threads; {args.requests} "
                       f"requests per level)")  # fmt: skip
    lines = [
        f"Machine: {machine()}. Model: `{args.model}` (the `make train` bundle). Service: "
        f"`serving/config.yaml`'s {len(segs)} segments behind each ingress (`haproxy`: "
        f"HAProxy hands requests to the ingress replica's own HTTP server, the default; "
        f"`proxy`: Serve's Python proxy), each layout in turn (`inline`: the rankers in the "
        f"one ingress replica, as shipped; `deployment`: 1 ingress + {len(segs)} ranker "
        f"deployments x 1 replica), one torch thread per replica. Loopback HTTP with "
        f"keep-alive, closed loops on the same {CORES} cores: "
        + " and ".join(clients)
        + f"; client CPU = the generator's own CPU time over the machine's {CORES} cores. "
        f"{CANDIDATES} candidates per request (users 5% unknown, 1 unknown item in half "
        f"the requests); 100 warm-up requests; start-up excluded ({startup}). In-process: "
        f"the rankers' work per request (encode from the pre-encoded arrays, domain slice "
        f"forward, blend, sort, response) by a thread pool over one scorer at the same "
        f"concurrency, one request per call, no HTTP. Floor: the same ingress and layout "
        f"with a no-op ranker (`bench/serve_floor.py`), same generator.",
        "",
        "| path | ingress | client | concurrency | p50 ms | p95 ms | p99 ms | req/s | "
        "candidates/s | client CPU | errors |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [_row("in-process", "", "", local[c]) for c in levels]
    for ingress, res in runs.items():
        for layout in res["service"]:
            for client, by_c in res["service"][layout].items():
                lines += [_row(f"service, {layout}", ingress, client, r) for r in by_c.values()]
                lines += [_row(f"floor, {layout}", ingress, client, r, candidates=False)
                          for r in res["floor"][layout][client].values()]  # fmt: skip
    for ingress, res in runs.items():
        for client, by_c in res.get("unbatched", {}).items():
            lines += [_row("service, inline, max_batch_size 1", ingress, client, r)
                      for r in by_c.values()]  # fmt: skip
    c8 = 8 if 8 in levels else levels[-1]
    c1 = 1 if 1 in levels else levels[0]
    lines += ["", f"In-process ranking, {CANDIDATES} candidates, one thread: p50 "
              f"{local[c1]['p50']:.2f} ms at concurrency {c1}, {local[c8]['rps']:.0f} req/s "
              f"at {c8}. Targets (issue 27), per ingress, layout and generator:"]  # fmt: skip
    for ingress, res in runs.items():
        for layout in res["service"]:
            for client in res["service"][layout]:
                sv, fl = res["service"][layout][client], res["floor"][layout][client]
                lines.append(f"- {ingress}, `{layout}`, {client}: "
                             + verdict(local, sv, fl, c1, c8) + ".")  # fmt: skip
    for ingress, res in runs.items():
        if "unbatched" not in res:
            continue
        for client, one in res["unbatched"].items():
            batched = res["service"]["inline"][client]
            lines.append(f"- Batching ({ingress}, `inline`, {client}): req/s with the "
                         f"shipped batching / one request per forward: " + ", ".join(
                             f"{batched[c]['rps']:.0f} / {one[c]['rps']:.0f} at {c}"
                             for c in levels) + ".")  # fmt: skip
    write_section("Serving latency (Ray Serve vs in-process)", "\n".join(lines))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    raise SystemExit(main())
