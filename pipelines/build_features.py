"""``recsys-moe features``: raw log -> feature store, on Ray Data with Polars transforms.

Read -> prepare -> partition by user -> user stage -> partition by item -> item stage ->
global statistics (aggregate per block, merge exactly) -> encode -> write. Every
per-key statistic is exact because each partition holds all events of its keys
(``groupby(bucket).map_groups``), and every global statistic is a merge of exact
per-block partials. :func:`build_reference` runs the same transforms in one process;
the tests require both to produce identical examples.

Runs on the embedded local Ray, or on a cluster when ``RAY_ADDRESS`` is set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa

from features import examples as ex
from features.spec import GRAINS, SPLIT, FeatureSpec
from features.store import (
    MANIFEST,
    block_statistics,
    build_tables,
    grow_table,
    grow_vocab,
    merge_counts,
    numeric_stats,
    write_store,
)
from pipelines.cli import command_parser, config_from_args
from pipelines.publish import published
from recsys_moe.config import Config, ConfigError
from recsys_moe.data.schema import (
    REJECT_REASON,
    TableFiles,
    ValidationReport,
    bad_row_reason,
    interaction_columns,
    read_table,
    scan_table,
    validate_raw_log,
)

USER_BUCKET = "_ubucket"
ITEM_BUCKET = "_ibucket"


@dataclass
class Parent:
    """The model a retrain's store grows from (``features.grow_from``)."""

    ref: str
    resolved: Any  # recsys_moe.registry.ResolvedModel
    manifest: dict[str, Any]
    vocabs: dict[str, pl.DataFrame]
    tables: dict[str, pl.DataFrame]


def open_parent(ref: str) -> Parent:
    """``ref``'s bundle: its manifest, vocabularies and lookup tables; a model that cannot
    be found or read is a config error naming it."""
    from recsys_moe.bundle import BundleError, read_meta, read_tables, read_vocabs
    from recsys_moe.registry import ModelNotFound, resolve_model

    try:
        resolved = resolve_model(ref)
        manifest = read_meta(resolved.bundle)["manifest"]
        vocabs = read_vocabs(resolved.bundle, manifest)
        return Parent(ref, resolved, manifest, vocabs, read_tables(resolved.bundle))
    except (ModelNotFound, BundleError) as e:
        raise ConfigError(f"[features] grow_from: {e}") from None


@dataclass
class Plan:
    """Everything decided on the driver before distributed work: validated inputs,
    canonical schema, split boundaries, label priors and the attribute tables."""

    cfg: Config
    tables: dict[str, TableFiles]
    report: ValidationReport
    schema: dict[str, pl.DataType]
    boundaries: ex.Boundaries
    spec: FeatureSpec
    users: pl.DataFrame
    items: pl.DataFrame
    parent: Parent | None = None  # features.grow_from: the model whose store this extends


def plan_features(cfg: Config) -> Plan:
    """Validate the raw log and compute the driver-side constants (lazy, column scans)."""
    d = cfg.data
    tables, report = validate_raw_log(d)
    lf = scan_table(tables["interactions"])
    full = lf.collect_schema()
    schema = {c: full[c] for c in interaction_columns(d)}
    good = lf.filter(bad_row_reason(d).is_null()).with_columns(
        ex.timestamp_seconds(d.timestamp, schema[d.timestamp]).alias(d.timestamp)
    )
    since = window_start(good, d.timestamp, cfg.features.window_days)
    examples = good if since is None else good.filter(pl.col(d.timestamp) >= since)
    b = ex.compute_boundaries(
        examples.select(d.timestamp),
        d.timestamp,
        cfg.features.valid_fraction,
        cfg.features.test_fraction,
    )
    b = dataclasses.replace(b, since=since)
    train = examples.filter(pl.col(d.timestamp) < b.valid_start)
    pri = train.select(
        pl.len().alias("_n"), *(pl.col(t).cast(pl.Float64).mean() for t in d.task_names)
    ).collect()
    if pri["_n"][0] == 0:
        raise ValueError(
            "the training window is empty: too few distinct timestamps for a time split"
        )
    parent = open_parent(cfg.features.grow_from) if cfg.features.grow_from else None
    priors = {t: float(pri[t][0]) for t in d.task_names}
    if parent is not None:  # the smoothed rates as the model it grows from computed them
        priors = {t["name"]: float(t["prior"]) for t in parent.manifest["tasks"]}
    spec = FeatureSpec.from_config(cfg.data, cfg.features).with_priors(priors)
    uid, iid = schema[d.user_id], schema[d.item_id]
    users = ex.prepare_attributes(
        read_table(tables["users"]), spec, d.user_id, d.user_categorical, d.user_numeric, uid
    )
    items = ex.prepare_attributes(
        read_table(tables["items"]), spec, d.item_id, d.item_categorical, d.item_numeric, iid
    )
    return Plan(cfg, tables, report, schema, b, spec, users, items, parent)


