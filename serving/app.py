"""The ranking service on Ray Serve: a FastAPI ingress that routes each request to its
segment's ranker, in its own replica (``placement: inline``) or in the segment's ranker
deployment (``placement: deployment``).

    client --HTTP--> proxy --> Ingress (FastAPI: validation, segment router)
                                 |-- inline segments: Ranker in this replica
                                 '--handle--> SegmentRanker_<segment> (deployment segments)
                 '--queue, one call per batch--> ShadowScorer (challengers, off the path)

- **Ingress** validates the request (4xx with a message for every client mistake, bounded
  request size; the limits in its OpenAPI schema), resolves the segment from the
  request's domain and the user's segment (cold / casual / power, from the feature
  store's users table) and calls that segment's ranker.
- **Ranker** (one per segment, its own task blend): loads ``models:/<name>@<alias>`` from
  MLflow, batches concurrent requests with ``@serve.batch``, encodes each request from
  the bundle's tables turned once into pre-encoded arrays
  (:class:`features.online.OnlineFeatures`, equal to the training features bit for bit)
  and computes only the experts its domains use (:mod:`recsys_moe.model.slicing`).
- Both poll the alias (:class:`serving.lifecycle.ModelWatcher`) and swap to a new version
  atomically; a version that fails to load leaves the old one serving and is reported on
  ``/readyz``. Started before any model is registered, they answer 503 (``/rank``) and
  not-ready (``/readyz``) naming the missing model, and load it when it appears.

Built by :func:`app_builder` from the ``args`` of ``serving/config.yaml``.
"""

# no `from __future__ import annotations`: FastAPI must see real types on a class
# that serve.ingress pickles by value (string annotations would not resolve)

import asyncio
import copy
import hashlib
import importlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from collections import Counter
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from recsys_moe.online_log import OnlineLog
from serving.lifecycle import ModelWatcher
from serving.settings import Segment, ServeSettings

log = logging.getLogger("ray.serve")

# scoring off the answer path, in batches: a call carries the requests queued over
# SHADOW_FLUSH_S or SHADOW_BATCH of them; beyond SHADOW_MAX_CALLS unanswered calls a
# batch is dropped (and counted) rather than queued without bound
SHADOW_FLUSH_S = 0.5
SHADOW_BATCH = 256
SHADOW_MAX_CALLS = 4

Id = int | str


class RankRequest(BaseModel):
    """A ranking request: one user, one domain, the candidate items to order."""

    model_config = ConfigDict(extra="forbid")

    user_id: Id = Field(description="The user's id (the id type of the training data).")
    domain: str = Field(min_length=1, max_length=64, description="The surface, e.g. feed.")
    candidates: list[Id] = Field(
        min_length=1,
        max_length=10_000,
        description="Item ids to rank (distinct; at most `max_candidates` of the serve config).",
    )
    context: dict[str, str | int | float | None] = Field(
        default_factory=dict,
        max_length=32,
        description="Request context (e.g. hour, device); unknown values fall back to OOV.",
    )
    timestamp: int | None = Field(
        default=None,
        ge=0,
        le=2**40,
        description="Unix seconds of the request (default: now), for recency.",
    )
    top_k: int | None = Field(default=None, ge=1, description="Return only the K best.")
    request_id: str | None = Field(default=None, max_length=128, description="Echoed back.")


class ScoredItem(BaseModel):
    item_id: Id
    score: float = Field(description="The blended score the list is sorted by.")
    scores: dict[str, float] = Field(description="Per-task probabilities.")
    cold_item: bool = Field(description="The item is not in the feature store (defaults).")


class RankResponse(BaseModel):
    request_id: str
    segment: str = Field(description="The serving segment (ranker deployment) that answered.")
    user_segment: str = Field(description="cold / casual / power.")
    cold_user: bool
    model: str
    model_version: str
    variant: str = Field(
        default="champion",
        description="champion, or challenger where the segment runs a canary and this user "
        "is in it.",
    )
    items: list[ScoredItem]


