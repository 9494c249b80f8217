"""Decisions from live traffic: ``recsys-moe online-report`` and ``recsys-moe promote
--from-live``, both over the service's online log (``online_log_dir`` of the serve config:
every answer's scores, a challenger's shadow or canary scores, and ``POST /feedback``).

    recsys-moe online-report [--serve-config serving/config.yaml]
    recsys-moe promote --from-live [--serve-config serving/config.yaml] [--segment NAME]
                       [--min-events 1000] [--confidence 0.95]

``online-report`` joins the feedback to the logged scores, prints AUC and log loss per
segment x variant x version x task and logs them as an MLflow run in the champion's
experiment (tagged ``online.report``), beside its offline runs.

``promote --from-live`` compares a segment's challenger with its champion on the
requests both scored (shadow mode: every request; canary mode: the canary's requests,
which the champion also scores off the answer path): the challenger's mean AUC over the
tasks minus the champion's, with a paired bootstrap over requests. The segment's
champion alias moves to the challenger's version only when the challenger is ahead at
``--confidence`` (the bootstrap's lower bound above 0) on at least ``--min-events``
events with feedback; otherwise it refuses and says why. The decision and its evidence
are recorded as an MLflow run and on the version, as every promotion is
(:func:`recsys_moe.registry.promote`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from recsys_moe import online_log
from serving.run import DEFAULT, read_serve_config
from serving.settings import Segment, ServeSettings, SettingsError


class LiveError(ValueError):
    """The live evidence cannot be read for this config (the message says why)."""


def _settings(path: str | Path) -> ServeSettings:
    s = ServeSettings.from_dict(read_serve_config(path)["applications"][0]["args"])
    if not s.online_log_dir:
        raise LiveError(f"{path}: no online_log_dir: the service keeps no online log")
    if not Path(s.online_log_dir).is_dir():
        raise LiveError(f"{s.online_log_dir}: no online log yet (start the service with it)")
    return s


def report_rows(s: ServeSettings) -> tuple[list[dict[str, Any]], dict[str, int]]:
    df, counts = online_log.joined(s.online_log_dir)
    return online_log.online_metrics(df), counts


def format_report(rows: list[dict[str, Any]], counts: dict[str, int]) -> str:
    lines = [
        f"feedback events: {counts['feedback']:,} ({counts['joined']:,} joined to logged "
        f"scores, {counts['unmatched']:,} unmatched)",
        f"{'segment':<10} {'variant':<10} {'role':<7} {'version':>7} {'task':<12} "
        f"{'events':>8} {'AUC':>7} {'logloss':>8}",
    ]
    for r in rows:
        lines.append(
            f"{r['segment']:<10} {r['variant']:<10} {r['role']:<7} {r['model_version']!s:>7} "
            f"{r['task']:<12} {r['n']:>8,} {r['auc']:>7.4f} {r['logloss']:>8.4f}"
        )
    return "\n".join(lines)


def _experiment_of(s: ServeSettings, alias: str) -> tuple[Any, str, str]:
    """The registry client, the version at ``alias`` and its run's experiment."""
    from recsys_moe.registry import alias_version, client

    c = client(s.tracking_uri)
    mv = alias_version(s.model_name, alias, s.tracking_uri)
    if mv is None:
        raise LiveError(f"no model models:/{s.model_name}@{alias} in {c.tracking_uri}")
    exp = c.get_run(mv.run_id).info.experiment_id if mv.run_id else "0"
    return c, str(mv.version), exp


def log_report(s: ServeSettings, rows: list[dict[str, Any]], counts: dict[str, int]) -> str:
    """An MLflow run with the online metrics, in the champion's experiment."""
    c, version, exp = _experiment_of(s, s.model_alias)
    run = c.create_run(exp, run_name="online-report", tags={
        "online.report": "true", "online.log_dir": str(Path(s.online_log_dir).resolve()),
        "champion.version": version})  # fmt: skip
    metrics = {f"online/feedback_{k}": float(v) for k, v in counts.items()}
    for r in rows:
        key = f"online/{r['segment']}/{r['variant']}_v{r['model_version']}/{r['role']}/{r['task']}"
        metrics[f"{key}/events"] = float(r["n"])
        if r["auc"] == r["auc"]:
            metrics[f"{key}/auc"] = r["auc"]
        if r["logloss"] == r["logloss"]:
            metrics[f"{key}/logloss"] = r["logloss"]
    for k, v in metrics.items():
        c.log_metric(run.info.run_id, k, v)
    c.set_terminated(run.info.run_id)
    return run.info.run_id


def _challenged(s: ServeSettings, name: str | None) -> Segment:
    with_challenger = [g for g in s.segments if g.challenger_alias]
    if name is not None:
        seg = next((g for g in s.segments if g.name == name), None)
        if seg is None or not seg.challenger_alias:
            raise LiveError(f"segment {name!r} has no challenger_alias in the serve config")
        return seg
    if len(with_challenger) != 1:
        names = [g.name for g in with_challenger]
        raise LiveError(f"name the segment (--segment): segments with a challenger: {names}")
    return with_challenger[0]


