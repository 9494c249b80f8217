"""The ranking service on Ray Serve: a FastAPI ingress that routes each request to its
segment's ranker deployment.

    client --HTTP--> Ingress (FastAPI: validation, segment router) --handle--> SegmentRanker[segment]
                                                                      (@serve.batch, model slice)

- **Ingress** validates the request (4xx with a message for every client mistake, bounded
  request size), resolves the segment from the request's domain and the user's segment
  (cold / casual / power, from the feature store's user x domain table) and calls that
  segment's ranker.
- **SegmentRanker** (one deployment per segment, its own replicas and task blend) loads
  ``models:/<name>@<alias>`` from MLflow, batches requests with ``@serve.batch``, looks
  user and item features up from the bundle's tables with the same ``features/`` code as
  training, and computes only the experts its domains use (:mod:`recsys_moe.model.slicing`).
- Both poll the alias (:class:`serving.lifecycle.ModelWatcher`) and swap to a new version
  atomically; a version that fails to load leaves the old one serving and is reported on
  ``/readyz``.

Built by :func:`app_builder` from the ``args`` of ``serving/config.yaml``.
"""

# no `from __future__ import annotations`: FastAPI must see real types on a class
# that serve.ingress pickles by value (string annotations would not resolve)

import importlib
import logging
import shutil
import tempfile
import time
import uuid
import weakref
from collections import Counter
from typing import Any

import polars as pl
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from serving.lifecycle import ModelWatcher
from serving.settings import Segment, ServeSettings

log = logging.getLogger("ray.serve")

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
    items: list[ScoredItem]


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message})


# ------------------------------------------------------------------------------- ranker