class FeedbackEvent(BaseModel):
    """What happened to one ranked item: the request that ranked it, the item, and the
    outcome of each task it reports (1 happened, 0 did not; a task left out: unknown)."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=128, description="The ranking's request id.")
    item_id: Id
    labels: dict[str, float] = Field(
        min_length=1, max_length=32, description='Task -> outcome in [0, 1], e.g. {"click": 1}.'
    )


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    events: list[FeedbackEvent] = Field(min_length=1, max_length=10_000)


def _error(status: int, message: str) -> JSONResponse:
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse(status_code=status, content={"error": message}, headers=headers)


# ------------------------------------------------------------------------------- ranker


class NotReady(RuntimeError):
    """No model loaded yet: answered 503 with the reason."""


class Ranker:
    """One segment's ranker: the model behind the segment's alias, its request batching
    (``@serve.batch``: concurrent requests share one forward per domain) and metrics.

    Runs inside its own :class:`SegmentRanker` deployment (``placement: deployment``) or in
    the ingress replica itself (``placement: inline``); the code and the answers are the
    same either way. Requests are encoded from the bundle's pre-encoded lookup arrays
    (:class:`features.online.OnlineFeatures`): no data frame per request.
    """

    def __init__(
        self,
        settings: dict[str, Any],
        segment: str,
        shadow: "ShadowQueue | None" = None,
        log_name: str = "ranker",
        champion: bool = True,
    ) -> None:
        from ray.serve import metrics

        self.settings = ServeSettings.from_dict(settings)
        self.segment: Segment = self.settings.segment(segment)
        seg = self.segment
        self._rank_batch.set_max_batch_size(seg.max_batch_size)
        self._rank_batch.set_batch_wait_timeout_s(seg.batch_wait_timeout_s)
        tags = ("segment",)
        self.m_requests = metrics.Counter(
            "recsys_moe_rank_requests", "Ranking requests", tag_keys=tags
        )
        self.m_candidates = metrics.Counter(
            "recsys_moe_candidates_scored", "Candidates scored", tag_keys=tags
        )
        self.m_cold = metrics.Counter(
            "recsys_moe_cold_start_rows", "Candidates with an unknown user or item", tag_keys=tags
        )
        self.m_latency = metrics.Histogram(
            "recsys_moe_rank_latency_ms",
            "Ranker batch latency (ms)",
            boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500],
            tag_keys=tags,
        )
        gate_tags = ("segment", "gate", "domain")
        self.m_load = metrics.Gauge(
            "recsys_moe_expert_load",
            "Share of the gate weight per expert over the last window",
            tag_keys=(*gate_tags, "expert"),
        )
        self.m_entropy = metrics.Gauge(
            "recsys_moe_gate_entropy",
            "Mean entropy of the gate's expert distribution over the last window",
            tag_keys=gate_tags,
        )
        self.m_dead = metrics.Gauge(
            "recsys_moe_dead_experts",
            "Experts of the gate below the dead threshold over the last window",
            tag_keys=gate_tags,
        )
        self.m_collapsed = metrics.Gauge(
            "recsys_moe_gate_collapsed",
            "1 when one expert took more than collapse_threshold of the gate's load",
            tag_keys=gate_tags,
        )
        self.routing: dict[str, Any] = {}  # the last window's routing health (/readyz)
        self._tags = {"segment": seg.name}
        self._last_export = time.monotonic()
        self.m_challenger = metrics.Counter(
            "recsys_moe_challenger_requests",
            "Requests a challenger scored (mode: shadow or canary)",
            tag_keys=("segment", "mode"),
        )
        # the champion, and the segment's challenger if it names one: the same loading,
        # polling and hot swap (a shadow scorer's ranker of a segment in shadow mode has
        # no champion: only the challenger scores there)
        self.watcher = self._watch(seg.model_alias, "") if champion else None
        self.challenger = (
            self._watch(seg.challenger_alias, " challenger") if seg.challenger_alias else None
        )
        # scoring off the answer path goes to the ShadowScorer, a process of its own:
        # in this one it would hold the interpreter lock the answers need
        self.shadow = shadow
        self.log = online_log(self.settings, log_name) if self.settings.online_log_dir else None

    def _watch(self, alias: str, role: str) -> ModelWatcher:
        return ModelWatcher(
            self.settings.model_uri(alias),
            self.settings.tracking_uri,
            loader=self._load,
            poll_s=self.settings.poll_s,
            name=f"ranker {self.segment.name}{role}",
        )

    def _load(self, bundle: str, version: str) -> dict[str, Any]:
        from recsys_moe.config import ScoringConfig
        from recsys_moe.model.observe import RouterMonitor
        from recsys_moe.scorer import Scorer

        # with offloading, each domain's experts are read from this version's own bundle
        capacity = self.segment.offload_capacity
        scorer = Scorer.from_dir(bundle, offload=capacity)
        cache = scorer.offloaded
        if capacity and cache is None and scorer.model.supports_domain_slices:
            # domains added by `extend` need the whole pool in memory: the base domains'
            # experts go to a folder of this version's own (a swap never reads another's)
            where = tempfile.mkdtemp(prefix=f"recsys-moe-{self.segment.name}-v{version}-")
            cache = scorer.offload_experts(where, capacity)
            weakref.finalize(cache, shutil.rmtree, where, True)  # gone with its version
        if cache is not None:
            mine = {scorer.domain_index(d) for d in self.segment.domains} - {0}
            active = {k: cache.active(k) for k in sorted(mine) if k in cache}
        else:
            active = scorer.slice_domains(self.segment.domains, self.segment.user_segments)
        scorer.online  # the lookup arrays, built before the version serves  # noqa: B018
        st = self.settings
        monitors = {
            k: RouterMonitor(scorer.model.spec.domains, st.dead_threshold, st.collapse_threshold)
            for k in active
        }
        blend = ScoringConfig(
            blend=self.segment.blend, task_weights=dict(self.segment.task_weights)
        )
        return {"scorer": scorer, "active": active, "monitors": monitors, "blend": blend}

    def status(self) -> dict[str, Any]:
        seg = self.segment
        challenger = None
        if self.challenger is not None:
            challenger = {"mode": seg.challenger_mode, **self.challenger.status()}
            if seg.challenger_mode == "canary":
                challenger["canary_fraction"] = seg.canary_fraction
        return {
            "segment": seg.name,
            "placement": seg.placement,
            **self.watcher.status(),
            "challenger": challenger,
            "experts": self.experts(),
            "routing": self.routing,
        }

    def experts(self) -> dict[str, list[int]]:
        """Domain -> the global expert ids this ranker computes for it."""
        cur = self.watcher.current
        if cur is None:
            return {}
        names = cur.payload["scorer"].model.spec.domains
        return {names[k - 1]: ids for k, ids in cur.payload["active"].items()}

    async def rank(self, req: dict[str, Any]) -> dict[str, Any]:
        return await self._rank_batch(req)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def _rank_batch(self, reqs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        t0 = time.perf_counter()
        cur = self.watcher.current  # one model version for the whole batch
        if cur is None:
            why = self.watcher.load_error or "no model loaded yet"
            return [{"unavailable": f"segment {self.segment.name}: {why}"} for _ in reqs]
        seg = self.segment
        chal = self.challenger.current if self.challenger is not None else None
        canary = chal is not None and seg.challenger_mode == "canary"
        groups = [("champion", cur, list(range(len(reqs))))]
        if canary:
            mine = [in_canary(r["user_id"], seg.canary_fraction) for r in reqs]
            groups = [("champion", cur, [i for i, m in enumerate(mine) if not m]),
                      ("challenger", chal, [i for i, m in enumerate(mine) if m])]  # fmt: skip
        out: list[dict[str, Any]] = [{}] * len(reqs)
        rows = cold = 0
        for variant, loaded, idx in groups:
            if not idx:
                continue
            part, n, c = rank_requests(
                loaded.payload["scorer"], loaded.payload["blend"], [reqs[i] for i in idx],
                loaded.version, loaded.payload["monitors"] if variant == "champion" else None,
                log=self._log_answer(variant, "served"),
            )  # fmt: skip
            rows, cold = rows + n, cold + c
            for i, answer in zip(idx, part, strict=True):
                if "items" in answer:
                    answer["variant"] = variant
                out[i] = answer
            if variant == "challenger":
                self.m_challenger.inc(len(idx), {"segment": seg.name, "mode": "canary"})
        if chal is not None and not canary:  # shadow: after the answers, off the path
            self._send_shadow("challenger", reqs)
            self.m_challenger.inc(len(reqs), {"segment": seg.name, "mode": "shadow"})
        elif canary and groups[1][2] and self.log is not None:
            # the champion's scores of the canary's requests, logged only: the same
            # requests scored by both versions, which promote --from-live compares
            self._send_shadow("champion", [reqs[i] for i in groups[1][2]])
        if rows:
            self.m_candidates.inc(rows, self._tags)
        if cold:  # Ray's counters only take positive increments
            self.m_cold.inc(cold, self._tags)
        self.m_requests.inc(len(reqs), self._tags)
        self.m_latency.observe((time.perf_counter() - t0) * 1e3, self._tags)
        self._export_router(cur)
        return out

    def close(self) -> None:
        """Write what the log buffers (the replica stops)."""
        if self.log is not None:
            self.log.close()

    def _send_shadow(self, variant: str, reqs: list[dict[str, Any]]) -> None:
        """Queue ``reqs`` for ``variant``'s scores off the answer path (never waited for)."""
        if self.shadow is not None:
            self.shadow.put(self.segment.name, variant, reqs)

    def score_shadow(self, variant: str, reqs: list[dict[str, Any]]) -> None:
        """In the shadow scorer: ``variant``'s scores of requests the other version
        answered, logged, never returned (a version not loaded yet skips them)."""
        w = self.challenger if variant == "challenger" else self.watcher
        loaded = w.current if w is not None else None
        if loaded is None:
            return
        try:
            rank_requests(loaded.payload["scorer"], loaded.payload["blend"], reqs,
                          loaded.version, log=self._log_answer(variant, "shadow"),
                          answers=False)  # fmt: skip
        except Exception:
            log.exception("segment %s: shadow scoring by the %s failed", self.segment.name,
                          variant)  # fmt: skip

    def _log_answer(self, variant: str, role: str):
        """The online log's writer of this ranker's answers (None: no log)."""
        if self.log is None:
            return None
        segment, online = self.segment.name, self.log

        def write(req: dict[str, Any], answer: dict[str, Any], f, probs, score, tasks) -> None:
            rec = {"request_id": req.get("request_id") or "", "segment": segment, "variant": variant,
                   "role": role, "model_version": answer["model_version"],
                   "user_id": str(req["user_id"]), "domain": req["domain"], "ts": time.time(),
                   "item_id": req["candidates"], "score": score}  # fmt: skip
            for j, t in enumerate(tasks):
                rec[f"p_{t}"] = probs[:, j]
            online.scores(rec)

        return write

    def _export_router(self, cur) -> None:
        """Every ``router_window_s``: the window's routing health per gate and domain as
        gauges (expert load share, gate entropy, dead experts, collapse), the same on
        ``/readyz`` (``routing``), and a warning for a collapsed gate; then a new window."""
        if time.monotonic() - self._last_export < self.settings.router_window_s:
            return
        self._last_export = time.monotonic()
        scorer = cur.payload["scorer"]
        health = routing_health(cur.payload["monitors"], cur.payload["active"],
                                scorer.router_reference)  # fmt: skip
        seg = self.segment.name
        for g in health["gates"]:
            tags = {"segment": seg, "gate": g["gate"], "domain": g["domain"]}
            for e, share in g["load"].items():
                self.m_load.set(share, {**tags, "expert": e})
            self.m_entropy.set(g["entropy"], tags)
            self.m_dead.set(len(g["dead"]), tags)
            self.m_collapsed.set(float(g["collapsed"]), tags)
            if g["collapsed"]:
                log.warning("segment %s: gate %s of domain %s collapsed: expert %s takes "
                            "%.0f%% of the load (threshold %.0f%%)", seg, g["gate"], g["domain"],
                            g["top_expert"], 100 * g["top_load"],
                            100 * self.settings.collapse_threshold)  # fmt: skip
            if g["dead_since_training"]:
                log.warning("segment %s: gate %s of domain %s: expert(s) %s dead in serving "
                            "but alive at training time", seg, g["gate"], g["domain"],
                            ", ".join(g["dead_since_training"]))  # fmt: skip
        self.routing = {"window_end": time.time(), "version": cur.version, **health}
        for mon in cur.payload["monitors"].values():
            mon.reset()


