"""``recsys-moe candidates``: a candidate file to score (for ``make score`` and benchmarks).

Rows of ``user_id, item_id, domain, ts, <context>`` drawn from the feature store's lookup
tables (known users, items and domains), with a share of unknown users and items
(cold start) and, optionally, rows with a null key (to exercise the rejects path).
Written as Parquet in parts of ``--part-rows`` rows, generated part by part.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

from features.store import load_manifest, read_tables, read_vocabs, spec_from_manifest
from pipelines.cli import command_parser
from recsys_moe.config import load_config


def unseen(known: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Ids the store has never seen, of the known ids' type: past the largest integer id,
    or strings no known id has (``new-<k>``)."""
    if np.issubdtype(known.dtype, np.integer):
        return known.max() + 1 + k
    return np.char.add("new-", k.astype(str)).astype(object)


def write_candidates(
    store: str | Path,
    output: str | Path,
    rows: int,
    *,
    seed: int = 0,
    cold_fraction: float = 0.02,
    null_fraction: float = 0.0,
    part_rows: int = 1_000_000,
) -> Path:
    manifest = load_manifest(store)
    spec = spec_from_manifest(manifest)
    tables, vocabs = read_tables(store), read_vocabs(store, manifest)
    users = tables["users"][spec.user_id].to_numpy()
    items = tables["items"][spec.item_id].to_numpy()
    domains = np.array(manifest["domains"])
    now = int(time.time())
    out = Path(output)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for part, start in enumerate(range(0, rows, part_rows)):
        n = min(part_rows, rows - start)
        u = rng.choice(users, n)
        i = rng.choice(items, n)
        cold = rng.random(n) < cold_fraction
        u = np.where(cold & (rng.random(n) < 0.5), unseen(users, rng.integers(0, 1000, n)), u)
        i = np.where(cold & (rng.random(n) >= 0.5), unseen(items, rng.integers(0, 1000, n)), i)
        df = pl.DataFrame(
            {
                spec.user_id: u,
                spec.item_id: i,
                spec.domain: rng.choice(domains, n),
                spec.timestamp: np.full(n, now, dtype=np.int64),
            }
        ).with_columns(
            pl.col(spec.user_id).cast(tables["users"].schema[spec.user_id]),
            pl.col(spec.item_id).cast(tables["items"].schema[spec.item_id]),
        )
        for c in spec.context_categorical:
            values = vocabs[c]["value"]
            df = df.with_columns(
                pl.Series(c, values.to_numpy()[rng.integers(0, len(values), n)]).cast(values.dtype)
            )
        if null_fraction:
            null = pl.Series(rng.random(n) < null_fraction)
            df = df.with_columns(
                pl.when(null).then(None).otherwise(pl.col(spec.user_id)).alias(spec.user_id)
            )
        df.write_parquet(out / f"part-{part:05d}.parquet")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = command_parser("candidates", __doc__)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--output", default=None, help="default: data/candidates/<config name>")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--null-fraction", type=float, default=0.0)
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    out = write_candidates(
        cfg.features.store_dir, args.output or f"data/candidates/{cfg.name}", args.rows,
        seed=args.seed, null_fraction=args.null_fraction,
    )  # fmt: skip
    print(f"candidates: {args.rows:,} rows in {out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
