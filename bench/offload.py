"""Expert offloading: resident expert memory and per-request latency at a domain mix.

    python -m bench.offload [--requests 1000]

A STAR-style model (shared experts plus each domain's own, sized so the domain experts
dominate) over the default store's inputs scores 100-candidate requests whose domains
follow a skewed mix (feed 70%, search 20%, video 10%), with every domain's slice
resident, and with the slices offloaded to disk under an LRU of 1 and 2 domains. The
weights are random (memory and latency do not depend on them). Results go to
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

import numpy as np
import torch

from bench.common import machine, write_section

MIX = {"feed": 0.7, "search": 0.2, "video": 0.1}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default.toml")
    ap.add_argument("--requests", type=int, default=1000)
    args = ap.parse_args(argv)

    from features.store import load_manifest, read_examples
    from recsys_moe.config import load_config
    from recsys_moe.model.inputs import ExampleTensors, InputSpec
    from recsys_moe.model.offload import DomainSliceCache
    from recsys_moe.model.ranker import RankingModel
    from recsys_moe.model.slicing import domain_slice
    from recsys_moe.training import predict

    torch.set_num_threads(1)
    cfg = load_config(args.config)
    store = cfg.features.store_dir
    spec = InputSpec.from_manifest(load_manifest(store))
    mcfg = dataclasses.replace(cfg.model, arch="star", shared_experts=2, specific_experts=8,
                               expert_hidden=[256, 128])  # fmt: skip
    torch.manual_seed(0)
    model = RankingModel(spec, mcfg).eval()
    test = read_examples(store, "test")
    by_domain = {}
    for name in MIX:
        k = spec.domains.index(name) + 1
        rows = np.flatnonzero(test[spec.domain_column].to_numpy() == k)[:100]
        by_domain[k] = ExampleTensors(spec, test[rows])
    rng = np.random.default_rng(0)
    ks = [spec.domains.index(n) + 1 for n in MIX]
    seq = rng.choice(ks, size=args.requests, p=list(MIX.values()))

    def run(get) -> tuple[float, float]:
        lat = []
        for k in seq:
            t = time.perf_counter()
            predict(get(int(k)), by_domain[int(k)], 256)
            lat.append(time.perf_counter() - t)
        ms = np.array(lat) * 1e3
        return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))

    resident = {k: domain_slice(model, k) for k in range(spec.n_domains)}
    res_bytes = sum(
        p.numel() * p.element_size()
        for m in resident.values()
        for p in [*m.experts.parameters(), *m.gates.parameters()]
    )
    full_bytes = sum(
        p.numel() * p.element_size()
        for n, p in model.named_parameters()
        if n.startswith(("experts.", "gates."))
    )
    rows = [("all resident (full model)", full_bytes, *run(lambda k: model))]
    rows.append(("all domain slices resident", res_bytes, *run(resident.__getitem__)))
    for cap in (2, 1):
        with tempfile.TemporaryDirectory() as d:
            cache = DomainSliceCache(model, d, capacity=cap)
            p50, p99 = run(cache.get)
            rows.append((f"offloaded, LRU of {cap} domain(s): {cache.misses} loads / "
                         f"{len(seq)} requests", cache.resident_bytes(), p50, p99))  # fmt: skip
    lines = [
        f"Machine: {machine()}. STAR model over the default store's inputs: 2 shared + 8 "
        f"per domain experts [256, 128] (domain experts ~90% of the expert weights), "
        f"{len(seq)} requests of 100 candidates, domain mix {MIX}, one torch thread, "
        "model only (no feature assembly). Resident = expert and gate weights in memory.",
        "",
        "| setting | resident expert+gate MiB | p50 ms | p99 ms |",
        "|---|---:|---:|---:|",
    ]
    for name, b, p50, p99 in rows:
        lines.append(f"| {name} | {b / 2**20:.1f} | {p50:.2f} | {p99:.2f} |")
        print(lines[-1], flush=True)
    write_section("Expert offloading (bench/offload.py)", "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
