"""``recsys-moe extend``: add a new domain to a trained model, or experts to one of its
domains, without retraining the rest.

    recsys-moe extend --model models:/recsys_moe_default@champion --domain live --data data/raw/live
    recsys-moe extend --model models:/recsys_moe_default@champion --domain video --add-experts 2

``--add-experts N`` gives an existing domain N experts of its own: they start as copies
of the experts the domain's gates use most (the busiest first; copies share the
original's logit, so the domain's scores start exactly where the parent's are), and only
they and the domain's gates (a copy of its parent gates that can also reach them) train,
on the domain's rows of the parent's own feature store (``--store``, default the one the
parent's manifest names; its fingerprint must match). Every other domain is computed by
the parent's code path and weights (bit-identical, checked on probe rows), and the alias
moves only if the domain's validation AUC beats the parent's on the same rows. Otherwise
as below, without steps 1's vocabulary growth.

1. **Data.** ``--data`` is a raw log in the parent's schema holding the new domain's
   interactions (plus users / items tables for its entities). Its rows are turned into
   examples by the same ``features/`` code as the feature store: point-in-time history
   over the parent's own raw log (named in its manifest, when still on disk) plus the new
   rows, so a user's history counts every domain as a full rebuild would; the new domain
   gets its own time split. Vocabularies only grow (new values appended after the
   parent's, so every existing index keeps its meaning); numeric normalisation and task
   priors stay the parent's. The lookup tables keep every existing key's row and gain
   rows for new keys and for (user | item, new domain).
2. **Model.** :func:`recsys_moe.model.grow.grow` adds the domain's experts and gates
   (warm-started at the parent's treatment of an unknown domain) and new embedding rows;
   :func:`~recsys_moe.model.grow.freeze` leaves only those trainable (``[extend]`` in
   the config can unfreeze more). Trained on the new domain's rows (plus a replay sample
   of the old ones if configured), early-stopped on its validation AUC. While only the
   new parameters train, the parent's part of each row (expert input and the parent
   experts' outputs) is a constant: it is computed once and cached (``extend.cache_gb``).
3. **Checks.** The parent's tensors are verified unchanged, and probe rows of every
   existing domain are scored by the parent and the child bundles: the largest
   difference must be at most ``extend.existing_tolerance`` (0: bit-identical).
4. **Registry.** An MLflow run (params, per-epoch metrics, the checks, lineage tags
   ``parent.*`` and ``mlflow.parentRunId`` = the parent's run) logs the bundle and
   registers a new version of the same model; the alias moves to it only if existing
   domains are unchanged and the new domain's validation AUC reaches ``extend.min_auc``
   and beats the parent's own scores for it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from features import examples as ex
from features.history import merge_snapshots, snapshot_aggregates
from features.spec import GRAINS, SPLIT
from features.store import child_manifest, grow_table, grow_vocab
from pipelines.cli import command_parser, parse_model_command
from recsys_moe.bundle import BundleError, write_bundle
from recsys_moe.config import Config, ExtendConfig, config_from_dict
from recsys_moe.data.schema import (
    RawLogError,
    TableFiles,
    bad_row_reason,
    scan_table,
)
from recsys_moe.model.grow import freeze, frozen_changes, grow, trainable_count
from recsys_moe.model.inputs import ExampleTensors, InputSpec
from recsys_moe.registry import ModelNotFound, open_model
from recsys_moe.scorer import RequestError, Scorer
from recsys_moe.training import evaluate_model, task_metrics, train_extension


class ExtendError(ValueError):
    """The extension cannot be built from these inputs (the message says why)."""


@dataclass
class ExtensionData:
    manifest: dict[str, Any]  # the child's manifest (grown vocabularies, one more domain)
    vocabs: dict[str, pl.DataFrame]
    tables: dict[str, pl.DataFrame]
    examples: dict[str, pl.DataFrame]  # the new domain's encoded rows per split
    raw: dict[str, pl.DataFrame]  # the same rows as raw request rows + labels, per split
    probe: pl.DataFrame  # raw rows of the existing domains, for the unchanged check
    replay: pl.DataFrame | None  # encoded training rows of the existing domains
    history: list[str]  # the raw logs the history features were computed over
    grown: dict[str, int]  # feature -> values appended to its vocabulary


def _read_interactions(paths: list[Path], cfg: Config) -> pl.DataFrame:
    fmt = "csv" if paths[0].suffix == ".csv" else "parquet"
    lf = scan_table(TableFiles("interactions", paths, fmt))
    return lf.filter(bad_row_reason(cfg.data).is_null()).collect()


def extension_data(
    parent: Scorer, data_dir: str | Path, domain: str, ecfg: ExtendConfig, history: bool = True
) -> ExtensionData:
    """Examples, grown vocabularies and tables for ``domain`` from the raw log in ``data_dir``:
    the feature pipeline's own transforms (``features.examples``: prepare, user stage, item
    stage, vocabulary counts, encode) over the parent's log and the new rows, in steps."""
    from pipelines.build_features import plan_features

    man = parent.manifest
    if domain in man["domains"]:
        raise ExtendError(
            f"domain {domain!r} is already in the model ({man['domains']}); to give it more "
            "capacity use --add-experts N"
        )
    # the sections that say how the parent's features were made (a manifest written by an
    # older release may carry sections or keys this one no longer has)
    base = config_from_dict({k: man["config"][k] for k in ("source", "data", "features")})
    cfg = base.replace(data=dataclasses.replace(base.data, raw_dir=str(data_dir)))
    plan = plan_features(cfg)  # validates the new log (missing files / columns, dtypes)
    spec = parent.spec
    events, sources = _events(parent, plan, cfg, data_dir, domain, history)
    parent_b = ex.Boundaries(man["splits"]["valid_start"], man["splits"]["test_start"])
    df = ex.prepare(events, spec, plan.schema, parent_b)
    is_new = pl.col(spec.domain).cast(pl.String) == domain
    df, b = _split_new_domain(df, is_new, spec, cfg)
    attr = _attributes(parent, plan, cfg)
    df = ex.item_stage(ex.user_stage(df, attr["users"], spec), attr["items"], spec)
    rows = df.filter(is_new)
    vocabs, grown = _grown_vocabs(parent, rows, cfg, ecfg, domain)
    enc = ex.encode(rows, spec, vocabs, parent.stats)
    examples = {s: enc.filter(pl.col(SPLIT) == s).drop(SPLIT) for s in ("train", "valid", "test")}
    if examples["train"].height == 0 or examples["valid"].height == 0:
        raise ExtendError(f"domain {domain!r}: too few timestamps for a train / valid split")
    raw = {s: rows.filter(pl.col(SPLIT) == s).select(_raw_columns(spec)) for s in examples}
    tables = _grown_tables(parent, df, attr, is_new)
    old_rows = df.filter(~is_new)
    probe = _probe_rows(parent, old_rows, cfg, ecfg, parent_b)
    replay = None
    if ecfg.replay_fraction > 0 and old_rows.height:
        train_old = old_rows.filter(pl.col(SPLIT) == "train")
        replay = ex.encode(
            train_old.sample(fraction=ecfg.replay_fraction, seed=ecfg.seed), spec, vocabs,
            parent.stats,
        ).drop(SPLIT)  # fmt: skip
    manifest = child_manifest(man, vocabs, tables, domain, {
        "inputs": sources,
        "splits": {"valid_start": b.valid_start, "test_start": b.test_start,
                   "rows": {s: e.height for s, e in examples.items()}},
        "vocab_growth": grown,
    })  # fmt: skip
    return ExtensionData(
        manifest, vocabs, tables, examples, raw, probe, replay, sources, grown
    )  # fmt: skip


