"""The serving architecture's floor on this machine, per placement: the same hops as the
ranking service (HTTP proxy -> FastAPI ingress validating a ``RankRequest`` [-> a batched
ranker deployment via its handle] -> back), with a ranker that does no work (constant
scores for the candidates). Whatever latency a layout's floor shows at a concurrency
level, the real service in that layout cannot beat it there. Used by
``bench/serve_latency.py``.

- ``inline``: the no-op ranker runs in the ingress replica (one hop after the proxy);
- ``deployment``: it is a deployment of its own, called through its handle (two hops).

No ``from __future__ import annotations`` here: ``serve.ingress`` hands the class to
FastAPI, which must see ``RankRequest`` itself, not its name, to read the body.
"""

from typing import Any

from fastapi import FastAPI
from ray import serve

from serving.app import RankRequest

api = FastAPI()
inline_api = FastAPI()


class _Noop:
    """Constant scores for every candidate, batched like the real ranker."""

    async def rank(self, req: dict[str, Any]) -> dict[str, Any]:
        return await self._batch(req)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def _batch(self, reqs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        zero = {"click": 0.0, "like": 0.0, "conversion": 0.0}
        return [
            {
                "items": [
                    {"item_id": c, "score": 0.0, "scores": zero, "cold_item": False}
                    for c in r["candidates"]
                ]
            }
            for r in reqs
        ]


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.25})
class NoopRanker(_Noop):
    pass


@serve.deployment(max_ongoing_requests=128, ray_actor_options={"num_cpus": 0.1})
@serve.ingress(api)
class NoopIngress:
    def __init__(self, ranker) -> None:
        self.ranker = ranker

    @api.post("/rank")
    async def rank(self, req: RankRequest) -> dict[str, Any]:
        return await self.ranker.rank.remote(req.model_dump())


@serve.deployment(max_ongoing_requests=128, ray_actor_options={"num_cpus": 0.1})
@serve.ingress(inline_api)
class NoopInlineIngress:
    def __init__(self) -> None:
        self.ranker = _Noop()

    @inline_api.post("/rank")
    async def rank(self, req: RankRequest) -> dict[str, Any]:
        return await self.ranker.rank(req.model_dump())


def start(port: int, placement: str = "deployment") -> str:
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = (
        NoopIngress.bind(NoopRanker.bind())
        if placement == "deployment"
        else (NoopInlineIngress.bind())
    )
    serve.run(app, name="floor", route_prefix="/")
    return f"http://127.0.0.1:{port}"
