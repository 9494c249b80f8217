"""A small Python client for the ranking service.

    from serving.client import RankingClient
    client = RankingClient("http://127.0.0.1:8000")
    ranked = client.rank(user_id=17, domain="feed", candidates=[3, 8, 21], context={"hour": "9"})
    for item in ranked["items"]:
        print(item["item_id"], item["score"], item["scores"])

Client mistakes come back as :class:`RankingError` with the service's message and status.
"""

from __future__ import annotations

from typing import Any

import requests


class RankingError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


class RankingClient:
    def __init__(self, url: str = "http://127.0.0.1:8000", timeout_s: float = 10.0) -> None:
        self.url, self.timeout_s = url.rstrip("/"), timeout_s
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
        body: dict[str, Any] = {"user_id": user_id, "domain": domain, "candidates": candidates}
        for k, v in (("context", context), ("top_k", top_k), ("timestamp", timestamp),
                     ("request_id", request_id)):  # fmt: skip
            if v is not None:
                body[k] = v
        r = self.session.post(f"{self.url}/rank", json=body, timeout=self.timeout_s)
        if r.status_code != 200:
            try:
                message = r.json().get("error") or r.text
            except ValueError:
                message = r.text
            raise RankingError(r.status_code, message)
        return r.json()

    def ready(self) -> dict[str, Any]:
        return self.session.get(f"{self.url}/readyz", timeout=self.timeout_s).json()