def _raw_columns(spec: InputSpec) -> list[str]:
    """What a request row holds, with its labels."""
    return [
        spec.user_id, spec.item_id, spec.domain, spec.timestamp,
        *spec.context_categorical, *spec.context_numeric, *spec.tasks,
    ]  # fmt: skip


def _events(
    parent: Scorer, plan, cfg: Config, data_dir: str | Path, domain: str, history: bool
) -> tuple[pl.DataFrame, list[str]]:
    """The new domain's interactions from ``data_dir``, after the parent's own raw log's
    (when ``history`` and it is still on disk: history features then count every domain,
    as a full rebuild would); and the files they came from."""
    man, d = parent.manifest, cfg.data
    new = _read_interactions(plan.tables["interactions"].paths, cfg)
    in_domain = pl.col(d.domain).cast(pl.String) == domain
    others = new.filter(~in_domain).height
    new = new.filter(in_domain)
    if new.height == 0:
        raise ExtendError(f"{data_dir}: no interactions of domain {domain!r}")
    if others:
        print(f"extend: ignoring {others:,} rows of other domains in {data_dir}", flush=True)
    sources = [str(p) for p in plan.tables["interactions"].paths]
    old_paths = [Path(p) for p in man.get("inputs", {}).get("interactions", [])]
    parts = [new]
    if history and old_paths and all(p.exists() for p in old_paths):
        old = _read_interactions(old_paths, cfg).filter(
            pl.col(d.domain).cast(pl.String).is_in(man["domains"])
        )
        parts.insert(0, old.select([pl.col(c).cast(new.schema[c]) for c in new.columns]))
        sources = [str(p) for p in old_paths] + sources
    elif history:
        print(
            "extend: the parent's raw log is not on disk; history features count the new "
            "domain's events only, and no replay or real probe rows are available",
            flush=True,
        )
    return pl.concat(parts, how="vertical_relaxed"), sources