def routing_health(
    monitors: dict[int, Any],
    active: dict[int, list[int]],
    reference: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Per gate output and domain, from each domain's :class:`RouterMonitor` window: the
    load share per (global) expert id, the mean gate entropy, the dead experts, those of
    them that were alive at training time (``reference``: the bundle's test-split load
    shares, ``router/<layer>/<gate>/<domain>/load_e<id>``, judged by the same rule) and
    whether the gate collapsed; plus the collapsed gates' and newly dead experts' names."""
    reference = reference or {}
    gates: list[dict[str, Any]] = []
    for k, mon in monitors.items():
        m = mon.metrics()
        ids = active.get(k) or []
        for key in [k_ for k_ in m if k_.endswith("/entropy")]:
            _, layer, gate, domain, _ = key.split("/")
            base = key[: -len("/entropy")]
            load = {
                str(ids[int(x.rsplit("load_e", 1)[1])] if ids else int(x.rsplit("load_e", 1)[1])): v
                for x, v in m.items()
                if x.startswith(base + "/load_e")
            }  # fmt: skip
            top = max(load, key=load.__getitem__) if load else None
            threshold = mon.dead_below(len(load))
            dead = sorted(e for e, v in load.items() if v < threshold)
            was = {e: reference.get(f"{base}/load_e{e}") for e in dead}
            trained = sum(1 for x in reference if x.startswith(base + "/load_e"))
            gates.append({
                "gate": f"{layer}/{gate}" if layer != "gates" else gate,
                "domain": domain,
                "load": load,
                "entropy": m[key],
                "entropy_max": m.get(base + "/entropy_max", 0.0),
                "dead": dead,
                "dead_since_training": [
                    e for e, v in was.items() if v is not None and v >= mon.dead_below(trained)
                ],
                "top_expert": top,
                "top_load": load[top] if top is not None else 0.0,
                "collapsed": bool(m.get(base + "/collapsed", 0.0)),
            })  # fmt: skip
    collapsed = [f"{g['domain']}/{g['gate']}" for g in gates if g["collapsed"]]
    newly_dead = [f"{g['domain']}/{g['gate']}/{e}" for g in gates for e in g["dead_since_training"]]
    return {"gates": gates, "collapsed": collapsed, "dead_since_training": newly_dead}


@serve.deployment(max_ongoing_requests=64)
class SegmentRanker:
    """A segment's :class:`Ranker` in a deployment of its own (``placement:
    deployment``): its own replicas and resources, one more hop per request."""

    def __init__(
        self, settings: dict[str, Any], segment: str, shadow: DeploymentHandle | None = None
    ) -> None:
        self.ranker = Ranker(settings, segment, ShadowQueue(shadow) if shadow else None)

    async def rank(self, req: dict[str, Any]) -> dict[str, Any]:
        return await self.ranker.rank(req)

    def status(self) -> dict[str, Any]:
        return self.ranker.status()

    def __del__(self) -> None:
        self.ranker.close()

    def experts(self) -> dict[str, list[int]]:
        return self.ranker.experts()


class ShadowQueue:
    """An answering process's requests for the :class:`ShadowScorer`, every segment's
    together: one call every ``SHADOW_FLUSH_S`` (or at ``SHADOW_BATCH`` requests), as a
    call per request cost the answering process its own work again. While
    ``SHADOW_MAX_CALLS`` calls are unanswered a batch is dropped and counted: best
    effort, never this process's memory."""

    def __init__(self, handle: DeploymentHandle) -> None:
        from ray.serve import metrics

        self.handle = handle
        self._buf: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._n = 0
        self._pending: set[asyncio.Task] = set()
        self._due: asyncio.TimerHandle | None = None
        self.dropped = 0
        self.m_dropped = metrics.Counter(
            "recsys_moe_shadow_dropped",
            "Requests not scored off the answer path: the shadow scorer lagged",
            tag_keys=("segment", "variant"),
        )

    def put(self, segment: str, variant: str, reqs: list[dict[str, Any]]) -> None:
        self._buf.setdefault((segment, variant), []).extend(reqs)
        self._n += len(reqs)
        if self._n >= SHADOW_BATCH:
            self.flush()
        elif self._due is None:
            self._due = asyncio.get_running_loop().call_later(SHADOW_FLUSH_S, self.flush)

    def flush(self) -> None:
        if self._due is not None:
            self._due.cancel()
            self._due = None
        batches, self._buf, self._n = self._buf, {}, 0
        if not batches:
            return
        if len(self._pending) >= SHADOW_MAX_CALLS:
            for (segment, variant), reqs in batches.items():
                self.dropped += len(reqs)
                self.m_dropped.inc(len(reqs), {"segment": segment, "variant": variant})
            return
        calls = [(segment, variant, reqs) for (segment, variant), reqs in batches.items()]
        task = asyncio.get_running_loop().create_task(self._call(calls))
        self._pending.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self._pending.discard)

    async def _call(self, calls: list[tuple[str, str, list[dict[str, Any]]]]) -> None:
        try:
            await self.handle.score.remote(calls)
        except Exception:  # never reaches a client: the shadow's loss only
            log.exception("shadow scoring of %d requests failed",
                          sum(len(r) for *_, r in calls))  # fmt: skip