def window_start(good: pl.LazyFrame, ts: str, days: float) -> int | None:
    """The first second of the newest ``days`` days of the log (``features.window_days``;
    None: 0, the whole log)."""
    if days <= 0:
        return None
    last = good.select(pl.col(ts).max()).collect().item()
    if last is None:
        return None  # an empty log: the split's own check says so
    return int(last) + 1 - round(days * 86400)


def fingerprint(plan: Plan) -> str:
    """blake2b over the input files' bytes and the data section of the config."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(asdict(plan.cfg.data), sort_keys=True).encode())
    for name in sorted(plan.tables):
        for p in plan.tables[name].paths:
            h.update(p.name.encode())
            with open(p, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------- block functions


def _pl(batch: pa.Table) -> pl.DataFrame:
    return pl.from_arrow(batch)  # type: ignore[return-value]


def _prepare_block(
    batch: pa.Table,
    spec: FeatureSpec,
    schema: dict[str, pl.DataType],
    b: ex.Boundaries,
    cfg_data: Any,
    partitions: int,
) -> pa.Table:
    df = _pl(batch)
    df = df.filter(bad_row_reason(cfg_data).is_null())
    df = ex.prepare(df, spec, schema, b)
    return df.with_columns(
        (pl.col(spec.user_id).hash(seed=17) % partitions).alias(USER_BUCKET)
    ).to_arrow()


def _partition(df: pl.DataFrame, bucket: str, partitions: int) -> list[pa.Table]:
    """Split a block into ``partitions`` tables by its bucket column (empty ones included)."""
    parts = {k[0]: v for k, v in df.partition_by(bucket, as_dict=True, include_key=False).items()}
    empty = df.drop(bucket).clear()
    return [parts.get(i, empty).to_arrow() for i in range(partitions)]


def _user_partition(block: pa.Table, partitions: int) -> list[pa.Table]:
    return _partition(_pl(block), USER_BUCKET, partitions)


def _user_stage(
    users: pl.DataFrame, spec: FeatureSpec, partitions: int, *parts: pa.Table
) -> list[pa.Table]:
    """All blocks' share of one user bucket -> user stage -> split by item bucket."""
    df = ex.user_stage(pl.concat([_pl(p) for p in parts], how="vertical_relaxed"), users, spec)
    df = df.with_columns((pl.col(spec.item_id).hash(seed=29) % partitions).alias(ITEM_BUCKET))
    return _partition(df, ITEM_BUCKET, partitions)


def _item_stage(items: pl.DataFrame, spec: FeatureSpec, *parts: pa.Table) -> pa.Table:
    df = pl.concat([_pl(p) for p in parts], how="vertical_relaxed")
    return ex.item_stage(df, items, spec).to_arrow()