def _split_new_domain(
    df: pl.DataFrame, is_new: pl.Expr, spec: InputSpec, cfg: Config
) -> tuple[pl.DataFrame, ex.Boundaries]:
    """The new domain's rows get a time split of their own; the parent's keep theirs."""
    b = ex.compute_boundaries(
        df.filter(is_new).select(spec.timestamp),
        spec.timestamp,
        cfg.features.valid_fraction,
        cfg.features.test_fraction,
    )
    split = pl.when(is_new).then(ex.split_expr(spec.timestamp, b)).otherwise(pl.col(SPLIT))
    return df.with_columns(split.alias(SPLIT)), b


def _attributes(parent: Scorer, plan, cfg: Config) -> dict[str, pl.DataFrame]:
    """Users' and items' attributes: the parent's rows for known keys, the new log's for
    new keys."""
    spec, d = parent.spec, cfg.data
    attr = {}
    for name, key, cat, num, new_attr in (
        ("users", spec.user_id, d.user_categorical, d.user_numeric, plan.users),
        ("items", spec.item_id, d.item_categorical, d.item_numeric, plan.items),
    ):
        cols = [key, *cat, *num]
        attr[name] = grow_table(parent.tables[name].select(cols), new_attr.select(cols), [key])
    return attr


def _grown_vocabs(
    parent: Scorer, rows: pl.DataFrame, cfg: Config, ecfg: ExtendConfig, domain: str
) -> tuple[dict[str, pl.DataFrame], dict[str, int]]:
    """Append-only vocabularies (every existing index keeps its meaning) and how many
    values each gained."""
    spec = parent.spec
    counts = ex.vocab_counts(rows, spec)
    min_count = cfg.features.min_count
    vocabs = {
        f: grow_vocab(parent.vocabs[f], counts[f], min_count)
        if ecfg.new_embedding_rows or f == spec.domain
        else parent.vocabs[f]
        for f in spec.categorical
    }
    grown = {f: vocabs[f].height - parent.vocabs[f].height for f in spec.categorical}
    if vocabs[spec.domain].height != parent.vocabs[spec.domain].height + 1:
        raise ExtendError(
            f"domain {domain!r} has fewer than features.min_count={min_count} training rows"
        )
    return vocabs, grown


def _grown_tables(
    parent: Scorer, df: pl.DataFrame, attr: dict[str, pl.DataFrame], is_new: pl.Expr
) -> dict[str, pl.DataFrame]:
    """The lookup tables: every existing key's row unchanged; new keys and new-domain rows
    added."""
    spec = parent.spec
    tables = dict(parent.tables)
    if spec.history_features:
        snaps = {g: merge_snapshots([snapshot_aggregates(df, spec, g)], spec, g) for g in GRAINS}
        for name, grain, key in (
            ("users", "user", spec.user_id),
            ("items", "item", spec.item_id),
        ):
            full = attr[name].join(snaps[grain], on=key, how="full", coalesce=True)
            tables[name] = grow_table(parent.tables[name], full, [key])
        for name, grain in (("user_domain", "userdom"), ("item_domain", "itemdom")):
            add = snaps[grain].filter(is_new)
            tables[name] = grow_table(parent.tables[name], add, spec.grain_keys(grain))
    else:
        for name, key in (("users", spec.user_id), ("items", spec.item_id)):
            tables[name] = grow_table(parent.tables[name], attr[name], [key])
    return tables


