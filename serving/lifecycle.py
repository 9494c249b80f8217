"""Model lifecycle in a replica: load ``models:/<name>@<alias>``, poll the alias, swap.

:class:`ModelWatcher` holds the current :class:`Loaded` (version + whatever the loader
built from the bundle) and a daemon thread that polls the registry every ``poll_s``. When
the alias points at a new version the loader runs *beside* the serving one; only when it
succeeds is ``current`` replaced, in one assignment, so a request (or a batch) that read
``current`` keeps its version to the end. A version that fails to load is logged,
reported by :meth:`ModelWatcher.status` (``/readyz``) and not retried until the alias
moves again; the old version keeps serving. A replica started before the alias exists
(or whose first version does not load) has no model (``current`` is None), says why on
``/readyz`` and loads the first version that appears.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recsys_moe.registry import ModelNotFound

log = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class Loaded:
    version: str
    payload: Any
    loaded_at: float


class ModelWatcher:
    """The current model of a replica and the thread that keeps it on the alias.

    Args:
        uri: ``models:/<name>@<alias>`` (polled) or a bundle folder (loaded once).
        tracking_uri: the MLflow store (None: ``recsys_moe.tracking.tracking_uri()``).
        loader: ``(bundle_dir, version) -> payload``; raising means the version is bad.
    """

    def __init__(
        self,
        uri: str,
        tracking_uri: str | None,
        loader: Callable[[str, str], Any],
        poll_s: float = 10.0,
        name: str = "model",
    ) -> None:
        self.uri, self.tracking_uri, self.loader = uri, tracking_uri, loader
        self.poll_s, self.name = poll_s, name
        self.load_error: str | None = None
        self.failed_version: str | None = None
        self.swaps = 0
        self._lock = threading.Lock()
        self.current: Loaded | None = None
        self._stop = threading.Event()
        if not uri.startswith("models:/"):  # a bundle folder: loaded once, must load
            self.current = self._build(self._download("local"), "local")
            return
        # a registry alias: a replica starts without a model (none registered yet, or the
        # alias's version does not load), answers "not ready" naming it, and loads the
        # first version that does when the alias moves
        self.check_now()
        if self.current is None:
            log.warning("%s: not ready: %s", name, self.load_error)
        self._thread = threading.Thread(target=self._poll, daemon=True, name=f"watch-{name}")
        self._thread.start()

    def _resolve_version(self) -> str:
        if not self.uri.startswith("models:/"):
            return "local"
        from recsys_moe.registry import alias_version, parse_uri

        name, alias, _ = parse_uri(self.uri)
        mv = alias_version(name, alias or "", self.tracking_uri)
        if mv is None:
            raise ModelNotFound(
                f"no model {self.uri} in the registry yet (`make train` registers one)"
            )
        return str(mv.version)

    def _download(self, version: str) -> Path:
        from recsys_moe.registry import parse_uri, resolve_model

        if version == "local":
            return resolve_model(self.uri).bundle
        name = parse_uri(self.uri)[0]
        return resolve_model(f"models:/{name}/{version}", self.tracking_uri).bundle

    def _build(self, bundle: Path, version: str) -> Loaded:
        t = time.perf_counter()
        payload = self.loader(str(bundle), version)
        log.info("%s: loaded %s version %s in %.2fs", self.name, self.uri, version,
                 time.perf_counter() - t)  # fmt: skip
        return Loaded(version, payload, time.time())

    def check_now(self) -> None:
        """One poll: swap if the alias moved and the new version loads."""
        with self._lock:
            try:
                version = self._resolve_version()
            except ModelNotFound as e:
                self.load_error = str(e)
                return
            except Exception as e:  # registry unreachable: keep serving, say so
                self.load_error = f"cannot read {self.uri}: {type(e).__name__}: {e}"
                return
            serving = self.current.version if self.current else None
            if version == serving:  # reachable (again), nothing to swap
                self.load_error, self.failed_version = None, None
                return
            if version == self.failed_version:
                return
            try:
                loaded = self._build(self._download(version), version)
            except Exception as e:
                self.failed_version = version
                self.load_error = f"version {version}: {type(e).__name__}: {e}"
                log.error("%s: %s failed to load, still serving version %s: %s", self.name,
                          self.uri, serving, self.load_error)  # fmt: skip
                return
            self.current = loaded  # the swap: one reference assignment
            self.load_error, self.failed_version = None, None
            self.swaps += 1
            del loaded
        release_memory()  # the old version's, once no batch holds it any more

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.check_now()

    def stop(self) -> None:
        self._stop.set()

    def status(self) -> dict[str, Any]:
        cur = self.current
        return {
            "ready": cur is not None,
            "model": self.uri,
            "model_version": cur.version if cur else None,
            "loaded_at": cur.loaded_at if cur else None,
            "swaps": self.swaps,
            "load_error": self.load_error,
        }


def release_memory() -> None:
    """Collect what a swapped-out version left (its modules hold reference cycles) and
    give the freed heap back to the system: glibc keeps it otherwise, and the replica of
    bench/soak.py held on to part of the old version's memory after a swap."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


__all__ = ["Loaded", "ModelWatcher", "release_memory"]