def shuffle_stages(block_refs: list, plan: Plan, partitions: int) -> list:
    """Two exact hash shuffles with Ray tasks: by user (user stage), then by item (item stage).

    Every reducer receives every event of its keys, so point-in-time aggregates are global.
    Returns object refs of the item-stage outputs (one Arrow table per partition).
    """
    import ray

    P = partitions
    users_ref, items_ref = ray.put(plan.users), ray.put(plan.items)
    split = ray.remote(num_returns=P)(_user_partition) if P > 1 else ray.remote(_user_partition)
    mapped = [split.remote(ref, P) for ref in block_refs]
    mapped = [m if P > 1 else [m] for m in mapped]
    ustage = ray.remote(num_returns=P)(_user_stage) if P > 1 else ray.remote(_user_stage)
    by_item = [ustage.remote(users_ref, plan.spec, P, *[m[i] for m in mapped]) for i in range(P)]
    by_item = [m if P > 1 else [m] for m in by_item]
    istage = ray.remote(_item_stage)
    return [istage.remote(items_ref, plan.spec, *[m[j] for m in by_item]) for j in range(P)]


def _block_statistics_arrow(batch: pa.Table, spec: FeatureSpec) -> dict[str, Any]:
    return block_statistics(_pl(batch), spec)


def _encode_block(
    batch: pa.Table,
    spec: FeatureSpec,
    vocabs: dict[str, pl.DataFrame],
    stats: dict[str, dict[str, float]],
) -> pa.Table:
    # rows in a seeded random order: a streaming trainer reading the store with a local
    # shuffle buffer then sees every time range and user mixed (blocks are time-sorted)
    df = ex.encode(ex.examples_only(_pl(batch)), spec, vocabs, stats)
    return df.sample(fraction=1.0, shuffle=True, seed=df.height).to_arrow()


# ------------------------------------------------------------------ pipeline


def _versions() -> dict[str, str]:
    import ray

    return {"polars": pl.__version__, "pyarrow": pa.__version__, "ray": ray.__version__}


def write_rejects(plan: Plan, store: Path) -> None:
    if not plan.report.rejected:
        return
    (store / "rejects").mkdir(parents=True, exist_ok=True)
    (
        scan_table(plan.tables["interactions"])
        .with_columns(bad_row_reason(plan.cfg.data).alias(REJECT_REASON))
        .filter(pl.col(REJECT_REASON).is_not_null())
        .collect()
        .write_parquet(store / "rejects" / "interactions.parquet")
    )


def _read_interactions(plan: Plan):  # -> ray.data.Dataset
    import ray.data

    tf = plan.tables["interactions"]
    paths = [str(p) for p in tf.paths]
    if tf.format == "parquet":
        return ray.data.read_parquet(paths)
    return ray.data.read_csv(paths)


def build_features(cfg: Config, progress: bool = True) -> dict[str, Any]:
    """Run the Ray pipeline for ``cfg`` and write the feature store; returns the manifest."""
    t0 = time.perf_counter()
    plan = plan_features(cfg)
    for line in plan.report.lines():
        print(f"[features] {line}", flush=True)
    # written beside the store and swapped in whole: a killed run leaves the previous
    # store as it was, and two runs into one store take turns (pipelines/publish.py)
    with published(cfg.features.store_dir, "features") as staging:
        return _build_into(staging, cfg, plan, t0, progress)