def _probe_rows(
    parent: Scorer, old_rows: pl.DataFrame, cfg: Config, ecfg: ExtendConfig, parent_b
) -> pl.DataFrame:
    """Raw rows of the existing domains for the unchanged check: their held-out window,
    or, without the parent's log, known users x known items in every existing domain."""
    spec, man = parent.spec, parent.manifest
    if old_rows.height:
        held = "test" if cfg.features.test_fraction > 0 else "valid"  # no test split: valid
        return (
            old_rows.filter(pl.col(SPLIT) == held)
            .group_by(spec.domain, maintain_order=True)
            .head(ecfg.probe_rows)
            .select(_raw_columns(spec))
        )
    rng = np.random.default_rng(ecfg.seed)
    n = ecfg.probe_rows * len(man["domains"])
    users, items = parent.tables["users"][spec.user_id], parent.tables["items"][spec.item_id]
    return pl.DataFrame(
        {
            spec.user_id: users.gather(rng.integers(0, users.len(), n)),
            spec.item_id: items.gather(rng.integers(0, items.len(), n)),
            spec.domain: np.repeat(man["domains"], ecfg.probe_rows),
            spec.timestamp: np.full(n, int(parent_b.test_start), dtype=np.int64),
        }
    )


def grown_domain_data(
    parent: Scorer, domain: str, store: str | Path | None, ecfg: ExtendConfig
) -> ExtensionData:
    """The rows of an existing ``domain`` for ``extend --add-experts``: the parent's own
    feature store (``store``, default the one its manifest names), which must be the
    very store it was trained on (same fingerprint): same examples, same split, same
    vocabularies. Probe rows: the other domains' test rows."""
    from features.store import held_out_split, load_manifest, read_examples

    man = parent.manifest
    if domain not in man["domains"]:
        raise ExtendError(
            f"domain {domain!r} is not in the model ({man['domains']}); to add a new domain "
            "leave out --add-experts and give --data"
        )
    store = Path(store or man["config"]["features"]["store_dir"])
    if not (store / "manifest.json").is_file():
        raise ExtendError(
            f"{store}: not a feature store (the parent was trained on "
            f"{man['config']['features']['store_dir']!r}; pass --store)"
        )
    if load_manifest(store).get("fingerprint") != man.get("fingerprint"):
        raise ExtendError(
            f"{store}: not the feature store the parent was trained on (another fingerprint)"
        )
    col = pl.col(parent.spec.domain).cast(pl.String)
    examples, probe = {}, []
    held = held_out_split(load_manifest(store))  # the probe rows: test, or valid without one
    for split in ("train", "valid", "test"):
        if split == "test" and held != "test":  # a store without a test split
            examples[split] = examples["valid"].clear()
            continue
        rows = read_examples(store, split)
        examples[split] = rows.filter(col == domain)
        if split == held:
            others = rows.filter(col != domain).group_by(col, maintain_order=True)
            probe.append(parent.example_rows(others.head(ecfg.probe_rows)))
    if examples["train"].height == 0 or examples["valid"].height == 0:
        raise ExtendError(f"{store}: no training or validation rows of domain {domain!r}")
    return ExtensionData(
        man, parent.vocabs, parent.tables, examples, {}, pl.concat(probe), None, [str(store)],
        {},
    )  # fmt: skip


# ------------------------------------------------------------------ checks


def _new_values(child: Scorer, parent, rows: pl.DataFrame) -> np.ndarray:
    """Rows with a categorical value appended to a vocabulary by the extension."""
    enc = child.features(rows)
    hit = np.zeros(rows.height, dtype=bool)
    for f in parent.spec.sparse:
        if f.column == parent.spec.domain_column:
            continue
        col = pl.col(f.column)
        expr = col.list.max() if f.multi_valued else col
        hit |= enc.select((expr.fill_null(0) >= f.vocab_size).alias("x"))["x"].to_numpy()
    return hit


def _auc_of(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k == "auc_mean" or k.endswith("/all/auc")}


def _auc(spec: InputSpec, raw: pl.DataFrame, preds: np.ndarray) -> dict[str, float]:
    labels = np.stack([raw[t.name].cast(pl.Float32).to_numpy() for t in spec.tasks], axis=1)
    dom = np.full(raw.height, spec.n_domains - 1)
    return _auc_of(task_metrics(spec, labels, preds, dom))


# ------------------------------------------------------------------ the command