def decide_from_live(
    s: ServeSettings,
    segment: str | None = None,
    min_events: int = 1000,
    confidence: float = 0.95,
    n_boot: int = 1000,
) -> dict[str, Any]:
    """Whether the segment's challenger takes its champion alias, on live evidence: the
    decision (:class:`recsys_moe.registry.Decision`), the versions and the bootstrap."""
    from recsys_moe.registry import Decision

    seg = _challenged(s, segment)
    champ_alias = seg.model_alias or s.model_alias
    _, champ, _ = _experiment_of(s, champ_alias)
    _, chal, _ = _experiment_of(s, seg.challenger_alias or "")
    df, counts = online_log.joined(s.online_log_dir)
    pairs = online_log.paired(df, seg.name)
    if not pairs.is_empty():  # the versions behind the aliases now, not earlier ones
        pairs = pairs.filter(
            (pairs["champion_version"].cast(str) == champ)
            & (pairs["challenger_version"].cast(str) == chal)
        )
    tasks = online_log.task_names(df) if not df.is_empty() else []
    tasks = [t for t in tasks if f"q_{t}" in pairs.columns]
    boot = (
        online_log.paired_bootstrap(pairs, tasks, confidence, n_boot)
        if tasks and pairs.height
        else {"events": 0.0, "positives": 0.0, "requests": 0.0, "diff": float("nan")}
    )
    who = f"v{chal} over v{champ} in segment {seg.name}"
    if boot["events"] < min_events:
        reason = (f"not promoted: {int(boot['events']):,} feedback events on requests both "
                  f"versions scored ({who}); at least {min_events:,} needed")  # fmt: skip
        decision = Decision(False, reason)
    elif boot["diff"] != boot["diff"]:
        decision = Decision(False, f"not promoted: every task needs both outcomes in the "
                                   f"feedback ({who})")  # fmt: skip
    else:
        on = (f"mean AUC over {', '.join(tasks)} on {int(boot['events']):,} events of "
              f"{int(boot['requests']):,} requests: challenger {boot['diff']:+.4f}, "
              f"{confidence:.0%} lower bound {boot['low']:+.4f}")  # fmt: skip
        ahead = boot["low"] > 0
        decision = Decision(ahead, f"{'promoted' if ahead else 'not promoted'} from live "
                                   f"traffic ({who}): {on}")  # fmt: skip
    return {"decision": decision, "segment": seg.name, "champion": champ, "challenger": chal,
            "alias": champ_alias, "bootstrap": boot, "counts": counts, "tasks": tasks}  # fmt: skip


def promote_from_live(s: ServeSettings, **kw: Any) -> dict[str, Any]:
    """:func:`decide_from_live`, recorded as an MLflow run and applied to the registry."""
    from recsys_moe.registry import promote

    out = decide_from_live(s, **kw)
    c, _, exp = _experiment_of(s, out["alias"])
    run = c.create_run(exp, run_name=f"promote-from-live-{out['segment']}", tags={
        "online.promotion": "true", "champion.version": out["champion"],
        "challenger.version": out["challenger"], "segment": out["segment"]})  # fmt: skip
    for k, v in out["bootstrap"].items():
        if v == v:
            c.log_metric(run.info.run_id, f"live/{k}", float(v))
    out["registry"] = promote(s.model_name, out["challenger"], out["alias"], out["decision"],
                              run_id=run.info.run_id, uri=s.tracking_uri)  # fmt: skip
    c.set_terminated(run.info.run_id)
    return out


def main_report(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="recsys-moe online-report", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--serve-config", default=str(DEFAULT))
    ap.add_argument("--no-mlflow", action="store_true", help="print only, log no run")
    args = ap.parse_args(argv)
    try:
        s = _settings(args.serve_config)
        rows, counts = report_rows(s)
        print(format_report(rows, counts), flush=True)
        if not args.no_mlflow:
            run_id = log_report(s, rows, counts)
            print(f"MLflow run: {run_id} ({s.tracking_uri or 'the default store'})", flush=True)
    except (LiveError, SettingsError) as e:
        print(f"recsys-moe online-report: error: {e}", file=sys.stderr)
        return 2
    return 0


def main_promote(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="recsys-moe promote", description="move a champion alias")
    ap.add_argument("--from-live", action="store_true", required=True,
                    help="on the online log's evidence (the only mode)")  # fmt: skip
    ap.add_argument("--serve-config", default=str(DEFAULT))
    ap.add_argument("--segment", default=None, help="the segment whose challenger is judged")
    ap.add_argument("--min-events", type=int, default=1000)
    ap.add_argument("--confidence", type=float, default=0.95)
    args = ap.parse_args(argv)
    try:
        s = _settings(args.serve_config)
        out = promote_from_live(s, segment=args.segment, min_events=args.min_events,
                                confidence=args.confidence)  # fmt: skip
    except (LiveError, SettingsError) as e:
        print(f"recsys-moe promote: error: {e}", file=sys.stderr)
        return 2
    print(out["decision"].reason, flush=True)
    return 0 if out["decision"].promoted else 1
