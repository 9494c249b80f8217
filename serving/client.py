"""A small Python client for the ranking service.

    from serving.client import RankingClient
    client = RankingClient("http://127.0.0.1:8000")
    ranked = client.rank(user_id=17, domain="feed", candidates=[3, 8, 21], context={"hour": "9"})
    for item in ranked["items"]:
        print(item["item_id"], item["score"], item["scores"])

A client mistake (4xx) comes back as :class:`RankingError` with the service's message and
status, at once. A 503 (a segment without a model yet, a ranker restarting) is retried up
to ``retries`` times, waiting ``backoff_s`` doubled each time (or the service's
``Retry-After``), then raised as a :class:`RankingError` too.
"""

from __future__ import annotations

import time
from typing import Any

import requests


class RankingError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


class RankingClient:
    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        timeout_s: float = 10.0,
        retries: int = 3,
        backoff_s: float = 0.1,
    ) -> None:
        if retries < 0 or backoff_s < 0:
            raise ValueError("retries and backoff_s must be >= 0")
        self.url, self.timeout_s = url.rstrip("/"), timeout_s
        self.retries, self.backoff_s = retries, backoff_s
        self.session = requests.Session()

    def rank(
        self,
        user_id: int | str,
        domain: str,
        candidates: list[int | str],
        context: dict[str, Any] | None = None,
        top_k: int | None = None,
        timestamp: int | None = None,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        """The ranked candidates (the service's ``RankResponse`` as a dict)."""
        body: dict[str, Any] = {"user_id": user_id, "domain": domain, "candidates": candidates}
        for k, v in (("context", context), ("top_k", top_k), ("timestamp", timestamp),
                     ("request_id", request_id)):  # fmt: skip
            if v is not None:
                body[k] = v
        return self.post("/rank", body)

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        wait = self.backoff_s
        for attempt in range(self.retries + 1):
            r = self.session.post(f"{self.url}{path}", json=body, timeout=self.timeout_s)
            if r.status_code == 200:
                return r.json()
            if r.status_code != 503 or attempt == self.retries:
                raise RankingError(r.status_code, _message(r))
            time.sleep(_retry_after(r, wait))
            wait *= 2
        raise AssertionError("unreachable")

    def ready(self) -> dict[str, Any]:
        """``/readyz``'s body: overall readiness, the router's and each segment's model."""
        return self.session.get(f"{self.url}/readyz", timeout=self.timeout_s).json()

    def close(self) -> None:
        self.session.close()


def _message(r: requests.Response) -> str:
    try:
        return r.json().get("error") or r.text
    except ValueError:
        return r.text


def _retry_after(r: requests.Response, default: float) -> float:
    try:
        return min(float(r.headers.get("retry-after", default)), 30.0)
    except ValueError:
        return default