def _build_into(store: Path, cfg: Config, plan: Plan, t0: float, progress: bool) -> dict[str, Any]:
    import ray
    import ray.data

    from recsys_moe.cluster import init_ray

    write_rejects(plan, store)
    t_plan = time.perf_counter()
    init_ray()
    t_ray = time.perf_counter()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    spec, P = plan.spec, cfg.features.partitions

    ds = _read_interactions(plan)
    ds = ds.map_batches(
        _prepare_block, batch_format="pyarrow", batch_size=None,
        fn_kwargs={"spec": spec, "schema": plan.schema, "b": plan.boundaries, "cfg_data": cfg.data, "partitions": P},
    )  # fmt: skip
    item_refs = shuffle_stages(ds.to_arrow_refs(), plan, P)
    ray.wait(item_refs, num_returns=len(item_refs), fetch_local=False)
    t_stages = time.perf_counter()

    stats_task = ray.remote(_block_statistics_arrow)
    partials = ray.get([stats_task.remote(ref, spec) for ref in item_refs])
    vocabs = ex.merge_vocabs(
        [p["vocab"] for p in partials], spec, cfg.features.min_count, cfg.features.max_vocab
    )
    stats = ex.merge_moments([p["moments"] for p in partials])
    counts = merge_counts([p["counts"] for p in partials], spec)
    snapshots = {
        g: [p["snapshots"][g] for p in partials] for g in (GRAINS if spec.history_features else ())
    }
    tables = build_tables(spec, plan.users, plan.items, snapshots, plan.schema)
    grown_from = {}
    if plan.parent is not None:
        vocabs, stats, tables, grown_from = grow_from_model(
            plan.parent, spec, vocabs, tables, cfg.features.min_count
        )
    t_stats = time.perf_counter()

    ray.data.from_arrow_refs(item_refs).map_batches(
        _encode_block, batch_format="pyarrow", batch_size=None,
        fn_kwargs={"spec": spec, "vocabs": vocabs, "stats": stats},
    ).write_parquet(str((store / "examples").resolve()), partition_cols=[SPLIT])  # fmt: skip
    t_write = time.perf_counter()
    timings = {
        "plan": round(t_plan - t0, 3),
        "ray_init": round(t_ray - t_plan, 3),
        "stages": round(t_stages - t_ray, 3),
        "statistics": round(t_stats - t_stages, 3),
        "encode_write": round(t_write - t_stats, 3),
        "total": round(t_write - t0, 3),
    }
    return write_store(
        store, spec, vocabs=vocabs, stats=stats, tables=tables, counts=counts,
        splits={"valid_start": plan.boundaries.valid_start, "test_start": plan.boundaries.test_start,
                "since": plan.boundaries.since, "window_days": cfg.features.window_days},
        tasks=[asdict(t) for t in cfg.data.tasks],
        header={
            "name": cfg.name,
            "fingerprint": fingerprint(plan),
            "inputs": {k: [str(p) for p in v.paths] for k, v in plan.tables.items()},
            "config": cfg.to_dict(),
            "validation": asdict(plan.report) | {"rejected_total": plan.report.rejected_total},
            "timings_s": timings,
            "grown_from": grown_from,
            "versions": _versions(),
        },
    )  # fmt: skip


def grow_from_model(
    parent: Parent,
    spec: FeatureSpec,
    vocabs: dict[str, pl.DataFrame],
    tables: dict[str, pl.DataFrame],
    min_count: int,
) -> tuple[dict[str, pl.DataFrame], dict[str, dict[str, float]], dict[str, pl.DataFrame], dict]:
    """The store of a retrain (``features.grow_from``): the model's vocabularies with this
    log's new values appended (every index it knew keeps its meaning, as ``extend``
    grows them), its numeric normalisation (and, in :func:`plan_features`, its task priors),
    this log's lookup rows plus the model's rows of keys this log lacks. Returns
    vocabularies, statistics, tables and the lineage."""
    theirs = [f["name"] for f in parent.manifest["features"]["categorical"]]
    numeric = [f["name"] for f in parent.manifest["features"]["numeric"]]
    if theirs != list(spec.categorical) or numeric != list(spec.numeric):
        raise ConfigError(
            f"[features] grow_from: {parent.ref} was trained on other features (categorical "
            f"{theirs}, numeric {numeric}; this config: {list(spec.categorical)}, "
            f"{list(spec.numeric)})"
        )
    grown = {
        f: grow_vocab(parent.vocabs[f], vocabs[f].select("value", "count"), min_count)
        for f in spec.categorical
    }
    keys = {"users": [spec.user_id], "items": [spec.item_id],
            "user_domain": spec.grain_keys("userdom"), "item_domain": spec.grain_keys("itemdom")}  # fmt: skip
    tables = {
        name: grow_table(t, parent.tables[name], keys[name]) if name in parent.tables else t
        for name, t in tables.items()
    }
    r = parent.resolved
    lineage = {
        "model": parent.ref,
        "name": r.name,
        "version": r.version,
        "run_id": r.run_id,
        "appended": {f: grown[f].height - parent.vocabs[f].height for f in spec.categorical},
    }
    return grown, numeric_stats(parent.manifest), tables, lineage


