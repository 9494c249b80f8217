"""Kernels against the hardware limit: expert implementations, fused embeddings (TBE)
vs one ``nn.EmbeddingBag`` per table, the full training step, and a roofline.

    python -m bench.kernels [--threads 1 2] [--quick]

In one run, per thread count (``torch.set_num_threads``, 1 and 2):

1. **peaks**: SGEMM GFLOP/s (square 2048 matmul) and random-gather GB/s (``index_select``
   of 32-float rows from a 1M-row table);
2. **experts**: samples/s of each implementation (``recsys_moe.model.experts``) for three
   model sizes x batch 1 / 64 / 4096, forward (inference) and forward + backward (training),
   as a ratio to the per-expert loop; inference GFLOP/s and the fraction of the SGEMM peak;
3. **embeddings**: FBGEMM's table-batched embedding bag with the fused Adagrad update
   vs one ``nn.EmbeddingBag`` per table + ``torch.optim.Adagrad``, a training step
   (lookup, backward, update) on the default model's tables, batch 4096;
4. **model**: full training step and inference at batch 4096 on the default store: the
   reference model (per-expert loop, per-table ``EmbeddingBag``, dense Adam) vs the
   fast paths (``bench_model``), with where the fastest step's time goes;
5. **roofline**: per path and mode, FLOPs and embedding bytes per sample (experts, gates,
   towers, combine, crosses; rows gathered and updated), the achieved GFLOP/s and GB/s and
   their fractions of this run's SGEMM / bf16 GEMM and gather peaks (``model_roofline``).

Results go to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import os
import time

import torch

from bench.common import load_bench_config, machine, write_section
from recsys_moe.model.cost import forward_cost
from recsys_moe.model.experts import StackedExperts
from recsys_moe.runtime import tune_allocator

SIZES = {  # name: (E, d_in, hidden)
    "small": (4, 192, [64, 32]),
    "default": (8, 448, [128, 64]),
    "large": (16, 832, [256, 128]),
}
BATCHES = (1, 64, 4096)
IMPLS = ("loop", "bmm", "concat", "blockdiag", "fused", "compiled", "fused-bf16")


def _rate(fn, n: int, min_s: float = 0.3, max_reps: int = 2000) -> float:
    """Calls/s of ``fn`` (after 2 warm-up calls), timed over at least ``min_s``."""
    fn()
    fn()
    reps, t0 = 0, time.perf_counter()
    while True:
        fn()
        reps += 1
        dt = time.perf_counter() - t0
        if dt >= min_s or reps >= max_reps:
            return reps / dt * n


def peaks() -> tuple[float, float, float]:
    """(SGEMM GFLOP/s, bf16 GEMM GFLOP/s (AMX where the CPU has it), random gather GB/s)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    gflops = _rate(lambda: a @ b, 1, 1.0) * 2 * 2048**3 / 1e9
    a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
    bf16 = _rate(lambda: a16 @ b16, 1, 1.0) * 2 * 2048**3 / 1e9
    table = torch.randn(1_000_000, 32)
    idx = torch.randint(0, 1_000_000, (65536,))
    gbs = _rate(lambda: table.index_select(0, idx), 1, 1.0) * 65536 * 32 * 4 / 1e9
    return gflops, bf16, gbs


def expert_flops(E: int, d_in: int, hidden: list[int]) -> int:
    widths = [d_in, *hidden]
    return 2 * E * sum(a * b for a, b in itertools.pairwise(widths))


def bench_experts(quick: bool) -> list[dict]:
    import torch._dynamo

    torch._dynamo.config.recompile_limit = 64  # one graph per shape and grad mode here
    rows = []
    for size, (E, d, hidden) in SIZES.items():
        for B in BATCHES:
            res = {}
            for impl in IMPLS:
                if impl == "compiled" and (quick or B == 1):
                    continue
                torch.manual_seed(0)
                # fused-bf16: the fused experts on a bfloat16 input (training.precision = "bf16")
                x = torch.randn(B, d, dtype=torch.bfloat16 if impl.endswith("bf16") else None)
                m = StackedExperts(
                    n_experts=E, d_in=d, hidden=hidden, impl=impl.removesuffix("-bf16")
                )

                def infer(m=m, x=x):
                    with torch.no_grad():
                        m(x)

                def train(m=m, x=x):
                    m(x).sum().backward()

                res[impl] = (_rate(infer, B), _rate(train, B))
            rows.append({"size": size, "B": B, "flops": expert_flops(E, d, hidden), **res})
    return rows


