"""``recsys-moe score``: batch scoring of candidate rows on Ray Data.

    recsys-moe score --model models:/recsys_moe_default@champion --input cands/ --output scored/

1. The model is resolved (an MLflow ``models:/<name>@<alias>`` or ``models:/<name>/<version>``
   URI, or a local model bundle folder) and the input's schema is checked before any work:
   a missing column or a column of the wrong type stops here with a message naming it.
2. Ray Data streams the input once through an actor pool (``map_batches`` with a callable
   class: each actor loads the model once), which joins user and item features with the
   same ``features/`` code as training and serving and scores every row; rows whose
   ``user_id``, ``item_id`` or domain is null are written by the actor to
   ``<output>/rejects/`` with the reason (never dropped silently).
3. ``<output>/scores/`` gets the input rows plus ``score_<task>`` per task, the blended
   ``score``, the user ``segment``, ``cold_user`` / ``cold_item`` and ``model_version``.
   Rows in = rows out + rejects is checked; optionally ``<output>/top_k/`` keeps the K best
   candidates per user (``--top-k``).

Streaming throughout: memory is bounded by the blocks in flight, never the whole input.
Runs locally or on a cluster (``RAY_ADDRESS``); ``--use-gpu`` puts each actor on a GPU.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.dataset as pads
import ray
import ray.data

from pipelines.cli import command_parser, parse_model_command
from pipelines.publish import published
from recsys_moe.bundle import BundleError
from recsys_moe.cluster import init_ray
from recsys_moe.config import Config, ScoringConfig
from recsys_moe.registry import ModelNotFound, open_model
from recsys_moe.scorer import RequestError, Scorer

REJECT_REASON = "reject_reason"
# Ray Data's read / filter / write tasks are I/O-light: a quarter CPU each, so they are
# never starved by the scoring actors (which would deadlock the stream)
IO_CPUS = 0.25


def check_input(path: str | Path, scorer: Scorer) -> pa.Schema:
    """Fail before any work on a missing input, missing column or incompatible type."""
    p = Path(path)
    if not p.exists():
        raise RequestError(f"--input {p}: no such file or folder")
    try:
        schema = pads.dataset(str(p), format="parquet").schema
    except (pa.ArrowInvalid, OSError) as e:
        raise RequestError(f"--input {p}: not readable as Parquet: {e}") from None
    empty = pl.from_arrow(schema.empty_table())
    scorer.check(empty)  # missing required columns, uncastable context columns
    for col, want in scorer.key_types.items():
        got = empty.schema[col]
        if got.is_numeric() != want.is_numeric() and got != pl.Null:
            raise RequestError(f"--input {p}: column {col!r} is {got}, the model's ids are {want}")
    return schema


def _null_key(keys: list[str]) -> pl.Expr:
    return pl.any_horizontal([pl.col(k).is_null() for k in keys])


def _rejected(bad: pl.DataFrame, keys: list[str]) -> pa.Table:
    """Rows with a null key, with the reason (the first null key)."""
    reason = pl.lit(None, dtype=pl.String)
    for k in reversed(keys):
        reason = pl.when(pl.col(k).is_null()).then(pl.lit(f"null {k}")).otherwise(reason)
    return bad.with_columns(reason.alias(REJECT_REASON)).to_arrow()


class ScoreBatch:
    """The actor: loads the bundle once, scores pyarrow batches. Rows with a null key are
    written to ``rejects`` (one Parquet file per batch that has any, with the reason) and
    left out of the output, so the input is read once."""

    def __init__(
        self, bundle: str, version: str, blend: dict[str, Any], threads: int, rejects: str
    ) -> None:
        import torch

        from recsys_moe.runtime import tune_allocator

        torch.set_num_threads(threads)
        tune_allocator()  # scoring batches reuse their memory instead of faulting it in
        self.scorer = Scorer.from_dir(bundle)
        self.version = version
        self.blend = ScoringConfig(**blend)
        self.keys = list(self.scorer.required)
        self.rejects = Path(rejects)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import uuid

        import pyarrow.parquet as pq

        rows = pl.from_arrow(batch)
        if isinstance(rows, pl.Series):  # pragma: no cover - a one-column table
            rows = rows.to_frame()
        null = rows.select(_null_key(self.keys)).to_series()
        if null.any():
            bad = _rejected(rows.filter(null), self.keys)
            self.rejects.mkdir(parents=True, exist_ok=True)
            pq.write_table(bad, self.rejects / f"part-{uuid.uuid4().hex}.parquet")
            rows = rows.filter(~null)
        scored = self.scorer.score_frame(rows, self.blend)
        return (
            pl.concat([rows, scored], how="horizontal")
            .with_columns(pl.lit(self.version).alias("model_version"))
            .to_arrow()
        )


def _parquet_rows(path: Path) -> int:
    files = list(path.rglob("*.parquet"))
    return sum(pads.dataset(str(f), format="parquet").count_rows() for f in files)


def run_score(
    cfg: Config,
    *,
    model: str,
    input_path: str | Path,
    output: str | Path,
    top_k: int | None = None,
    use_gpu: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """The whole job; returns the summary (also written to <output>/summary.json)."""
    started = time.perf_counter()
    resolved, scorer = open_model(model)
    check_input(input_path, scorer)
    # written beside the output folder and swapped in whole once every row is accounted
    # for: a killed run leaves the previous output (or none) and a rerun starts over
    with published(output, "score") as out:
        sc = cfg.scoring
        init_ray()
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = progress
        # the V1 Parquet reader: V2 adds a file-listing task that asks for a whole CPU, which
        # a cluster shared with serving replicas or busy actors may never have free
        ctx.use_datasource_v2 = False
        # blocks of ~16 MiB: a large Parquet file becomes many blocks, shared by every actor
        # (one 1M-row block would keep all its batches on one actor)
        ctx.target_max_block_size = 16 * 1024 * 1024
        src = str(Path(input_path).resolve())
        # what is free now (a Serve app or another job may hold part of the cluster)
        cpus = float(ray.available_resources().get("CPU", 0.0))
        if sc.concurrency:
            concurrency, actor_cpus = sc.concurrency, sc.num_cpus_per_actor
            pool: int | tuple[int, int] = concurrency
        else:  # one actor per free CPU, leaving half a CPU to Ray Data's read and write tasks
            concurrency = max(1, min(8, int(cpus)))
            actor_cpus = min(
                sc.num_cpus_per_actor, max(IO_CPUS, (cpus - 2 * IO_CPUS) / concurrency)
            )
            pool = concurrency  # sized to the free CPUs, so every actor can be placed
        threads = max(1, int(actor_cpus))

        # one pass: the actors score the good rows and write the null-key rows to rejects/
        light = {"num_cpus": IO_CPUS}
        rejects = (out / "rejects").resolve()
        scored = ray.data.read_parquet(src, **light).map_batches(
            ScoreBatch,
            fn_constructor_kwargs={
                "bundle": str(resolved.bundle),
                "version": resolved.version,
                "blend": {"blend": sc.blend, "task_weights": dict(sc.task_weights)},
                "threads": threads,
                "rejects": str(rejects),
            },
            batch_size=sc.batch_size,
            batch_format="pyarrow",
            concurrency=pool,
            num_cpus=actor_cpus,
            num_gpus=1 if use_gpu else 0,
        )
        scored.write_parquet(str((out / "scores").resolve()), ray_remote_args=light)
        rows_out = _parquet_rows(out / "scores")
        n_rejects = _parquet_rows(rejects) if rejects.exists() else 0
        rows_in = pads.dataset(src, format="parquet").count_rows()
        if rows_in != rows_out + n_rejects:
            raise RuntimeError(
                f"row accounting failed: {rows_in} rows in != {rows_out} scored + {n_rejects} rejected"
            )
        cold = (
            pl.scan_parquet(str(out / "scores" / "*.parquet"))
            .select(pl.col("cold_user").sum(), pl.col("cold_item").sum())
            .collect()
        )
        k = sc.top_k if top_k is None else top_k
        if k:
            user = scorer.spec.user_id
            (
                pl.scan_parquet(str(out / "scores" / "*.parquet"))
                .sort([user, "score"], descending=[False, True])
                .group_by(user, maintain_order=True)
                .head(k)
                .with_columns(pl.int_range(pl.len()).over(user).add(1).alias("rank"))
                .sink_parquet(out / "top_k.parquet")
            )
        seconds = time.perf_counter() - started
        summary = {
            "model": resolved.uri,
            "model_version": resolved.version,
            "input": src,
            "output": str(Path(output).resolve()),
            "rows_in": rows_in,
            "rows_out": rows_out,
            "rows_rejected": n_rejects,
            "rows_cold_user": int(cold["cold_user"][0] or 0),
            "rows_cold_item": int(cold["cold_item"][0] or 0),
            "seconds": round(seconds, 2),
            "rows_per_s": round(rows_in / max(seconds, 1e-9)),
            "actors": concurrency,
            "top_k": k,
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = command_parser("score", __doc__, model=True)
    ap.add_argument("--input", required=True, help="Parquet file or folder of candidate rows")
    ap.add_argument("--output", required=True, help="output folder (replaced)")
    ap.add_argument("--top-k", type=int, default=None, help="also write the K best per user")
    ap.add_argument("--use-gpu", action="store_true")
    args, cfg, model = parse_model_command(ap, argv)
    try:
        s = run_score(
            cfg, model=model, input_path=args.input, output=args.output, top_k=args.top_k,
            use_gpu=args.use_gpu, progress=not args.no_progress,
        )  # fmt: skip
    except (RequestError, ModelNotFound, BundleError) as e:
        print(f"recsys-moe score: error: {e}", file=sys.stderr)
        return 2
    print(
        f"scored {s['rows_out']:,} of {s['rows_in']:,} rows ({s['rows_rejected']:,} rejected; "
        f"cold-start users {s['rows_cold_user']:,}, items {s['rows_cold_item']:,}) with "
        f"{s['model']} (version {s['model_version']}) in {s['seconds']}s, "
        f"{s['rows_per_s']:,} rows/s on {s['actors']} actors\n"
        f"scores: {s['output']}/scores"
        + (f"\ntop-{s['top_k']}: {s['output']}/top_k.parquet" if s["top_k"] else "")
        + (f"\nrejects: {s['output']}/rejects" if s["rows_rejected"] else ""),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