@serve.deployment(max_ongoing_requests=256)
class ShadowScorer:
    """Scoring off the answer path for every segment with a challenger (the challenger
    in ``shadow`` mode, the champion on a canary's requests), in one process of its own:
    the answering processes queue the requests to it and never wait. Its rows go to the
    same online log, as the writer ``shadow``."""

    def __init__(self, settings: dict[str, Any], segments: list[str]) -> None:
        # Linux's idle class: this process runs when a core would otherwise idle, so on
        # a busy machine the answers' processes go first (elsewhere: the lowest nice)
        if hasattr(os, "SCHED_IDLE"):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        else:
            os.setpriority(os.PRIO_PROCESS, 0, 19)
        s = ServeSettings.from_dict(settings)
        canary = {g.name for g in s.segments if g.challenger_mode == "canary"}
        self.rankers = {
            name: Ranker(settings, name, log_name="shadow", champion=name in canary)
            for name in segments
        }

    def score(self, calls: list[tuple[str, str, list[dict[str, Any]]]]) -> None:
        for segment, variant, reqs in calls:
            self.rankers[segment].score_shadow(variant, reqs)

    def __del__(self) -> None:
        for r in self.rankers.values():
            r.close()


_LOGS: dict[tuple[str, str], OnlineLog] = {}


