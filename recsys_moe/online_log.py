"""The online log: what the ranking service answered, and what happened to it.

The service (``serving/app.py``, with ``online_log_dir`` in its serve config) writes two
kinds of Parquet files under one folder:

- ``scores-*.parquet``: one row per ranked candidate: ``request_id``, ``item_id``,
  ``segment``, ``variant`` (``champion`` / ``challenger``), ``role`` (``served``: the
  answer; ``shadow``: a challenger's scores of the same request, never returned),
  ``model_version``, ``user_id``, ``domain``, ``ts``, the blended ``score`` and one
  ``p_<task>`` per task;
- ``feedback-*.parquet``: what ``POST /feedback`` received: ``request_id``, ``item_id``,
  ``received_at`` and one ``label_<task>`` per task the event reports (null: not reported).

Each writer buffers its rows and its thread writes them as one file every ``flush_s``
seconds, every ``flush_rows`` rows, on :meth:`OnlineLog.flush` and when it is
closed (a writer is meant to serve a whole process: one file per flush, so that
``max_files`` holds hours of answers, not minutes); feedback is
written before ``/feedback`` answers, so an acknowledged event survives a restart. A file
is written beside its name and renamed into place (a reader never sees half of one).
Bounded: past ``max_files`` files of a kind, the oldest are removed (checked every
``PRUNE_EVERY`` writes of a writer and when it closes: a live folder may hold up to that
many more per writer).

:func:`joined` reads a folder back: feedback joined to every version's scores of the
same (request, item), and the count of events that matched none (``unmatched``).
:func:`online_metrics` computes AUC and log loss per segment x variant x version x task
over it, the figures ``/metrics`` (Prometheus), ``recsys-moe online-report`` and
``recsys-moe promote --from-live`` use.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys_moe.metrics import binary_metrics

SCORES, FEEDBACK = "scores", "feedback"
PRUNE_EVERY = 16
KEYS = ["request_id", "item_id"]


class OnlineLog:
    """One writer's buffered, bounded log under ``folder`` (one per process and role:
    files are named by host, process and ``name``, so writers never share a file)."""

    def __init__(
        self,
        folder: str | Path,
        name: str,
        max_files: int = 1000,
        flush_rows: int = 200_000,
        flush_s: float = 10.0,
    ) -> None:
        self.dir = Path(folder)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.prefix = f"{socket.gethostname()}-{os.getpid()}-{name}-{time.time_ns()}"
        self.max_files, self.flush_rows, self.flush_s = max_files, flush_rows, flush_s
        self._buf: dict[str, list[dict[str, Any]]] = {SCORES: [], FEEDBACK: []}
        self._rows = {SCORES: 0, FEEDBACK: 0}
        self._writes = {SCORES: 0, FEEDBACK: 0}
        self._seq = 0
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._wake = threading.Event()  # flush_rows reached: the writer thread writes now
        self._thread = threading.Thread(target=self._tick, daemon=True, name=f"log-{name}")
        self._thread.start()

    def scores(self, record: dict[str, Any]) -> None:
        """One answer's scores: scalar columns plus equal-length sequences (``item_id``,
        ``score``, ``p_<task>``: lists or numpy arrays, kept as given: the conversion
        waits for the write, off the answer's path), one row per candidate once written."""
        with self._lock:
            self._buf[SCORES].append(record)
            self._rows[SCORES] += len(record["item_id"])
            due = self._rows[SCORES] >= self.flush_rows
        if due:  # written by the writer thread, never on the caller's (an answer's) path
            self._wake.set()

    def feedback(self, events: list[dict[str, Any]]) -> None:
        """Feedback events, written before this returns."""
        with self._lock:
            self._buf[FEEDBACK].extend(events)
        self.flush(FEEDBACK)

    def flush(self, kind: str | None = None) -> None:
        for k in [kind] if kind else [SCORES, FEEDBACK]:
            with self._lock:
                rows, self._buf[k], self._rows[k] = self._buf[k], [], 0
                self._seq += 1
                seq = self._seq
            if rows:
                self._write(k, rows, seq)
        self._last = time.monotonic()

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self.flush()
        for kind in (SCORES, FEEDBACK):
            self._prune(kind)

    def _tick(self) -> None:
        while not self._stop.is_set():
            woke = self._wake.wait(self.flush_s / 4)
            self._wake.clear()
            if self._stop.is_set():
                return
            if woke or time.monotonic() - self._last >= self.flush_s:
                try:
                    self.flush(SCORES)
                except OSError as e:  # a full disk must not stop the service
                    print(f"online log: cannot write under {self.dir}: {e}", flush=True)

    def _write(self, kind: str, rows: list[dict[str, Any]], seq: int) -> None:
        df = _scores_frame(rows) if kind == SCORES else pl.DataFrame(rows, infer_schema_length=None)
        path = self.dir / f"{kind}-{self.prefix}-{seq:09d}.parquet"
        tmp = path.with_name("." + path.name + ".tmp")
        df.write_parquet(tmp)
        tmp.rename(path)
        # listing and dating a full folder on every write cost the service more than the
        # write itself: the bound is kept every PRUNE_EVERY writes of a writer, and on close
        self._writes[kind] += 1
        if self._writes[kind] % PRUNE_EVERY == 0:
            self._prune(kind)

    def _prune(self, kind: str) -> None:
        files = sorted(self.dir.glob(f"{kind}-*.parquet"), key=lambda p: p.stat().st_mtime)
        for old in files[: max(0, len(files) - self.max_files)]:
            old.unlink(missing_ok=True)


