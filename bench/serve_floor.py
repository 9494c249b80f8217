"""The serving architecture's floor on this machine: the same two hops as the ranking
service (HTTP proxy -> FastAPI ingress validating a ``RankRequest`` -> a batched
deployment via its handle -> back), but the second deployment does no work (constant
scores for the candidates). Whatever latency this shows at a concurrency level, the
real service cannot beat it there. Used by ``bench/serve_latency.py``.

No ``from __future__ import annotations`` here: ``serve.ingress`` hands the class to
FastAPI, which must see ``RankRequest`` itself, not its name, to read the body.
"""

from typing import Any

from fastapi import FastAPI
from ray import serve

from serving.app import RankRequest

api = FastAPI()


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.25})
class NoopRanker:
    async def rank(self, req: dict[str, Any]) -> dict[str, Any]:
        return await self._batch(req)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
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


@serve.deployment(max_ongoing_requests=128, ray_actor_options={"num_cpus": 0.1})
@serve.ingress(api)
class NoopIngress:
    def __init__(self, ranker) -> None:
        self.ranker = ranker

    @api.post("/rank")
    async def rank(self, req: RankRequest) -> dict[str, Any]:
        return await self.ranker.rank.remote(req.model_dump())


def start(port: int) -> str:
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(NoopIngress.bind(NoopRanker.bind()), name="floor", route_prefix="/")
    return f"http://127.0.0.1:{port}"