def online_log(s: ServeSettings, name: str) -> OnlineLog:
    """This process's online-log writer ``name``: one for every ranker of the process
    (its records carry their segment), so the folder gets a file per flush per process,
    not per ranker, and ``online_log_max_files`` holds that much more history."""
    key = (str(s.online_log_dir), name)
    if key not in _LOGS or _LOGS[key].closed:
        _LOGS[key] = OnlineLog(s.online_log_dir, name, s.online_log_max_files,
                               flush_s=s.online_log_flush_s)  # fmt: skip
    return _LOGS[key]


def in_canary(user_id: Any, fraction: float) -> bool:
    """Whether a canary of ``fraction`` answers this user: a stable hash of the id (the
    same user always gets the same version, in every replica and after a restart)."""
    h = hashlib.blake2b(str(user_id).encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") < fraction * 2**64


class OnlineMetrics:
    """The ingress's view of the online log: every ``online_metrics_s`` (and on
    ``GET /online``), feedback joined to the logged scores, AUC and log loss per segment
    x variant x version x task, exported as Prometheus gauges."""

    def __init__(self, s: ServeSettings) -> None:
        from ray.serve import metrics

        self.dir, self.every = s.online_log_dir, s.online_metrics_s
        tags = ("segment", "variant", "role", "version", "task")
        self.m_auc = metrics.Gauge("recsys_moe_online_auc",
                                   "AUC of logged scores against feedback", tag_keys=tags)  # fmt: skip
        self.m_events = metrics.Gauge("recsys_moe_online_events",
                                      "Feedback events joined to logged scores", tag_keys=tags)  # fmt: skip
        self.m_feedback = metrics.Gauge("recsys_moe_feedback_events",
                                        "Feedback events received, by status (joined, unmatched)",
                                        tag_keys=("status",))  # fmt: skip
        self._stop = threading.Event()
        self.last: dict[str, Any] = {}
        threading.Thread(target=self._loop, daemon=True, name="online-metrics").start()

    def refresh(self) -> dict[str, Any]:
        from recsys_moe.online_log import joined, online_metrics

        df, counts = joined(self.dir)
        rows = online_metrics(df)
        for r in rows:
            tags = {"segment": r["segment"], "variant": r["variant"], "role": r["role"],
                    "version": str(r["model_version"]), "task": r["task"]}  # fmt: skip
            if r["auc"] == r["auc"]:  # not NaN
                self.m_auc.set(r["auc"], tags)
            self.m_events.set(r["n"], tags)
        for status in ("joined", "unmatched"):
            self.m_feedback.set(counts[status], {"status": status})
        # JSON has no NaN: a metric that is undefined (one class only) is null
        clean = [{k: None if isinstance(v, float) and v != v else v for k, v in r.items()}
                 for r in rows]  # fmt: skip
        self.last = {"counts": counts, "metrics": clean, "at": time.time()}
        return self.last

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.refresh()
            except Exception:  # a log being written or removed: the next round reads it
                log.exception("online metrics: could not read %s", self.dir)

    def stop(self) -> None:
        self._stop.set()


def rank_requests(
    scorer,
    blend,
    reqs: list[dict[str, Any]],
    version: str,
    monitors: dict | None = None,
    log=None,
    answers: bool = True,
) -> tuple[list[dict[str, Any]], int, int]:
    """A ranker's work for a batch of requests: each encoded from the pre-encoded arrays
    (a request whose ids cannot be read gets ``{"error": ...}`` and never fails its
    batch-mates), scored one forward per domain, blended and sorted. Returns the answers
    (each with a Server-Timing ``timing``), the candidates scored and the cold rows.
    ``log(request, answer, features, probabilities, blended score, tasks)``: called for
    each answer (the online log). ``answers=False`` (scoring off the answer path, for the
    log only): each answer is only ``{"model_version": ...}``, no sorted item list."""
    from recsys_moe.scorer import RequestError, blended

    t0 = time.perf_counter()
    out: list[dict[str, Any]] = [{}] * len(reqs)
    encoded, ok = [], []
    for i, r in enumerate(reqs):
        try:
            f = scorer.encode_request(
                r["user_id"], r["domain"], r["candidates"], r.get("timestamp"), r.get("context")
            )
        except RequestError as e:
            out[i] = {"error": str(e)}
            continue
        encoded.append((r["domain"], f))
        ok.append(i)
    rows = cold = 0
    if encoded:
        t1 = time.perf_counter()
        scores = scorer.rank_many(encoded, monitors=monitors)
        # Server-Timing parts: this batch's encoding and model time, and its size
        timing = (f"encode;dur={(t1 - t0) * 1e3:.2f}, "
                  f"model;dur={(time.perf_counter() - t1) * 1e3:.2f};desc=\"batch of "
                  f"{len(encoded)}\"")  # fmt: skip
        for i, (_d, f), p in zip(ok, encoded, scores, strict=True):
            score = blended(p, scorer.tasks, blend)
            if answers:
                out[i] = _response(reqs[i], f, p, score, scorer.tasks, version)
                out[i]["timing"] = timing
            else:
                out[i] = {"model_version": version}
            if log is not None:
                log(reqs[i], out[i], f, p, score, scorer.tasks)
            rows += f.n
            cold += f.n if f.cold_user else int(f.cold_items.sum())
    return out, rows, cold


def _response(
    req: dict[str, Any], f, probs: np.ndarray, score: np.ndarray, tasks: list[str], version: str
) -> dict[str, Any]:
    order = (-score).argsort(kind="stable")
    if req.get("top_k"):
        order = order[: req["top_k"]]
    cands, cold = req["candidates"], f.cold_items
    p = probs.tolist()
    items = [
        {
            "item_id": cands[j],
            "score": float(score[j]),
            "scores": dict(zip(tasks, p[j], strict=True)),
            "cold_item": bool(cold[j]),
        }
        for j in order.tolist()
    ]
    return {
        "user_segment": f.user_segment,
        "cold_user": bool(f.cold_user),
        "model_version": version,
        "items": items,
    }


# ------------------------------------------------------------------------------ ingress

api = FastAPI(
    title="recsys-moe ranking",
    description="Segment-routed multi-task ranking (Mixture-of-Experts) on Ray Serve.",
    version="1",
    # served by the ingress with the configured limits filled in (openapi_with_limits)
    openapi_url=None,
    docs_url=None,
    redoc_url=None,
)


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = []
    for e in exc.errors():
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        problems.append(f"{where}: {e.get('msg')}")
    return JSONResponse(status_code=422, content={"error": "; ".join(problems), "detail": problems})


def _routing_tables(bundle: str, version: str) -> dict[str, Any]:
    """What the router needs from the bundle: known domains, user -> segment."""
    from features.online import caster, user_segment
    from features.store import spec_from_manifest
    from recsys_moe.bundle import read_meta, read_tables

    meta = read_meta(bundle)
    spec = spec_from_manifest(meta["manifest"])
    users = read_tables(bundle)["users"]
    seg = users.select(spec.user_id, user_segment(spec).alias("segment"))
    return {
        "segments": dict(zip(seg[spec.user_id].to_list(), seg["segment"].to_list(), strict=True)),
        "user_key": caster(users.schema[spec.user_id], "user_id"),
        "domains": set(meta["manifest"]["domains"]),
        "tasks": [t["name"] for t in meta["manifest"]["tasks"]],
    }


# set by the ingress from the serve config (the app lives in the ingress replica)
_LIMITS = {"max_body_bytes": 1_000_000}


@api.middleware("http")
async def _bounded_body(request: Request, call_next):
    """Refuse an oversized body before reading it (413), and a body without a length."""
    if request.method == "POST":
        size = request.headers.get("content-length")
        limit = _LIMITS["max_body_bytes"]
        if size is None:
            return _error(411, "send the body with a Content-Length header")
        if not size.isdigit() or int(size) > limit:
            return _error(413, f"request body of {size} bytes exceeds the limit of {limit}")
    return await call_next(request)


def openapi_with_limits(schema: dict[str, Any], s: ServeSettings) -> dict[str, Any]:
    """The OpenAPI schema with every limit this service enforces, from its config: a
    schema-driven client or fuzzer then generates requests the service accepts."""
    schema = copy.deepcopy(schema)
    comps = schema["components"]["schemas"]
    props = comps["RankRequest"]["properties"]
    id_of = {"anyOf": [{"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1},
                       {"type": "string", "minLength": 1, "maxLength": s.max_id_length}]}  # fmt: skip
    props["user_id"].update(id_of)
    props["candidates"].update({"maxItems": s.max_candidates, "uniqueItems": True, "items": id_of})
    props["candidates"]["description"] = (
        f"Item ids to rank: 1 to {s.max_candidates}, distinct, ids of at most "
        f"{s.max_id_length} characters."
    )
    props["top_k"]["anyOf"] = [{"type": "integer", "minimum": 1, "maximum": s.max_candidates},
                               {"type": "null"}]  # fmt: skip
    post = schema["paths"]["/rank"]["post"]
    post["description"] = (
        f"Request body at most {s.max_body_bytes} bytes, sent with a Content-Length "
        f"(411 without, 413 above). Domains this service knows: those of its segments "
        f"{sorted({d for g in s.segments for d in g.domains})}"
        + (f", any other to segment {s.default_segment!r}" if s.default_segment else "")
        + ". 503 while the segment has no model loaded (see /readyz)."
    )
    post["requestBody"]["x-max-body-bytes"] = s.max_body_bytes
    return schema


@serve.deployment(max_ongoing_requests=128)
@serve.ingress(api)
class Ingress:
    """HTTP ingress and segment router; holds the ``placement: inline`` segments' rankers
    itself and calls the others' deployments through their handles."""

    def __init__(
        self,
        settings: dict[str, Any],
        rankers: dict[str, DeploymentHandle],
        shadow: DeploymentHandle | None = None,
    ) -> None:
        self.settings = s = ServeSettings.from_dict(settings)
        self.rankers = rankers
        queue = ShadowQueue(shadow) if shadow is not None else None
        self.inline = {g.name: Ranker(settings, g.name, queue)
                       for g in s.segments if g.placement == "inline"}  # fmt: skip
        # serve.ingress pickles this class by value: reach the module's own limits
        importlib.import_module("serving.app")._LIMITS["max_body_bytes"] = s.max_body_bytes
        self._schema: dict[str, Any] | None = None
        self.watcher = ModelWatcher(
            self.settings.model_uri(self.settings.model_alias),
            self.settings.tracking_uri,
            loader=_routing_tables,
            poll_s=self.settings.poll_s,
            name="router",
        )
        self.log = online_log(s, "ingress") if s.online_log_dir else None
        self.online = OnlineMetrics(s) if s.online_log_dir else None

    def __del__(self) -> None:
        # Serve calls this when the replica stops: what the logs still buffer is written
        for r in getattr(self, "inline", {}).values():
            r.close()
        if getattr(self, "log", None) is not None:
            self.log.close()
        if getattr(self, "online", None) is not None:
            self.online.stop()

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> JSONResponse:
        if self._schema is None:
            self._schema = openapi_with_limits(request.app.openapi(), self.settings)
        return JSONResponse(self._schema)

    @api.get("/docs", include_in_schema=False)
    async def docs(self) -> Any:
        from fastapi.openapi.docs import get_swagger_ui_html

        return get_swagger_ui_html(openapi_url="openapi.json", title="recsys-moe ranking")

    @api.get("/healthz", summary="Liveness: the ingress answers.")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz", summary="Readiness: every segment's model and the features loaded.")
    async def readyz(self) -> JSONResponse:
        segments = {name: r.status() for name, r in self.inline.items()}
        for name, h in self.rankers.items():
            try:
                segments[name] = await h.status.remote()
            except Exception as e:  # a ranker without a replica yet
                segments[name] = {"ready": False, "load_error": f"{type(e).__name__}: {e}"}
        router = self.watcher.status()
        ready = router["ready"] and all(s.get("ready") for s in segments.values())
        body = {"ready": ready, "router": router, "segments": segments}
        return JSONResponse(status_code=200 if ready else 503, content=body)

    @api.post(
        "/feedback",
        summary="Report what happened to ranked items (joined to the logged scores).",
        responses={
            404: {"description": "Feedback is off (no online_log_dir in the serve config)."},
            422: {"description": "Invalid events (the message names the field)."},
            503: {"description": "No model loaded yet (its tasks are unknown)."},
        },
    )
    async def feedback(self, req: FeedbackRequest) -> Any:
        if self.log is None:
            return _error(404, "feedback is off: set online_log_dir in the serve config")
        cur = self.watcher.current
        if cur is None:
            return _error(503, f"not ready: {self.watcher.load_error}")
        tasks = cur.payload["tasks"]
        rows = []
        now = time.time()
        for i, e in enumerate(req.events):
            unknown = sorted(set(e.labels) - set(tasks))
            if unknown:
                return _error(422, f"events.{i}.labels: unknown task(s) {unknown}; tasks: {tasks}")
            bad = [t for t, v in e.labels.items() if not 0.0 <= v <= 1.0]
            if bad:
                return _error(422, f"events.{i}.labels: {bad} must be in [0, 1]")
            rows.append({"request_id": e.request_id, "item_id": str(e.item_id), "received_at": now,
                         **{f"label_{t}": e.labels.get(t) for t in tasks}})  # fmt: skip
        await asyncio.to_thread(self.log.feedback, rows)  # on disk before the answer
        return {"accepted": len(rows)}

    @api.get("/online", summary="Online metrics: feedback joined to the logged scores.")
    async def online_report(self) -> JSONResponse:
        if self.online is None:
            return _error(404, "the online log is off: set online_log_dir in the serve config")
        for r in self.inline.values():  # this replica's buffered answers first
            if r.log is not None:
                r.log.flush()
        return JSONResponse(await asyncio.to_thread(self.online.refresh))

    @api.post(
        "/rank",
        response_model=RankResponse,
        summary="Rank candidate items for a user in a domain.",
        responses={
            411: {"description": "No Content-Length."},
            413: {"description": "Request body too large."},
            422: {"description": "Invalid request (the message names the field)."},
            503: {"description": "The segment has no model loaded yet (the message says why)."},
        },
    )
    async def rank(self, req: RankRequest) -> Any:
        s = self.settings
        if len(req.candidates) > s.max_candidates:
            return _error(
                422,
                f"candidates: {len(req.candidates)} items exceed the limit of {s.max_candidates}",
            )
        if req.top_k is not None and req.top_k > s.max_candidates:
            return _error(422, f"top_k: {req.top_k} exceeds the limit of {s.max_candidates}")
        if len(set(req.candidates)) != len(req.candidates):
            dup = [c for c, n in Counter(req.candidates).items() if n > 1]
            return _error(422, f"candidates: duplicate item ids {dup[:5]}")
        for name, v in [("user_id", req.user_id), *(("candidates", c) for c in req.candidates)]:
            if isinstance(v, str) and not 1 <= len(v) <= s.max_id_length:
                return _error(422, f"{name}: ids are 1 to {s.max_id_length} characters")
            if isinstance(v, int) and not -(2**63) <= v < 2**63:
                return _error(422, f"{name}: integer id out of the 64-bit range")
        cur = self.watcher.current
        if cur is None:
            return _error(503, f"not ready: {self.watcher.load_error}")
        tables = cur.payload
        try:
            user_segment = tables["segments"].get(tables["user_key"](req.user_id), "cold")
        except ValueError as e:
            return _error(422, str(e))
        seg = s.route(req.domain, user_segment)
        if seg is None:
            return _error(
                422,
                f"domain: unknown domain {req.domain!r}; known: {sorted(tables['domains'])}",
            )
        t0 = time.perf_counter()
        query = req.model_dump()
        rid = query["request_id"] = req.request_id or uuid.uuid4().hex
        try:
            if seg.name in self.inline:
                res = await self.inline[seg.name].rank(query)
            else:
                # bounded: a ranker replica that died (or hangs) costs a retryable 503, never
                # a request waiting until Serve has started a new one
                res = await asyncio.wait_for(
                    self.rankers[seg.name].rank.remote(query), s.ranker_timeout_s
                )
        except TimeoutError:
            raise HTTPException(
                503, f"ranker {seg.name} did not answer within {s.ranker_timeout_s} s",
                headers={"Retry-After": "1"},
            ) from None  # fmt: skip
        except Exception as e:
            log.exception("ranker %s failed", seg.name)
            raise HTTPException(503, f"ranker {seg.name} unavailable: {type(e).__name__}",
                                headers={"Retry-After": "1"}) from e  # fmt: skip
        if "error" in res:
            return _error(422, res["error"])
        if "unavailable" in res:
            return _error(503, res["unavailable"])
        # built by this service in RankResponse's shape (tests check it): serialised
        # once here, not validated and re-encoded field by field by FastAPI
        timing = res.pop("timing", "")
        body = {"request_id": rid, "segment": seg.name, "model": s.model_name, **res}
        content = json.dumps(body).encode()
        # the time in this handler (ranker call included), then the ranker's parts
        took = ", ".join([f"rank;dur={(time.perf_counter() - t0) * 1e3:.2f}", *[timing][:1]])
        return Response(content, media_type="application/json", headers={"Server-Timing": took})


def app_builder(args: dict[str, Any]) -> serve.Application:
    """The Serve application from ``serving/config.yaml``'s ``args``."""
    settings = ServeSettings.from_dict(args)
    raw = settings.to_dict()
    # the segments whose answers another version also scores: one shadow scorer for
    # them all (no CPU reserved: its work is best effort, after the answers); every
    # ranker gets its handle, and a segment's own mode decides whether it queues to it
    shadowed = [seg.name for seg in settings.segments if seg.challenger_alias
                and (seg.challenger_mode == "shadow" or settings.online_log_dir)]  # fmt: skip
    shadow = (
        ShadowScorer.options(ray_actor_options={"num_cpus": 0}).bind(raw, shadowed)
        if shadowed
        else None
    )
    rankers = {
        seg.name: SegmentRanker.options(
            name=f"SegmentRanker_{seg.name}",
            num_replicas=seg.replicas,
            ray_actor_options={"num_cpus": seg.num_cpus},
        ).bind(raw, seg.name, shadow)
        for seg in settings.segments
        if seg.placement == "deployment"
    }
    return Ingress.options(
        num_replicas=settings.ingress_replicas,
        ray_actor_options={"num_cpus": settings.ingress_num_cpus},
    ).bind(raw, rankers, shadow)
