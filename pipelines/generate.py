"""``recsys-moe generate``: materialise the raw log named by the config.

``source.kind = "synthetic"`` runs the embedded generator (and prints the oracle AUC);
a loader kind (``movielens100k``, ``census_kdd``, ...) maps a public dataset from
``source.path`` onto the raw-log contract; ``files`` means the raw log already exists.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from pipelines.cli import command_parser
from recsys_moe.config import Config, load_config
from recsys_moe.data.loaders import materialize
from recsys_moe.data.synthetic import generate


def raw_log_is_current(cfg: Config) -> bool:
    """True if ``data.raw_dir`` holds a raw log made from this config's source settings."""
    raw = Path(cfg.data.raw_dir)
    if not any(raw.glob("interactions*")):
        return False
    if cfg.source.kind != "synthetic":
        return True
    meta = raw / "generator.json"
    return meta.is_file() and json.loads(meta.read_text()).get("config") == asdict(cfg.synthetic)


def run_generate(cfg: Config, progress: bool = True) -> dict:
    """Write the raw log to ``cfg.data.raw_dir``; returns what was written (rows, oracle AUC)."""
    kind = cfg.source.kind
    out = Path(cfg.data.raw_dir)
    if kind == "files":
        raise SystemExit(
            f"source.kind = 'files': the raw log is expected in {out}; nothing to generate"
        )
    if kind == "synthetic":
        return generate(cfg.synthetic, out, progress=progress)
    return {"rows": materialize(kind, cfg.source.path, out)}


def format_oracle(meta: dict) -> str:
    auc = meta["oracle_auc"]
    domains = [d for d in next(iter(auc.values())) if d != "all"]
    head = "oracle AUC  " + "".join(f"{d:>9}" for d in [*domains, "all"])
    rows = [
        f"{t:<11} " + "".join(f"{v[d]:9.4f}" for d in [*domains, "all"]) for t, v in auc.items()
    ]
    return "\n".join([head, *rows])


def main(argv: list[str] | None = None) -> int:
    ap = command_parser("generate", __doc__)
    ap.add_argument("--rows", type=int, default=None, help="override synthetic.n_rows")
    ap.add_argument(
        "--if-missing",
        action="store_true",
        help="do nothing if a raw log made from this config exists",
    )
    args = ap.parse_args(argv)
    overrides = {"synthetic.n_rows": args.rows} if args.rows else None
    cfg = load_config(args.config, overrides)
    raw = Path(cfg.data.raw_dir)
    if args.if_missing and raw_log_is_current(cfg):
        print(
            f"raw log: {raw.resolve()} (exists and matches the config; not regenerated)", flush=True
        )
        return 0
    meta = run_generate(cfg, progress=not args.no_progress)
    if "oracle_auc" in meta:
        print(format_oracle(meta))
    rows = meta["rows"] if isinstance(meta["rows"], int) else meta["rows"]["interactions"]
    print(f"raw log: {raw.resolve()} ({rows:,} interactions)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