def _scores_frame(records: list[dict[str, Any]]) -> pl.DataFrame:
    """Answers' records as one row per candidate, built column by column (records with
    other columns, e.g. another model's tasks, in frames of their own, then stacked)."""
    by_keys: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for r in records:
        by_keys.setdefault(tuple(r), []).append(r)
    frames = []
    for keys, recs in by_keys.items():
        n = np.array([len(r["item_id"]) for r in recs])
        at = np.repeat(np.arange(len(recs)), n)
        cols: dict[str, Any] = {}
        for k in keys:
            first = recs[0][k]
            if k == "item_id":
                ids = [i for r in recs for i in r[k]]
                if not all(isinstance(i, str) for i in ids):
                    ids = [str(i) for i in ids]
                cols[k] = pl.Series(k, ids, dtype=pl.String)
            elif isinstance(first, list | np.ndarray):
                cols[k] = np.concatenate([np.asarray(r[k], dtype=np.float64) for r in recs])
            else:
                cols[k] = pl.Series(k, [r[k] for r in recs]).gather(at)
        frames.append(pl.DataFrame(cols))
    return pl.concat(frames, how="diagonal_relaxed")


def read(folder: str | Path, kind: str) -> pl.DataFrame:
    """Every file of ``kind`` under ``folder`` as one frame (empty when there is none)."""
    files = sorted(Path(folder).glob(f"{kind}-*.parquet"))
    if not files:
        return pl.DataFrame()
    return pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed")


def joined(folder: str | Path) -> tuple[pl.DataFrame, dict[str, int]]:
    """Feedback joined to the scores of the same (request, item): one row per event and
    version that scored it, its labels beside that version's ``p_<task>``; and the counts
    ``feedback`` (events received) = ``joined`` (matched a logged answer) + ``unmatched``.
    Several events of one (request, item) are merged first (a label is its maximum: a
    click reported, then a conversion, is one row with both)."""
    fb, scores = read(folder, FEEDBACK), read(folder, SCORES)
    if fb.is_empty():
        return pl.DataFrame(), {"feedback": 0, "joined": 0, "unmatched": 0}
    fb = fb.with_columns(pl.col(k).cast(pl.String) for k in KEYS)
    if scores.is_empty():
        return pl.DataFrame(), {"feedback": fb.height, "joined": 0, "unmatched": fb.height}
    scores = scores.with_columns(pl.col(k).cast(pl.String) for k in KEYS)
    known = fb.join(scores.select(KEYS).unique(), on=KEYS, how="semi").height
    labels = [c for c in fb.columns if c.startswith("label_")]
    merged = fb.group_by(KEYS).agg(pl.col(c).max() for c in labels)
    counts = {"feedback": fb.height, "joined": known, "unmatched": fb.height - known}
    return merged.join(scores, on=KEYS, how="inner"), counts


def task_names(df: pl.DataFrame) -> list[str]:
    return [c.removeprefix("label_") for c in df.columns if c.startswith("label_")]