def build_reference(
    cfg: Config,
) -> tuple[pl.DataFrame, dict[str, pl.DataFrame], dict[str, dict[str, float]], Plan]:
    """The single-process Polars reference of the whole pipeline (same transforms, one frame)."""
    plan = plan_features(cfg)
    inter = (
        scan_table(plan.tables["interactions"]).filter(bad_row_reason(cfg.data).is_null()).collect()
    )
    out, vocabs, stats = ex.build_examples_reference(
        inter, plan.users, plan.items, plan.spec, plan.schema, plan.boundaries,
        cfg.features.min_count, cfg.features.max_vocab,
    )  # fmt: skip
    return out, vocabs, stats, plan


def summarize(manifest: dict[str, Any], store: str | Path) -> str:
    rows = manifest["splits"]["rows"]
    lines = [
        f"feature store: {Path(store).resolve()}",
        f"  examples: train {rows['train']:,} / valid {rows['valid']:,} / "
        + (f"test {rows['test']:,}" if rows["test"] else "no test (features.test_fraction = 0)")
        + f" rows ({len(manifest['domains'])} domains: {', '.join(manifest['domains'])})",
        f"  features: {len(manifest['features']['categorical'])} categorical, {len(manifest['features']['numeric'])} numeric;"
        f" tasks: {', '.join(t['name'] for t in manifest['tasks'])}",
        f"  manifest: {Path(store).resolve() / MANIFEST} (fingerprint {manifest['fingerprint']})",
        f"  took {manifest['timings_s']['total']:.1f}s ({manifest['timings_s']['ray_init']:.1f}s Ray start-up)",
    ]
    since, grown = manifest["splits"].get("since"), manifest.get("grown_from")
    if since is not None:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(since))
        lines.append(f"  window: the newest {manifest['splits']['window_days']:g} day(s), examples "
                     f"from {when} UTC; older rows feed the history features only")  # fmt: skip
    if grown:
        added = ", ".join(f"{f} +{n:,}" for f, n in grown["appended"].items() if n) or "none"
        lines.append(f"  grown from {grown['name']} v{grown['version']}: its vocabularies, "
                     f"normalisation and priors kept; new values appended: {added}")  # fmt: skip
    if manifest["validation"]["rejected_total"]:
        lines.append(
            f"  rejected rows: {manifest['validation']['rejected_total']:,} -> {Path(store).resolve() / 'rejects'}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = command_parser("features", __doc__)
    ap.add_argument(
        "--window-days", type=float, default=None, metavar="N",
        help="examples from the newest N days of the log only; older rows feed the history "
        "features (features.window_days; a retrain's store)",
    )  # fmt: skip
    ap.add_argument(
        "--grow-from", nargs="?", const="", default=None, metavar="MODEL",
        help="keep this model's vocabularies (new values appended), normalisation and lookup "
        "rows (features.grow_from; without a value: the config's model at its alias)",
    )  # fmt: skip
    args, cfg = config_from_args(ap, argv, {"window_days": "features.window_days"})
    if args.grow_from is not None:
        cfg = cfg.replace(features=dataclasses.replace(
            cfg.features, grow_from=args.grow_from or cfg.model_uri))  # fmt: skip
    manifest = build_features(cfg, progress=not args.no_progress)
    print(summarize(manifest, cfg.features.store_dir), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