def bench_embeddings(spec, B: int = 4096) -> tuple[float, float]:
    """(TBE fused step samples/s, per-table EmbeddingBag + Adagrad samples/s)."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    D = 32
    tables = [(f.name, f.vocab_size) for f in spec.sparse]
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, n, (B,), generator=g) for _, n in tables]
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(n, D, EmbeddingLocation.HOST, ComputeDevice.CPU) for _, n in tables],
        optimizer=EmbOptimType.EXACT_ADAGRAD,
        learning_rate=0.05,
    )
    indices = torch.cat(ids)
    offsets = torch.arange(0, len(tables) * B + 1, dtype=torch.long)

    def tbe_step():
        out = tbe(indices, offsets)  # (B, T*D); backward applies the fused update
        out.sum().backward()

    bags = torch.nn.ModuleList([torch.nn.EmbeddingBag(n, D, mode="sum") for _, n in tables])
    opt = torch.optim.Adagrad(bags.parameters(), lr=0.05)
    offs = torch.arange(B)

    def ref_step():
        opt.zero_grad()
        out = torch.cat([bag(i, offs) for bag, i in zip(bags, ids, strict=True)], dim=1)
        out.sum().backward()
        opt.step()

    return _rate(tbe_step, B, 1.0), _rate(ref_step, B, 1.0)


def roofline_lines(
    m: dict, r: dict, gemm: float, gemm16: float, gather: float, threads: int
) -> list[str]:
    """The roofline table of bench_model's rates ``m`` (path: (train, infer)) and the
    per-sample accounting ``r`` (:func:`recsys_moe.model.cost.forward_cost`) against this run's peaks."""
    fwd, gbytes, B = r["flops"], r["gather_bytes"], r["B"]
    # training: forward + backward = 3x the forward FLOPs; bytes: the forward gather, then
    # the update of every looked-up row (fused Adagrad: read + write row and state = 4x),
    # or, for the reference's dense Adam, zeroed grad + grad + Adam's read/write of the
    # parameters and both moments over every table row each step (8 passes, per sample / B)
    dense_adam = 8 * 4 * r["table_params"] / B
    lines = [
        "",
        f"Roofline ({threads} thread(s), default model, batch {B:.0f}): one forward pass is "
        f"{fwd / 1e6:.3f} MFLOP per sample (experts {r['experts'] / 1e6:.3f}, gates "
        f"{r['gates'] / 1e6:.3f}, towers {r['towers'] / 1e6:.3f}, combine "
        f"{r['combine'] / 1e6:.4f}, crosses {r['crosses'] / 1e6:.4f}) and gathers "
        f"{gbytes:,.0f} bytes of embedding rows ({r['lookups']:.2f} lookups of "
        f"{gbytes / r['lookups']:.0f} bytes): {fwd / gbytes:,.0f} FLOP per byte against a "
        f"machine balance of {gemm / gather:.0f} (SGEMM peak / gather peak), so every path "
        "is compute-bound on this roofline and its distance from the FLOP peak is time spent "
        "outside GEMMs. Training counts 3x the forward FLOPs; its bytes add the row "
        "updates (fused Adagrad: 4 row-sized passes per lookup; the reference's dense Adam: "
        f"8 passes over all {r['table_params']:,.0f} table weights per step).",
        "",
        "| path | mode | samples/s | GFLOP/s | of FLOP peak | bytes/sample | GB/s | of gather peak |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for name, (t, i) in m.items():
        bf16 = "bf16" in name  # training in bf16: its peak is the bf16 GEMM's
        for mode, rate, flops, nbytes, peak in (
            ("train", t, 3 * fwd, gbytes * (1 + (dense_adam / gbytes if name == "reference" else 4)),
             gemm16 if bf16 else gemm),
            ("infer", i, fwd, gbytes, gemm),  # inference is float32 on every path
        ):  # fmt: skip
            gf, gb = rate * flops / 1e9, rate * nbytes / 1e9
            of = f"bf16; {gf / gemm:.0%} of SGEMM" if peak != gemm else "SGEMM"
            lines.append(
                f"| {name} | {mode} | {rate:,.0f} | {gf:.1f} | {gf / peak:.0%} ({of}) | "
                f"{nbytes:,.0f} | {gb:.2f} | {gb / gather:.1%} |"
            )
    return lines


def bench_model(cfg, B: int = 4096, rounds: int = 3) -> dict[str, tuple[float, float]]:
    """Training-step and inference samples/s at batch ``B`` on the default store, per path:

    - ``reference``: per-expert loop, one ``nn.EmbeddingBag`` per table, dense Adam, fp32;
    - ``fit fp32``: the single-process ``fit`` path in float32: torchrec's
      FusedEmbeddingBagCollection (FBGEMM TBE, Adagrad fused into the backward), fused Adam,
      ``training.expert_impl = "fused"`` experts;
    - ``fit bf16``: the same with ``training.precision = "bf16"`` (experts, gates, towers
      in bfloat16 on AMX while training): the default config's training settings;
    - ``sharded bf16``: the distributed path of ``make train`` (DistributedModelParallel,
      sharded TBE with the fused optimiser, expert parallelism) on one rank, bf16.

    Inference is timed in eval mode after training, as batch scoring and serving run the
    model: float32 and ``model.expert_impl`` (``concat``) whatever the training settings;
    the fit paths' tables back in the plain ``EmbeddingBagCollection`` (FBGEMM's TBE
    forward is slower than the per-table bags at inference here), the sharded path
    through DMP's sharded TBE. Also returned: ``breakdown`` (:func:`step_breakdown` of the
    ``fit bf16`` step) and ``roofline`` (:func:`recsys_moe.model.cost.forward_cost` of the default model).
    """
    import polars as pl
    import torch.distributed as dist

    from features.store import example_files, load_manifest
    from recsys_moe.distributed.sharding import distribute
    from recsys_moe.model.inputs import ExampleTensors, InputSpec
    from recsys_moe.model.ranker import RankingModel
    from recsys_moe.training import (
        fused_embeddings,
        loss_of,
        make_optimizer,
        prepare_for_training,
    )

    store = cfg.features.store_dir
    spec = InputSpec.from_manifest(load_manifest(store))
    data = ExampleTensors(spec, pl.read_parquet(example_files(store, "train")[0]).head(B * 4))
    batches = [data.batch(slice(i * B, (i + 1) * B)) for i in range(4)]
    tcfg = dataclasses.replace(cfg.training, embedding_optimizer="adagrad")
    it = iter(range(10**9))

    def model(impl: str, precision: str | None = None) -> RankingModel:
        torch.manual_seed(0)
        m = RankingModel(spec, dataclasses.replace(cfg.model, expert_impl=impl))
        if precision:  # training steps as `fit` / `make train` run them
            t = dataclasses.replace(tcfg, precision=precision, expert_impl="fused")
            prepare_for_training(m, t, torch.device("cpu"))
        return m

    def stepper(fwd, opt, owner=None):
        def step():
            b = batches[next(it) % 4]
            opt.zero_grad()
            loss = loss_of(owner or fwd, fwd(b), b.labels)
            loss.backward()
            opt.step()

        return step

    def infer_rate(fwd) -> float:
        def infer():  # eval mode, as evaluation, batch scoring and serving run it (fp32)
            with torch.no_grad():
                fwd(batches[0])

        fwd.eval()
        try:
            return _rate(infer, B, 1.0)
        finally:
            fwd.train()

    paths: dict[str, tuple] = {}  # name: (forward module, training step)
    out: dict = {}
    with contextlib.ExitStack() as stack:
        ref = model("loop")
        paths["reference"] = (ref, stepper(ref, torch.optim.Adam(ref.parameters(), lr=1e-3)))
        for name, precision in (("fit fp32", "fp32"), ("fit bf16", "bf16")):
            m = model("concat", precision)
            fused = stack.enter_context(fused_embeddings(m, tcfg))
            paths[name] = (m, stepper(m, make_optimizer(m, tcfg, fused)[0]))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29591")
        if not dist.is_initialized():
            dist.init_process_group("gloo", rank=0, world_size=1)
        # sharding types named: in a world of one distribute() would otherwise leave the
        # model unsharded (the default layout, which the fit paths above measure)
        d = distribute(
            model("concat", "bf16"), tcfg, sharding_types=["table_wise", "data_parallel"]
        )
        paths["sharded bf16"] = (d.model, stepper(d.model, d.optimizer, d.module))
        # steps timed in interleaved rounds, best round per path: this VM's speed drifts by
        # 10-25% within minutes, and a ratio of rates measured minutes apart drifts with it
        train = {name: 0.0 for name in paths}
        for _ in range(rounds):
            for name, (_, step) in paths.items():
                train[name] = max(train[name], _rate(step, B, 1.0))
        out["breakdown"] = step_breakdown(paths["fit bf16"][1])
        out["roofline"] = forward_cost(ref, batches[0])
    # inference after training, as evaluation, scoring and serving run the model: the fit
    # paths' tables are back in the plain collection (what a saved model loads), the
    # sharded path keeps DMP's sharded TBE (what Ray Train workers evaluate with)
    infer = {name: 0.0 for name in paths}
    for _ in range(rounds):  # interleaved too
        for name, (fwd, _) in paths.items():
            infer[name] = max(infer[name], infer_rate(fwd))
    out.update({name: (train[name], infer[name]) for name in paths})
    return out


def step_breakdown(step, n: int = 5) -> dict[str, float]:
    """Where a training step's time goes (ms per step, from the torch profiler's CPU time
    of ``n`` steps): the fused experts' forward + backward, FBGEMM's embedding kernels,
    the optimisers, and everything else (gates, routing, combine, towers, crosses, loss,
    casts, copies and per-op overhead)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            step()
    ev = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ev)
    parts = {
        "experts (fused, fwd + bwd)": sum(
            e.cpu_time_total for e in ev if e.key in ("_FusedExperts", "_FusedExpertsBackward")
        ),
        "embeddings (FBGEMM TBE, fwd + bwd + update)": sum(
            e.self_cpu_time_total for e in ev if e.key.startswith("fbgemm::")
        ),
        "optimiser steps": sum(
            e.cpu_time_total for e in ev if e.key.startswith("Optimizer.step#Combined")
        ),
    }
    parts["everything else"] = total - sum(parts.values())
    return {k: v / n / 1e3 for k, v in parts.items()}


def bench_folded(cfg, threads: int) -> list[str]:
    """First expert layer at inference: embedding lookup + GEMM vs the folded tables
    (recsys_moe/model/fold.py), default model with and without crosses."""
    import dataclasses

    from features.store import load_manifest, read_examples
    from recsys_moe.model.fold import FoldedFirstLayer
    from recsys_moe.model.inputs import ExampleTensors, InputSpec
    from recsys_moe.model.ranker import RankingModel

    store = cfg.features.store_dir
    spec = InputSpec.from_manifest(load_manifest(store))
    rows = read_examples(store, "test").head(4096)
    out = ["", f"Folded first layer ({threads} thread(s); first-layer pre-activation only, "
           "inference): samples/s unfolded (embedding lookup + one GEMM) vs folded "
           "(one embedding-bag per feature over T_f @ W1_f, crosses and dense by GEMM).",
           "", "| model | batch | unfolded | folded | ratio | folded tables MiB |",
           "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, inter in (("default", cfg.model.interactions), ("default, no crosses", [])):
        torch.manual_seed(0)
        model = RankingModel(
            spec, dataclasses.replace(cfg.model, interactions=inter, input_norm="none")
        ).eval()
        folded = FoldedFirstLayer(model)
        W1 = model.experts.weights[0].detach()
        w_cat = W1.permute(1, 0, 2).reshape(W1.shape[1], -1)
        for B in (1, 64, 4096):
            b = ExampleTensors(spec, rows.head(B)).batch(slice(0, B))

            @torch.no_grad()
            def unfolded(b=b, model=model, w_cat=w_cat):
                return model.inputs(b) @ w_cat

            ref = _rate(unfolded, B)
            fol = _rate(lambda b=b, folded=folded: folded(b), B)
            out.append(f"| {name} | {B} | {ref:,.0f} | {fol:,.0f} | {fol / ref:.2f}x | "
                       f"{folded.nbytes() / 2**20:.1f} |")  # fmt: skip
    return out


def bench_triton() -> str:
    """The Triton kernels against their torch references on a CUDA GPU (skipped without)."""
    if not torch.cuda.is_available():
        return ("Triton kernels (`recsys_moe/model/triton_kernels.py`: fused gate softmax + "
                "combine, embedding-bag gather-and-pool into the first expert layer): not "
                "timed, no GPU on this machine; their correctness is tested under Triton's "
                "interpreter (tests/model/test_triton_kernels.py).")  # fmt: skip
    from recsys_moe.model import triton_kernels as tk

    dev = "cuda"
    B, O, E, H = 4096, 3, 8, 64
    logits, x = torch.randn(B, O, E, device=dev), torch.randn(B, E, H, device=dev)
    mask = torch.ones(B, O, E, dtype=torch.bool, device=dev)

    def ref():
        w = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1)
        return torch.einsum("boe,beh->boh", w, x)

    def sync(fn):
        def run():
            fn()
            torch.cuda.synchronize()

        return run

    t_ref = _rate(sync(ref), B)
    t_fused = _rate(sync(lambda: tk.gate_combine(logits, mask, x)), B)
    F, V, D, N = 8, 10_000, 32, 8 * 128
    table = torch.randn(F * V, D, device=dev)
    w = torch.randn(F * D, N, device=dev)
    ro = torch.arange(F, device=dev) * V
    lengths = torch.randint(1, 4, (F * B,), device=dev)
    values = torch.randint(0, V, (int(lengths.sum()),), device=dev)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long, device=dev), lengths.cumsum(0)])
    mean = torch.zeros(F, dtype=torch.int32, device=dev)
    args = (table, w, ro, values, offsets, mean, B)
    p_ref = _rate(sync(lambda: tk.pooled_linear_reference(*args)), B)
    p_fused = _rate(sync(lambda: tk.pooled_linear(*args)), B)
    return (f"Triton on {torch.cuda.get_device_name()}: gate softmax + combine (B {B}, O {O}, "
            f"E {E}, H {H}) {t_fused:,.0f} vs torch {t_ref:,.0f} samples/s = "
            f"{t_fused / t_ref:.2f}x; gather-pool into the first layer ({F} tables x {V:,} "
            f"rows, dim {D}, N {N}) {p_fused:,.0f} vs torch {p_ref:,.0f} = "
            f"{p_fused / p_ref:.2f}x.")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default.toml")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--quick", action="store_true", help="no torch.compile, no model step")
    ap.add_argument("--folded-only", action="store_true", help="only the folded first layer")
    ap.add_argument("--sparse-only", action="store_true", help="only sparse expert compute")
    args = ap.parse_args(argv)
    from features.store import load_manifest
    from recsys_moe.model.inputs import InputSpec

    cfg = load_bench_config(args.config)
    if args.folded_only:
        write_folded(cfg, args.threads)
        return 0
    if args.sparse_only:
        write_sparse(args.threads)
        return 0
    have_store = os.path.exists(os.path.join(cfg.features.store_dir, "manifest.json"))
    # what training and scoring processes run with (recsys_moe.runtime); every path below,
    # the reference included, runs under the same allocator settings
    tuned = tune_allocator()
    lines = [f"Machine: {machine()}. torch {torch.__version__}, CPU; glibc allocator "
             f"thresholds {'raised (recsys_moe.runtime)' if tuned else 'default'}."]  # fmt: skip
    for threads in args.threads:
        torch.set_num_threads(threads)
        gemm, gemm16, gather = peaks()
        print(f"[{threads} thread(s)] peak SGEMM {gemm:.1f} GFLOP/s, bf16 GEMM {gemm16:.1f} "
              f"GFLOP/s, gather {gather:.2f} GB/s", flush=True)  # fmt: skip
        rows = bench_experts(args.quick)
        fp32_impls = [i for i in IMPLS if not i.endswith("bf16")]
        lines += [
            "",
            f"### {threads} thread(s): peak SGEMM {gemm:.1f} GFLOP/s, bf16 GEMM {gemm16:.1f} "
            f"GFLOP/s, random gather {gather:.2f} GB/s",
            "",
            "Experts, samples/s as a ratio to the per-expert loop in fp32 (inference / "
            "training step); `loop` column in samples/s; `fused-bf16` = the fused experts on "
            'a bfloat16 input (`training.precision = "bf16"`). Best fp32 inference GFLOP/s '
            "and its fraction of the SGEMM peak; fused-bf16 inference GFLOP/s and its "
            "fraction of the bf16 GEMM peak.",
            "",
            "| size | batch | loop inf | loop train | "
            + " | ".join(f"{i} inf / train" for i in IMPLS[1:])
            + " | best fp32 inf GFLOP/s | of SGEMM peak | bf16 inf GFLOP/s | of bf16 peak |",
            "|---|---:|---:|---:|" + "---:|" * (len(IMPLS) - 1) + "---:|---:|---:|---:|",
        ]
        roof = {}
        for r in rows:
            li, lt = r["loop"]
            cells = []
            for impl in IMPLS[1:]:
                if impl in r:
                    i, t = r[impl]
                    cells.append(f"{i / li:.2f}x / {t / lt:.2f}x")
                else:
                    cells.append("-")
            best = max((k for k in fp32_impls if k in r), key=lambda k: r[k][0])
            gf = r[best][0] * r["flops"] / 1e9
            gf16 = r["fused-bf16"][0] * r["flops"] / 1e9
            if r["size"] == "default" and r["B"] == 4096:
                roof = {"fp32": gf, "frac": gf / gemm, "bf16": gf16, "frac16": gf16 / gemm16}
            lines.append(
                f"| {r['size']} | {r['B']} | {li:,.0f} | {lt:,.0f} | " + " | ".join(cells)
                + f" | {gf:.1f} ({best}) | {gf / gemm:.0%} | {gf16:.1f} | {gf16 / gemm16:.0%} |"
            )  # fmt: skip
            print(lines[-1], flush=True)
        if have_store:
            spec = InputSpec.from_manifest(load_manifest(cfg.features.store_dir))
            tbe, bag = bench_embeddings(spec)
            lines += ["", f"Embeddings (default tables, dim 32, batch 4096, training step with "
                      f"Adagrad): FBGEMM TBE fused {tbe:,.0f} samples/s vs per-table "
                      f"EmbeddingBag {bag:,.0f} samples/s = {tbe / bag:.2f}x."]  # fmt: skip
            print(lines[-1], flush=True)
            if not args.quick:
                m = bench_model(cfg)
                rt, ri = m["reference"]
                lines += ["", "Model (default config, batch 4096; bench_model's docstring "
                          "names the paths): samples/s and ratio to the reference; inference in eval "
                          "mode (fp32, as scoring and serving run it).", "",
                          "| path | training step | vs reference | inference | vs reference |",
                          "|---|---:|---:|---:|---:|"]  # fmt: skip
                parts, roof_model = m.pop("breakdown"), m.pop("roofline")
                for name, (t, i) in m.items():
                    lines.append(
                        f"| {name} | {t:,.0f} | {t / rt:.2f}x | {i:,.0f} | {i / ri:.2f}x |"
                    )
                    print(lines[-1], flush=True)
                lines += roofline_lines(m, roof_model, gemm, gemm16, gather, threads)
                print("\n".join(lines[-10:]), flush=True)
                step_ms = sum(parts.values())
                lines += ["", f"Where the `fit bf16` step's time goes (profiled, {step_ms:.1f} ms "
                          "per step of 4096; the reference step takes "
                          f"{4096 / rt * 1e3:.1f} ms): "
                          + "; ".join(f"{k} {v:.1f} ms ({v / step_ms:.0%})" for k, v in parts.items())
                          + ". A 3x step needs the whole step under "
                          f"{4096 / rt * 1e3 / 3:.1f} ms."]  # fmt: skip
                print(lines[-1], flush=True)
                lines += ["", f"Default-size experts at batch 4096, inference: "
                          f"{roof.get('fp32', 0):.1f} GFLOP/s in fp32 = "
                          f"{roof.get('frac', 0):.0%} of the SGEMM peak; "
                          f"{roof.get('bf16', 0):.1f} GFLOP/s in bf16 = "
                          f"{roof.get('frac16', 0):.0%} of the bf16 GEMM peak "
                          f"({roof.get('bf16', 0) / gemm:.0%} of the SGEMM peak)."]  # fmt: skip
                print(lines[-1], flush=True)
    lines += ["", bench_triton()]
    print(lines[-1], flush=True)
    write_section("Kernels: experts, embeddings, roofline (bench/kernels.py)", "\n".join(lines))
    if not args.quick:
        write_folded(cfg, args.threads)
    write_sparse(args.threads)
    return 0


def bench_sparse(threads: int, B: int = 4096) -> list[str]:
    """Dense-masked vs sparse expert computation under top-k routing (training step:
    forward + backward of the experts), at the default expert shape."""
    from recsys_moe.model.experts import sparse_expert_forward

    _E, d_in, hidden = SIZES["default"]
    rows = []
    for E in (8, 16, 32):
        torch.manual_seed(0)
        st = StackedExperts(n_experts=E, d_in=d_in, hidden=hidden, impl="concat")
        x = torch.randn(B, d_in, requires_grad=True)
        g = torch.randn(B, E, hidden[-1])
        for k in (1, 2):
            routed = torch.zeros(B, E, dtype=torch.bool)
            routed.scatter_(1, torch.randn(B, E).topk(k, dim=1).indices, True)

            def dense(st=st, routed=routed, x=x, g=g):
                st.zero_grad(set_to_none=True)
                ((st(x) * routed.unsqueeze(-1)) * g).sum().backward()

            def sparse(st=st, routed=routed, x=x, g=g):
                st.zero_grad(set_to_none=True)
                w, b = list(st.weights), list(st.biases)
                (sparse_expert_forward(x, w, b, routed) * g).sum().backward()

            rate_d, rate_s = _rate(dense, B, min_s=0.5), _rate(sparse, B, min_s=0.5)
            rows.append((E, k, rate_d, rate_s, E / k))
            print(f"[{threads} thread(s)] E={E} k={k}: dense-masked {rate_d:,.0f}/s, sparse "
                  f"{rate_s:,.0f}/s ({rate_s / rate_d:.2f}x; FLOP ideal {E / k:.0f}x)",
                  flush=True)  # fmt: skip
    lines = [
        "",
        f"### {threads} thread(s), batch {B}, experts {d_in} -> {hidden}, top-k routing, "
        "training step (forward + backward of the experts), samples/s",
        "",
        "| E | k | dense-masked | sparse | sparse / dense | FLOP-proportional ideal |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for E, k, d, sp, ideal in rows:
        lines.append(f"| {E} | {k} | {d:,.0f} | {sp:,.0f} | {sp / d:.2f}x | {ideal:.0f}x |")
    return lines


def write_sparse(threads: list[int]) -> None:
    lines = [
        f"Machine: {machine()}. torch {torch.__version__}, float32, CPU. Dense-masked: every "
        "expert on every row (`concat`: one GEMM for all), the unrouted outputs multiplied "
        "by 0; sparse: `model.sparse_experts` (`recsys_moe/model/experts.sparse_expert_"
        "forward`: the routed (row, expert) pairs sorted by expert, one GEMM per expert and "
        "layer on its contiguous rows, results scattered back). Ideal: E / k, the FLOP ratio."
    ]
    for t in threads:
        torch.set_num_threads(t)
        lines += bench_sparse(t)
    write_section("Kernels: sparse expert computation (bench/kernels.py)", "\n".join(lines))


def write_folded(cfg, threads: list[int]) -> None:
    if not os.path.exists(os.path.join(cfg.features.store_dir, "manifest.json")):
        return
    lines = [f"Machine: {machine()}. torch {torch.__version__}, float32, CPU."]
    for t in threads:
        torch.set_num_threads(t)
        lines += bench_folded(cfg, t)
        print("\n".join(lines[-9:]), flush=True)
    lines += ["", "The fold trades the first GEMM for gathers of E*h1-wide rows: on this CPU it "
              "at best breaks even (single requests of a model without crosses, 0.9-1.3x "
              "between runs) and loses everywhere else, most at batch 4096 (the crosses "
              "still need the embedding lookup); the model does not use it."]  # fmt: skip
    write_section("Kernels: folded first layer (bench/kernels.py)", "\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
