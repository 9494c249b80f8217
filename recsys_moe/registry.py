"""The MLflow model registry: resolving a model reference to a bundle, alias look-ups,
registration and the one promotion step every command goes through.

A model reference is a bundle folder, ``models:/<name>@<alias>`` or
``models:/<name>/<version>``; :func:`resolve_model` turns it into a local bundle folder
(downloading the registered version's artifacts). Training (``pipelines/train``) and
growing a model (``pipelines/extend``) register a version with :func:`register` and
move the alias only through :func:`promote`, which records the decision and its reason on
the version and the run whatever it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recsys_moe.bundle import META, BundleError, is_bundle
from recsys_moe.config import Config
from recsys_moe.tracking import Tracker, tracking_uri


class ModelNotFound(LookupError):
    """The reference names no model (no such folder, registered model, version or alias)."""


@dataclass
class ResolvedModel:
    """A model reference resolved to a local bundle folder."""

    bundle: Path
    name: str
    version: str  # registry version, or "local" for a folder
    uri: str
    run_id: str = ""
    tags: dict[str, str] = field(default_factory=dict)


def client(uri: str | None = None):
    import mlflow

    return mlflow.MlflowClient(uri or tracking_uri())


def parse_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/name@alias`` -> (name, alias, None); ``models:/name/3`` -> (name, None, "3")."""
    ref = uri.removeprefix("models:/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return name, alias, None
    name, _, version = ref.rpartition("/")
    if not name or not version:
        raise ModelNotFound(f"{uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
    return name, None, version


def alias_version(name: str, alias: str, uri: str | None = None):
    """The ModelVersion behind ``name@alias``, or None where there is none (no such model
    or alias). A store that cannot be read raises: it is not an empty registry."""
    from mlflow.exceptions import MlflowException

    try:
        return client(uri).get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def resolve_model(ref: str, tracking: str | None = None) -> ResolvedModel:
    """A local bundle folder, or a registry URI downloaded to a local folder.

    Raises:
        ModelNotFound: nothing answers to ``ref`` (the message says what would make it).
        BundleError: the folder or the registered model holds no recsys-moe bundle.
    """
    p = Path(ref)
    if p.is_dir():
        if not is_bundle(p):
            raise BundleError(f"{p} is not a model bundle (no {META})")
        return ResolvedModel(p.resolve(), p.name, "local", str(p.resolve()))
    if not ref.startswith("models:/"):
        raise ModelNotFound(
            f"{ref!r}: expected models:/<name>@<alias>, models:/<name>/<version> or a bundle folder"
        )
    import mlflow
    from mlflow.exceptions import MlflowException

    c = client(tracking)
    name, alias, version = parse_uri(ref)
    try:
        mv = (
            c.get_model_version_by_alias(name, alias)
            if alias
            else c.get_model_version(name, version)
        )
    except MlflowException as e:
        raise ModelNotFound(
            f"no model {ref} in {c.tracking_uri}: {e.message} (train one with `make train`)"
        ) from None
    try:
        # the version's own artifact location: a models:/ URI would be resolved against
        # the process-wide registry, not this client's store
        source = c.get_model_version_download_uri(name, mv.version)
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=source, tracking_uri=c.tracking_uri
        )
    except MlflowException as e:
        raise ModelNotFound(f"cannot download {ref}: {e.message}") from None
    bundles = sorted(Path(local).glob(f"artifacts/*/{META}"))
    if not bundles:
        raise BundleError(f"{ref}: the model holds no recsys-moe bundle (artifacts/*/{META})")
    return ResolvedModel(
        bundles[0].parent, name, str(mv.version), ref, mv.run_id or "", dict(mv.tags or {})
    )


def open_model(ref: str, tracking: str | None = None):
    """:func:`resolve_model` and the bundle's :class:`~recsys_moe.scorer.Scorer`."""
    from recsys_moe.scorer import Scorer

    resolved = resolve_model(ref, tracking)
    return resolved, Scorer.from_dir(resolved.bundle)


@dataclass(frozen=True)
class Decision:
    """Whether a registered version takes the alias, and why (recorded either way)."""

    promoted: bool
    reason: str


def register(model_uri: str, name: str, tags: dict[str, Any]) -> str:
    """Register ``model_uri`` (a run's logged model) as a new version of ``name``, tagged
    in the same call (a process killed here leaves no version without its tags)."""
    import mlflow

    mv = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
    return str(mv.version)


def register_and_promote(
    tracker: Tracker, cfg: Config, tags: dict[str, Any], decide: Any, alias: str | None = None
) -> dict[str, Any]:
    """Register the model ``tracker``'s run logged under the config's model name, tagged;
    then ``decide(version) -> Decision`` says whether it takes the alias."""
    name = cfg.model_name
    alias = alias or cfg.serving.model_alias
    version = register(tracker.model_info.model_uri, name, {"run_id": tracker.run_id, **tags})
    return promote(name, version, alias, decide(version), run_id=tracker.run_id,
                   uri=tracker.uri)  # fmt: skip


def promote(
    name: str, version: str, alias: str, decision: Decision, *, run_id: str, uri: str | None = None
) -> dict[str, Any]:
    """Apply ``decision``: move ``alias`` to ``version`` if promoted; the reason goes on the
    version (tag ``promotion``) and the run (tag ``registry.decision``)."""
    c = client(uri)
    if decision.promoted:
        c.set_registered_model_alias(name, alias, version)
    c.set_model_version_tag(name, version, "promotion", decision.reason)
    c.set_tag(run_id, "registry.decision", decision.reason)
    return {
        "name": name,
        "version": int(version),
        "alias": alias,
        "promoted": decision.promoted,
        "decision": decision.reason,
        "run_id": run_id,
    }


def comparable(challenger: dict[str, Any], champion: dict[str, Any]) -> list[str]:
    """What makes two manifests' models incomparable (empty when they score the same kind
    of rows): other id / domain columns, tasks or domains."""
    why = []
    for what, get in (
        ("keys", lambda m: m["keys"]),
        ("tasks", lambda m: [t["name"] for t in m["tasks"]]),
        ("domains", lambda m: sorted(m["domains"])),
    ):
        a, b = get(challenger), get(champion)
        if a != b:
            why.append(f"{what} {a} vs the champion's {b}")
    return why


def metric_of(res: dict[str, float], metric: str) -> float:
    """``metric`` (``valid/<key>`` of :func:`recsys_moe.metrics.evaluate`, or
    ``valid/loss``: the mean log loss, negated so higher is better) from evaluated metrics."""
    key = metric.removeprefix("valid/")
    if key == "loss":
        losses = [v for k, v in res.items() if k.endswith("/all/logloss")]
        return -float(sum(losses) / len(losses)) if losses else math.nan
    return float(res.get(key, math.nan))


def challenge(
    challenger: Path,
    rows: Any,
    *,
    name: str,
    alias: str,
    metric: str,
    force: bool = False,
    uri: str | None = None,
) -> Decision:
    """Should ``challenger`` (a bundle) take ``name@alias``? Both models score the same
    raw ``rows`` (the challenger's validation split: ids, domain, timestamp, context and
    one column per task label) through the same code (:class:`recsys_moe.scorer.Scorer`);
    promoted only if the challenger's ``metric`` is higher. Refused when the champion's
    data differ (keys, tasks, domains) unless ``force``; a missing or NaN score never
    promotes without saying so."""
    import numpy as np

    from recsys_moe.bundle import read_meta
    from recsys_moe.metrics import evaluate
    from recsys_moe.scorer import Scorer

    mine = read_meta(challenger)["manifest"]
    champ = alias_version(name, alias, uri)
    if champ is None:
        return Decision(True, f"promoted to @{alias}: no current champion")
    tag = f"champion v{champ.version}"
    try:
        theirs = resolve_model(f"models:/{name}/{champ.version}", uri)
        their_manifest = read_meta(theirs.bundle)["manifest"]
    except (ModelNotFound, BundleError) as e:
        return Decision(force, f"{'promoted' if force else 'not promoted'}: {tag} cannot be "
                               f"read ({e}){'; forced' if force else '; --force-promote replaces it'}")  # fmt: skip
    differ = comparable(mine, their_manifest)
    if differ and not force:
        return Decision(
            False,
            f"not promoted: {tag} models other data ({'; '.join(differ)}); register under "
            "another [serving] model_name, or --force-promote",
        )
    tasks = [(t["name"], t["kind"]) for t in mine["tasks"]]
    labels = np.stack([rows[t].cast(float).to_numpy() for t, _ in tasks], axis=1)
    domains = mine["domains"]
    index = {d: i + 1 for i, d in enumerate(domains)}
    dom = np.array([index.get(str(d), 0) for d in rows[mine["keys"]["domain"]].to_list()])
    scores = {}
    for who, bundle in (("challenger", challenger), ("champion", theirs.bundle)):
        preds = Scorer.from_dir(bundle).score(rows)
        scores[who] = metric_of(evaluate(labels, preds, dom, tasks, domains), metric)
    new, old = scores["challenger"], scores["champion"]
    on = f"{metric} on the same {rows.height:,} validation rows"
    if not finite(new):
        return Decision(False, f"not promoted: the challenger's {on} is not available")
    if differ:
        return Decision(True, f"promoted to @{alias} (forced over {tag}: {'; '.join(differ)})")
    if not finite(old):
        return Decision(True, f"promoted to @{alias}: {tag}'s {on} is not available ({old})")
    if new > old:
        return Decision(True, f"promoted to @{alias}: {on} {new:.4f} > {tag} {old:.4f}")
    if force:
        return Decision(True, f"promoted to @{alias} (forced): {on} {new:.4f} <= {tag} {old:.4f}")
    return Decision(False, f"not promoted: {on} {new:.4f} <= {tag} {old:.4f}")


def finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


__all__ = [
    "Decision",
    "ModelNotFound",
    "ResolvedModel",
    "alias_version",
    "challenge",
    "client",
    "comparable",
    "finite",
    "metric_of",
    "open_model",
    "parse_uri",
    "promote",
    "register",
    "resolve_model",
]