@serve.deployment(max_ongoing_requests=64)
class SegmentRanker:
    """One segment's ranker: the model behind the segment's alias, batched."""

    def __init__(self, settings: dict[str, Any], segment: str) -> None:
        from ray.serve import metrics

        self.settings = ServeSettings.from_dict(settings)
        self.segment: Segment = self.settings.segment(segment)
        seg = self.segment
        self.watcher = ModelWatcher(
            self.settings.model_uri(seg.model_alias),
            self.settings.tracking_uri,
            loader=self._load,
            poll_s=self.settings.poll_s,
            name=f"ranker {segment}",
        )
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
        self.m_load = metrics.Gauge(
            "recsys_moe_expert_load",
            "Share of the gate weight per expert over the last window",
            tag_keys=("segment", "gate", "domain", "expert"),
        )
        self.m_dead = metrics.Gauge(
            "recsys_moe_dead_experts", "Dead experts over the last window", tag_keys=tags
        )
        self._last_export = time.monotonic()

    def _load(self, bundle: str, version: str) -> dict[str, Any]:
        from recsys_moe.config import ScoringConfig
        from recsys_moe.model.observe import RouterMonitor
        from recsys_moe.scorer import Scorer

        scorer = Scorer.from_dir(bundle)
        if self.segment.offload_capacity and scorer.model.supports_domain_slices:
            # one folder per loaded version: a swap never reads another version's slices
            where = tempfile.mkdtemp(prefix=f"recsys-moe-{self.segment.name}-v{version}-")
            cache = scorer.offload_experts(where, self.segment.offload_capacity)
            weakref.finalize(cache, shutil.rmtree, where, True)  # gone with its version
            mine = {scorer.domain_index(d) for d in self.segment.domains} - {0}
            active = {k: cache.active(k) for k in sorted(mine) if k in cache}
        else:
            active = scorer.slice_domains(self.segment.domains)
        monitors = {k: RouterMonitor(scorer.model.spec.domains) for k in active}
        blend = ScoringConfig(
            blend=self.segment.blend, task_weights=dict(self.segment.task_weights)
        )
        return {"scorer": scorer, "active": active, "monitors": monitors, "blend": blend}

    def status(self) -> dict[str, Any]:
        return {"segment": self.segment.name, **self.watcher.status()}

    def experts(self) -> dict[str, list[int]]:
        """Domain -> the global expert ids this ranker computes for it."""
        cur = self.watcher.current
        names = cur.payload["scorer"].model.spec.domains
        return {names[k - 1]: ids for k, ids in cur.payload["active"].items()}

    async def rank(self, req: dict[str, Any]) -> dict[str, Any]:
        return await self._rank_batch(req)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _rank_batch(self, reqs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        t0 = time.perf_counter()
        cur = self.watcher.current  # one model version for the whole batch
        scorer = cur.payload["scorer"]
        out: list[dict[str, Any] | None] = [None] * len(reqs)
        frames, ok = [], []
        for i, r in enumerate(reqs):
            try:  # a request whose ids cannot be read never fails its batch-mates
                frames.append(scorer.check(_rows(r, scorer)))
                ok.append(i)
            except (ValueError, TypeError, OverflowError, pl.exceptions.PolarsError) as e:
                out[i] = {"error": str(e)}
        if frames:
            rows = pl.concat(frames, how="diagonal_relaxed")
            scored = scorer.score_frame(
                rows, cur.payload["blend"], monitors=cur.payload["monitors"], checked=True
            )
            start = 0
            for i in ok:
                n = len(reqs[i]["candidates"])
                out[i] = _response(reqs[i], scored.slice(start, n), scorer, cur.version)
                start += n
            self.m_candidates.inc(rows.height, {"segment": self.segment.name})
            cold = int((scored["cold_user"] | scored["cold_item"]).sum())
            if cold:  # Ray's counters only take positive increments
                self.m_cold.inc(cold, {"segment": self.segment.name})
        self.m_requests.inc(len(reqs), {"segment": self.segment.name})
        self.m_latency.observe((time.perf_counter() - t0) * 1e3, {"segment": self.segment.name})
        self._export_router(cur)
        return out

    def _export_router(self, cur) -> None:
        if time.monotonic() - self._last_export < 10.0:
            return
        self._last_export = time.monotonic()
        names = ["oov", *cur.payload["scorer"].model.spec.domains]
        dead = 0.0
        for k, mon in cur.payload["monitors"].items():
            active = cur.payload["active"][k]
            metrics = mon.metrics()
            for key, v in metrics.items():
                parts = key.split("/")  # router/<layer>/<gate>/<domain>/load_e<i>
                if len(parts) == 5 and parts[4].startswith("load_e"):
                    e = active[int(parts[4][6:])] if active else int(parts[4][6:])
                    self.m_load.set(
                        v, {"segment": self.segment.name, "gate": parts[2], "domain": names[k],
                            "expert": str(e)},
                    )  # fmt: skip
            dead += metrics.get("router/dead_experts", 0.0)
            mon.reset()
        self.m_dead.set(dead, {"segment": self.segment.name})


def _rows(req: dict[str, Any], scorer) -> pl.DataFrame:
    s = scorer.spec
    n = len(req["candidates"])
    cols: dict[str, Any] = {
        s.user_id: [req["user_id"]] * n,
        s.item_id: req["candidates"],
        s.domain: [req["domain"]] * n,
    }
    if req.get("timestamp") is not None:
        cols[s.timestamp] = [req["timestamp"]] * n
    for k, v in (req.get("context") or {}).items():
        if k in scorer.optional and k != s.timestamp:
            cols[k] = [v] * n
    return pl.DataFrame(cols, strict=False)


def _response(req: dict[str, Any], scored: pl.DataFrame, scorer, version: str) -> dict[str, Any]:
    tasks = scorer.tasks
    probs = scored.select([f"score_{t}" for t in tasks]).to_numpy()
    blended = scored["score"].to_numpy()
    cold_item = scored["cold_item"].to_list()
    order = (-blended).argsort(kind="stable")
    if req.get("top_k"):
        order = order[: req["top_k"]]
    items = [
        {
            "item_id": req["candidates"][j],
            "score": float(blended[j]),
            "scores": {t: float(probs[j, i]) for i, t in enumerate(tasks)},
            "cold_item": cold_item[j],
        }
        for j in order.tolist()
    ]
    return {
        "user_segment": scored["segment"][0] if scored.height else "cold",
        "cold_user": bool(scored["cold_user"][0]) if scored.height else True,
        "model_version": version,
        "items": items,
    }


# ------------------------------------------------------------------------------ ingress

api = FastAPI(
    title="recsys-moe ranking",
    description="Segment-routed multi-task ranking (Mixture-of-Experts) on Ray Serve.",
    version="1",
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
    from features.history import segment_expr
    from features.spec import AGG
    from features.store import spec_from_manifest
    from recsys_moe.bundle import read_meta, read_tables

    meta = read_meta(bundle)
    spec = spec_from_manifest(meta["manifest"])
    users = read_tables(bundle)["users"]
    seg = users.select(
        spec.user_id, segment_expr(pl.col(f"{AGG}user_n").fill_null(0), spec).alias("segment")
    )
    return {
        "segments": dict(zip(seg[spec.user_id].to_list(), seg["segment"].to_list(), strict=True)),
        "domains": set(meta["manifest"]["domains"]),
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


@serve.deployment(max_ongoing_requests=128)
@serve.ingress(api)
class Ingress:
    """HTTP ingress and segment router."""

    def __init__(self, settings: dict[str, Any], rankers: dict[str, DeploymentHandle]) -> None:
        self.settings = s = ServeSettings.from_dict(settings)
        self.rankers = rankers
        # serve.ingress pickles this class by value: reach the module's own limits
        importlib.import_module("serving.app")._LIMITS["max_body_bytes"] = s.max_body_bytes
        self.watcher = ModelWatcher(
            self.settings.model_uri(self.settings.model_alias),
            self.settings.tracking_uri,
            loader=_routing_tables,
            poll_s=self.settings.poll_s,
            name="router",
        )

    @api.get("/healthz", summary="Liveness: the ingress answers.")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz", summary="Readiness: every segment's model and the features loaded.")
    async def readyz(self) -> JSONResponse:
        segments = {}
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
        "/rank",
        response_model=RankResponse,
        summary="Rank candidate items for a user in a domain.",
        responses={
            411: {"description": "No Content-Length."},
            413: {"description": "Request body too large."},
            422: {"description": "Invalid request (the message names the field)."},
        },
    )
    async def rank(self, req: RankRequest) -> Any:
        s = self.settings
        if len(req.candidates) > s.max_candidates:
            return _error(
                422,
                f"candidates: {len(req.candidates)} items exceed the limit of {s.max_candidates}",
            )
        if len(set(req.candidates)) != len(req.candidates):
            dup = [c for c, n in Counter(req.candidates).items() if n > 1]
            return _error(422, f"candidates: duplicate item ids {dup[:5]}")
        for name, v in [("user_id", req.user_id), *(("candidates", c) for c in req.candidates)]:
            if isinstance(v, str) and len(v) > s.max_id_length:
                return _error(422, f"{name}: id longer than {s.max_id_length} characters")
        tables = self.watcher.current.payload
        user_segment = tables["segments"].get(req.user_id, "cold")
        seg = s.route(req.domain, user_segment)
        if seg is None:
            return _error(
                422,
                f"domain: unknown domain {req.domain!r}; known: {sorted(tables['domains'])}",
            )
        body = req.model_dump()
        rid = req.request_id or uuid.uuid4().hex
        try:
            res = await self.rankers[seg.name].rank.remote(body)
        except Exception as e:
            log.exception("ranker %s failed", seg.name)
            raise HTTPException(503, f"ranker {seg.name} unavailable: {type(e).__name__}") from e
        if "error" in res:
            return _error(422, res["error"])
        return {
            "request_id": rid,
            "segment": seg.name,
            "model": s.model_name,
            **res,
        }


def app_builder(args: dict[str, Any]) -> serve.Application:
    """The Serve application from ``serving/config.yaml``'s ``args``."""
    settings = ServeSettings.from_dict(args)
    raw = settings.to_dict()
    rankers = {
        seg.name: SegmentRanker.options(
            name=f"SegmentRanker_{seg.name}",
            num_replicas=seg.replicas,
            ray_actor_options={"num_cpus": seg.num_cpus},
        ).bind(raw, seg.name)
        for seg in settings.segments
    }
    return Ingress.options(
        num_replicas=settings.ingress_replicas,
        ray_actor_options={"num_cpus": settings.ingress_num_cpus},
    ).bind(raw, rankers)