def online_metrics(df: pl.DataFrame) -> list[dict[str, Any]]:
    """Per segment x variant x version x task of :func:`joined`'s rows: events with that
    task's label, positives, AUC (both classes present) and log loss."""
    out: list[dict[str, Any]] = []
    if df.is_empty():
        return out
    groups = ["segment", "variant", "role", "model_version"]
    for key, g in df.group_by(groups, maintain_order=True):
        for t in task_names(df):
            if f"p_{t}" not in g.columns:
                continue
            rows = g.filter(pl.col(f"label_{t}").is_not_null())
            y = rows[f"label_{t}"].cast(pl.Float64).to_numpy()
            p = rows[f"p_{t}"].cast(pl.Float64).to_numpy()
            m = binary_metrics(y, p) if len(y) else {"n": 0.0}
            out.append({**dict(zip(groups, key, strict=True)), "task": t, "n": len(y),
                        "positives": int(y.sum()) if len(y) else 0,
                        "auc": m.get("auc", float("nan")),
                        "logloss": m.get("logloss", float("nan"))})  # fmt: skip
    return out


def paired(df: pl.DataFrame, segment: str | None = None) -> pl.DataFrame:
    """Events both the champion and the challenger scored (shadow mode: the same
    requests): one row per event, ``p_<task>`` of the champion and ``q_<task>`` of the
    challenger, with the labels and the request id (the resampling unit)."""
    if df.is_empty():
        return df
    if segment is not None:
        df = df.filter(pl.col("segment") == segment)
    tasks = task_names(df)
    labels = [f"label_{t}" for t in tasks]
    champ = df.filter(pl.col("variant") == "champion").select(
        *KEYS, "segment", *labels, *(pl.col(f"p_{t}") for t in tasks),
        pl.col("model_version").alias("champion_version"),
    )  # fmt: skip
    chal = df.filter(pl.col("variant") == "challenger").select(
        *KEYS, *(pl.col(f"p_{t}").alias(f"q_{t}") for t in tasks),
        pl.col("model_version").alias("challenger_version"),
    )  # fmt: skip
    return champ.join(chal, on=KEYS, how="inner")


def paired_bootstrap(
    pairs: pl.DataFrame,
    tasks: list[str],
    confidence: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Challenger minus champion AUC on the same events, averaged over ``tasks`` (each
    over its events with a label), and its bootstrap distribution over requests (a
    request's events are drawn together; the same draw for every task): the difference,
    its one-sided bounds at ``confidence`` (``low``: the challenger is ahead by at least
    this with that confidence) and the share of draws where it is ahead;
    ``events`` / ``positives``: the fewest of any task."""
    from sklearn.metrics import roc_auc_score

    req = np.unique(pairs["request_id"].to_numpy(), return_inverse=True)[1].ravel()
    n_req = int(req.max()) + 1 if len(req) else 0
    per_task = []
    for t in tasks:
        has = pairs[f"label_{t}"].is_not_null().to_numpy()
        y = pairs[f"label_{t}"].cast(pl.Float64).to_numpy()[has]
        per_task.append((y, pairs[f"p_{t}"].to_numpy()[has], pairs[f"q_{t}"].to_numpy()[has],
                         req[has]))  # fmt: skip
    events = min((len(y) for y, *_ in per_task), default=0)
    positives = min((float(y.sum()) for y, *_ in per_task), default=0.0)
    out = {"events": float(events), "positives": positives, "requests": float(n_req)}
    if any(not 0 < y.sum() < len(y) for y, *_ in per_task) or not per_task:
        return out | {"diff": float("nan")}

    def diff(weights: np.ndarray | None) -> float | None:
        d = []
        for y, p, q, r in per_task:
            w = None if weights is None else weights[r]
            keep = slice(None) if w is None else w > 0
            yk, wk = y[keep], None if w is None else w[keep]
            if not 0 < yk.sum() < len(yk):
                return None
            d.append(roc_auc_score(yk, q[keep], sample_weight=wk)
                     - roc_auc_score(yk, p[keep], sample_weight=wk))  # fmt: skip
        return float(np.mean(d))

    rng = np.random.default_rng(seed)
    draws = [diff(np.bincount(rng.integers(0, n_req, n_req), minlength=n_req))
             for _ in range(n_boot)]  # fmt: skip
    d = np.asarray([x for x in draws if x is not None])
    return out | {
        "diff": diff(None),
        "low": float(np.quantile(d, 1 - confidence)) if len(d) else float("nan"),
        "high": float(np.quantile(d, confidence)) if len(d) else float("nan"),
        "p_ahead": float((d > 0).mean()) if len(d) else float("nan"),
    }


__all__ = [
    "FEEDBACK",
    "SCORES",
    "OnlineLog",
    "joined",
    "online_metrics",
    "paired",
    "paired_bootstrap",
    "read",
]