def run_extend(
    cfg: Config,
    *,
    model: str,
    domain: str,
    data_dir: str | Path | None = None,
    output: str | Path | None = None,
    register: bool = True,
    progress: bool = True,
    add_experts: int = 0,
    store: str | Path | None = None,
) -> dict[str, Any]:
    """Extend ``model`` with the new ``domain`` from the raw log ``data_dir``, or with
    ``add_experts`` > 0 give the existing ``domain`` that many experts of its own, trained
    on the parent's feature store (``store``); returns the summary."""
    t0 = time.perf_counter()
    ecfg = cfg.extend
    grows = add_experts > 0
    if add_experts < 0:
        raise ExtendError(f"--add-experts {add_experts}: must be >= 1")
    if not grows and data_dir is None:
        raise ExtendError("a new domain needs its raw log (--data); or --add-experts N")
    resolved, parent = _open_parent(model, domain, grows)
    pm = parent.model
    what = f"domain {domain!r} gains {add_experts} experts" if grows else f"new domain {domain!r}"
    print(f"extend: parent {resolved.uri} (version {resolved.version}); {what}")
    if grows:
        data = grown_domain_data(parent, domain, store, ecfg)
    else:
        data = extension_data(parent, data_dir, domain, ecfg)
    t_data = time.perf_counter() - t0
    spec = InputSpec.from_manifest(data.manifest)
    train, valid, test = _tensors(data, spec)
    torch.manual_seed(ecfg.seed)
    child = grow(pm, spec, add_experts or ecfg.experts, train.batch(slice(0, 4096)),
                 cross=ecfg.cross, existing=domain if grows else None)  # fmt: skip
    params = freeze(child, pm, ecfg.unfreeze, ecfg.new_embedding_rows)
    print(
        f"extend: {data.examples['train'].height:,} train / {data.examples['valid'].height:,} "
        f"valid / {data.examples['test'].height:,} test rows of {domain!r}"
        + (f" + {data.replay.height:,} replayed" if data.replay is not None else "")
        + f"; {trainable_count(params):,} trainable parameters; vocabularies grown by "
        + ", ".join(f"{f} +{n}" for f, n in data.grown.items() if n),
        flush=True,
    )
    # the parent's own scores for the domain: on the same examples for a grown one; for a
    # new domain (unknown to the parent) on its raw rows through the parent's scorer
    if grows:
        parent_valid = _auc_of(evaluate_model(pm, valid)[0])
    else:
        parent_valid = _auc(spec, data.raw["valid"], parent.score(data.raw["valid"]))
    fitres = train_extension(child, params, train, valid, ecfg, progress=progress)
    start_valid = fitres["start_valid"]
    t_train = fitres["seconds"]
    changed = frozen_changes(child, pm, ecfg.unfreeze)
    val = evaluate_model(child, valid)[0]
    tst = evaluate_model(child, test)[0] if test is not None else {}
    out = Path(output or Path("models") / (f"extend-{domain}" + ("-experts" if grows else "")))
    parent_info = {"uri": resolved.uri, "name": resolved.name, "version": resolved.version}
    # the parent's training-time routing stays the reference for its gates in serving
    write_bundle(child, out, data.manifest, vocabs=data.vocabs, tables=data.tables,
                 extra={"parent": parent_info, "router_load": parent.router_reference})  # fmt: skip
    max_diff, max_diff_new, new_vals = _existing_domains_moved(out, parent, data.probe)
    gates = {
        "existing_unchanged": max_diff <= ecfg.existing_tolerance and not changed,
        "reaches_min_auc": val.get("auc_mean", 0.0) >= ecfg.min_auc,
        # an extension whose training never beat its start is the parent (up to float
        # rounding), never an improvement
        "beats_parent": fitres["best_epoch"] >= 0
        and val.get("auc_mean", 0.0) > parent_valid.get("auc_mean", 0.0),
    }
    summary = {
        "domain": domain,
        "kind": "add_experts" if grows else "new_domain",
        "added_experts": child.extensions[-1].experts.n_experts,
        "parent": parent_info,
        "bundle": str(out.resolve()),
        "rows": {s: e.height for s, e in data.examples.items()},
        "replay_rows": 0 if data.replay is None else data.replay.height,
        "trainable_params": trainable_count(params),
        "total_params": sum(p.numel() for p in child.parameters()),
        "best_epoch": fitres["best_epoch"],
        "history": fitres["history"],
        "valid": {k: v for k, v in val.items() if k == "auc_mean" or k.endswith("/auc")},
        "test": {k: v for k, v in tst.items() if k == "auc_mean" or k.endswith("/auc")},
        "valid_at_start": start_valid.get("auc_mean", math.nan),
        "parent_valid": parent_valid,
        "probe_rows": data.probe.height,
        "existing_max_abs_diff": max_diff,
        # probe rows carrying a value the parent had no embedding for (a user first seen in
        # the new domain, ...): the child knows it now, so their scores may move
        "probe_rows_new_values": int(new_vals.sum()),
        "existing_max_abs_diff_new_values": max_diff_new,
        "changed_parent_tensors": changed,
        "gates": gates,
        "promoted": False,
        "seconds": {"data": round(t_data, 2), "train": round(t_train, 2)},
        "history_sources": data.history,
    }
    if register:
        summary["registry"] = _track(cfg, summary, out, data, resolved)
        summary["promoted"] = summary["registry"]["promoted"]
    summary["seconds"]["total"] = round(time.perf_counter() - t0, 2)
    (out / "extend_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _open_parent(model: str, domain: str, grows: bool) -> tuple[Any, Scorer]:
    """The registered (or bundled) parent, checked extendable before any data work."""
    resolved, parent = open_model(model)
    try:
        core = parent.model.require_extendable()
        if grows and core.extension_of(parent.domain_index(domain)) is not None:
            raise ValueError(f"domain {domain!r} was added or grown by an earlier extension; "
                             "growing it again is not supported")  # fmt: skip
    except ValueError as e:
        raise ExtendError(str(e)) from None
    return resolved, parent


def _tensors(
    data: ExtensionData, spec: InputSpec
) -> tuple[ExampleTensors, ExampleTensors, ExampleTensors | None]:
    """Train (with the replayed rows), valid and test (None: no test split) tensors."""
    train_rows = data.examples["train"]
    if data.replay is not None:
        train_rows = pl.concat([train_rows, data.replay.select(train_rows.columns)])
    test = data.examples["test"]
    return (
        ExampleTensors(spec, train_rows),
        ExampleTensors(spec, data.examples["valid"]),
        ExampleTensors(spec, test) if test.height else None,
    )


def _existing_domains_moved(
    out: Path, parent: Scorer, probe: pl.DataFrame
) -> tuple[float, float, np.ndarray]:
    """The same probe rows of the existing domains through the parent's and the child's
    bundles: the largest score difference on rows the parent fully knew, the largest on
    rows carrying a value it had no embedding for, and which rows those are."""
    child = Scorer.from_dir(out)
    diff = np.abs(child.score(probe) - parent.score(probe)).max(axis=1)
    new_vals = _new_values(child, parent.model, probe)
    max_diff = float(diff[~new_vals].max()) if (~new_vals).any() else 0.0
    max_diff_new = float(diff[new_vals].max()) if new_vals.any() else 0.0
    return max_diff, max_diff_new, new_vals


def _track(cfg: Config, summary: dict, out: Path, data: ExtensionData, resolved) -> dict:
    """One MLflow run with lineage; a new registered version, promoted if the gates pass."""
    import mlflow

    from recsys_moe import registry
    from recsys_moe.tracking import Tracker, flatten, log_metrics

    local = resolved.version == "local"
    name, alias = (cfg.model_name if local else resolved.name), cfg.serving.model_alias
    grows = summary["kind"] == "add_experts"
    run_name = f"extend-{summary['domain']}" + ("-experts" if grows else "")
    with Tracker.open(cfg, run_name) as tr:
        mlflow.log_params(flatten({"extend": dataclasses.asdict(cfg.extend)}))
        mlflow.log_params({"extend.domain": summary["domain"], "parent.uri": resolved.uri,
                           "extend.added_experts": summary["added_experts"]})  # fmt: skip
        tags = {
            "parent.model": resolved.name,
            "parent.version": str(resolved.version),
            "parent.run_id": resolved.run_id,
            "extend.domain": summary["domain"],
            "extend.kind": summary["kind"],
            "extend.gates": json.dumps(summary["gates"]),
        }
        mlflow.set_tags(tags | ({"mlflow.parentRunId": resolved.run_id} if resolved.run_id else {}))
        mlflow.log_dict(data.manifest, "manifest.json")
        client = registry.client(tr.uri)
        for rec in summary["history"]:
            log_metrics(client, tr.run_id, {k: v for k, v in rec.items() if k != "epoch"},
                        step=int(rec["epoch"]))  # fmt: skip
        flat = {f"valid/{k}": v for k, v in summary["valid"].items()}
        flat |= {f"test/{k}": v for k, v in summary["test"].items()}
        flat |= {f"parent_valid/{k}": v for k, v in summary["parent_valid"].items()}
        flat |= {
            "existing_max_abs_diff": summary["existing_max_abs_diff"],
            "trainable_params": summary["trainable_params"],
            "train_seconds": summary["seconds"]["train"],
        }
        log_metrics(client, tr.run_id, flat)
        rows = data.examples["test"] if data.examples["test"].height else data.examples["valid"]
        tr.log_model(out, rows.head(5))
        auc = summary["valid"].get("auc_mean", math.nan)
        version = registry.register(
            tr.model_info.model_uri, name,
            {**tags, "run_id": tr.run_id, "promote_metric": "valid/auc_mean",
             "valid_score": f"{auc:.6f}"},
        )  # fmt: skip
        failed = [g for g, v in summary["gates"].items() if not v]
        parent_auc = summary["parent_valid"].get("auc_mean", math.nan)
        decision = registry.Decision(
            not failed,
            f"promoted to @{alias}: other domains unchanged, {summary['domain']!r} valid "
            f"auc_mean {auc:.4f} (parent {parent_auc:.4f})"
            if not failed
            else f"not promoted: failed {failed}",
        )
        return registry.promote(name, version, alias, decision, run_id=tr.run_id, uri=tr.uri)


def main(argv: list[str] | None = None) -> int:
    ap = command_parser("extend", __doc__, model=True)
    ap.add_argument("--domain", required=True,
                    help="the new domain's name (as in the raw log), or with --add-experts an "
                         "existing domain")  # fmt: skip
    ap.add_argument("--data", default=None, help="raw log folder with the new domain's rows")
    ap.add_argument("--add-experts", type=int, default=0, metavar="N",
                    help="give the existing --domain N experts of its own (everything else "
                         "frozen), trained on the parent's feature store")  # fmt: skip
    ap.add_argument("--store", default=None,
                    help="with --add-experts: the parent's feature store (default: the one "
                         "its manifest names)")  # fmt: skip
    ap.add_argument(
        "--output", default=None, help="bundle folder (default models/extend-<domain>[-experts])"
    )
    ap.add_argument("--no-register", action="store_true", help="no MLflow run / registry")
    args, cfg, model = parse_model_command(ap, argv)
    try:
        s = run_extend(
            cfg, model=model, domain=args.domain, data_dir=args.data, output=args.output,
            register=not args.no_register, progress=not args.no_progress,
            add_experts=args.add_experts, store=args.store,
        )  # fmt: skip
    except (ExtendError, RequestError, RawLogError, ModelNotFound, BundleError) as e:
        print(f"recsys-moe extend: error: {e}", file=sys.stderr)
        return 2
    v, pv = s["valid"].get("auc_mean", math.nan), s["parent_valid"].get("auc_mean", math.nan)
    what = (f"{s['added_experts']} experts for domain {s['domain']!r}"
            if s["kind"] == "add_experts" else f"domain {s['domain']!r}")  # fmt: skip
    parent_as = "the parent" if s["kind"] == "add_experts" else "parent, as an unknown domain"
    lines = [
        f"extended {s['parent']['uri']} with {what} in {s['seconds']['total']}s "
        f"(data {s['seconds']['data']}s, training {s['seconds']['train']}s; "
        f"{s['trainable_params']:,} of {s['total_params']:,} parameters trained)",
        f"  {s['domain']}: valid auc_mean {v:.4f} ({parent_as}: {pv:.4f}; "
        f"at start {s['valid_at_start']:.4f}), "
        + (f"test auc_mean {s['test']['auc_mean']:.4f}" if s["test"] else "no test split"),
        f"  other domains: max |score change| {s['existing_max_abs_diff']:.3g} over "
        f"{s['probe_rows'] - s['probe_rows_new_values']:,} probe rows (and "
        f"{s['existing_max_abs_diff_new_values']:.3g} over {s['probe_rows_new_values']:,} rows "
        f"with values new to the parent); parent tensors changed: "
        f"{len(s['changed_parent_tensors'])}",
        f"  gates: {s['gates']}",
    ]
    if "registry" in s:
        r = s["registry"]
        lines.append(f"  registered {r['name']} version {r['version']}: {r['decision']}")
    lines.append(f"bundle: {s['bundle']} (summary: {s['bundle']}/extend_summary.json)")
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
