"""Scoring raw request rows with a trained model (a bundle, :mod:`recsys_moe.bundle`).

:class:`Scorer` turns rows of ``user_id, item_id, domain[, timestamp][, context...]`` into
per-task scores with the same ``features/`` code as training (``features.online.assemble``
then ``features.examples.encode``). Unknown users, items, domains and context values get
the out-of-vocabulary index and cold-start defaults, never an error; a missing required
column or a wrong type is a :class:`RequestError` naming it.

Serving uses the other way in: :meth:`Scorer.encode_request` encodes one request (a user,
a domain, its candidates) from the tables turned once into pre-encoded arrays
(:class:`features.online.OnlineFeatures`, the same columns bit for bit, no data frame)
and :meth:`Scorer.rank_many` scores several such requests, one forward per domain.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from features.examples import encode
from features.online import OnlineFeatures, RequestFeatures, assemble, concat_columns
from features.spec import CAT, NUM, SEGMENT
from features.store import numeric_stats, spec_from_manifest
from recsys_moe.bundle import WEIGHTS, bundle_file, load_model, read_tables, read_vocabs
from recsys_moe.config import ScoringConfig
from recsys_moe.model.inputs import ExampleTensors
from recsys_moe.model.observe import RouterMonitor
from recsys_moe.model.ranker import RankingModel
from recsys_moe.model.slicing import domain_slice
from recsys_moe.training import predict


class RequestError(ValueError):
    """Rows that cannot be scored: a missing required column or a column of the wrong type."""


class Scorer:
    """A model with its manifest, vocabularies and lookup tables, ready to score rows."""

    def __init__(
        self,
        model: RankingModel,
        manifest: dict[str, Any],
        vocabs: dict[str, pl.DataFrame],
        tables: dict[str, pl.DataFrame],
    ) -> None:
        self.model = model.eval()
        self.manifest = manifest
        self.spec = spec_from_manifest(manifest)
        self.vocabs, self.tables = vocabs, tables
        self.stats = numeric_stats(manifest)
        self.tasks = model.spec.task_names
        s = self.spec
        self.required = [s.user_id, s.item_id, s.domain]
        self.optional = [s.timestamp, *s.context_categorical, *s.context_numeric]
        # key dtypes of the training data: request ids are cast to them
        self.key_types = {
            s.user_id: tables["users"].schema[s.user_id],
            s.item_id: tables["items"].schema[s.item_id],
            s.domain: tables["user_domain"].schema[s.domain],
        }
        # domain index -> the model slice computing only that domain's experts
        self.slices: dict[int, RankingModel] = {}
        # the user segments the slices are narrowed to (slice_domains), by name
        self._scope_names: set[str] = set()
        # the router's load shares on the test split at training time (bundle's
        # "router_load"), the reference serving compares its routing with
        self.router_reference: dict[str, float] = {}
        self._online: OnlineFeatures | None = None

    @classmethod
    def from_dir(cls, path: str | Path, offload: int = 0) -> Scorer:
        """The bundle at ``path``. ``offload``: serve every domain from its slice, at most
        that many slices in memory, their experts read from the bundle's weights when a
        domain is asked for; the whole expert pool is never in memory (a model without
        domain slices, or with domains added by ``extend``, loads whole)."""
        model, meta = load_model(path, pool_on_disk=offload > 0)
        manifest = meta["manifest"]
        scorer = cls(model, manifest, read_vocabs(path, manifest), read_tables(path))
        scorer.router_reference = dict(meta.get("router_load") or {})
        if offload and any(p.is_meta for p in model.experts.parameters()):
            from recsys_moe.model.offload import DomainSliceCache

            cache = DomainSliceCache(model, None, offload, weights=bundle_file(path, WEIGHTS))
            scorer.slices = cache  # type: ignore[assignment]
            scorer.model = cache.model_without_experts()
        return scorer

    @property
    def offloaded(self):
        """The :class:`~recsys_moe.model.offload.DomainSliceCache` serving the domains,
        or None when the experts are in memory."""
        from recsys_moe.model.offload import DomainSliceCache

        return self.slices if isinstance(self.slices, DomainSliceCache) else None

    def input_columns(self) -> list[str]:
        return [*self.required, *self.optional]

    def check(self, rows: pl.DataFrame) -> pl.DataFrame:
        """Required columns present, ids castable to the training key types; optional
        columns filled (timestamp = now, context = null)."""
        missing = [c for c in self.required if c not in rows.columns]
        if missing:
            raise RequestError(
                f"missing column(s) {missing}; rows need {self.required}, optionally {self.optional}"
            )
        casts = []
        for col, dtype in self.key_types.items():
            try:
                rows.select(pl.col(col).cast(dtype, strict=True))
            except (pl.exceptions.InvalidOperationError, pl.exceptions.ComputeError) as e:
                raise RequestError(
                    f"column {col!r}: cannot read {rows.schema[col]} as {dtype}: {e}"
                ) from None
            casts.append(pl.col(col).cast(dtype))
        rows = rows.with_columns(casts)
        ts = self.spec.timestamp
        if ts not in rows.columns:
            rows = rows.with_columns(pl.lit(int(time.time()), dtype=pl.Int64).alias(ts))
        types = {ts: pl.Int64, **{c: pl.Float64 for c in self.spec.context_numeric}}
        for c in self.spec.context_categorical:
            inner = self.vocabs[c]["value"].dtype
            types[c] = pl.List(inner) if c in self.spec.multi_valued else inner
        exprs = []
        for col, dtype in types.items():
            if col not in rows.columns or rows.schema[col] == pl.Null:
                exprs.append(pl.lit(None, dtype=dtype).alias(col))
                continue
            try:
                rows.select(pl.col(col).cast(dtype, strict=True))
            except (pl.exceptions.InvalidOperationError, pl.exceptions.ComputeError):
                raise RequestError(
                    f"column {col!r}: cannot read {rows.schema[col]} as {dtype}"
                ) from None
            exprs.append(pl.col(col).cast(dtype))
        return rows.with_columns(exprs)

    def example_rows(self, encoded: pl.DataFrame) -> pl.DataFrame:
        """Raw request rows (keys, timestamp, context) back from encoded store rows."""
        s = self.spec
        out = encoded.select(s.user_id, s.item_id, s.domain, s.timestamp)
        for c in [*s.context_categorical, *s.context_numeric]:
            if c in s.context_numeric:
                out = out.with_columns(encoded[NUM + c].alias(c))
                continue
            vocab = self.vocabs[c].select(pl.col("index").cast(pl.Int64), "value")
            codes = encoded.select(pl.col(CAT + c).cast(pl.Int64).alias("index"))
            out = out.with_columns(
                codes.join(vocab, on="index", how="left", maintain_order="left")["value"].alias(c)
            )
        return out

    def features(self, rows: pl.DataFrame) -> pl.DataFrame:
        """Raw rows -> the encoded example columns the model reads (row order kept)."""
        df = assemble(self.check(rows).select(self.input_columns()), self.tables, self.spec)
        return encode(df, self.spec, self.vocabs, self.stats, keep_split=False)

    def domain_index(self, domain: str) -> int:
        """The model's index of a domain name (0: out of vocabulary)."""
        names = self.model.spec.domains
        return names.index(domain) + 1 if domain in names else 0

    def slice_domains(
        self, domains: list[str], user_segments: list[str] | None = None
    ) -> dict[int, list[int]]:
        """Score rows of these domains with their domain slices (only the experts each
        domain's gates can reach are computed; see :mod:`recsys_moe.model.slicing`); with
        user-segment experts, narrowed to the experts of ``user_segments``' users (a
        request of another segment is scored by the full model). Returns domain index ->
        the global expert ids its slice computes."""
        segs = None
        if user_segments is not None and getattr(self.model.core, "segment_keyed", False):
            values = self.vocabs[self.model._segment_key]
            index = dict(zip(values["value"].cast(pl.String), values["index"], strict=True))
            segs = sorted(int(index[g]) for g in user_segments if g in index)
            self._scope_names = {g for g in user_segments if g in index}
        self.slices = {}
        for d in domains:
            k = self.domain_index(d)
            if k:
                self.slices[k] = domain_slice(self.model, k, segs)
        return {k: getattr(m, "active", []) for k, m in self.slices.items()}

    def _model_for(self, domain: int, segment: str | None = None) -> RankingModel:
        """The model that scores rows of domain index ``domain`` (of users of ``segment``;
        None: rows of any segment): its slice, unless the slice is narrowed to other
        users' segments."""
        m = self.slices.get(domain, self.model)
        scope = getattr(m, "segment_scope", None)
        if scope is None:
            return m
        return m if segment is not None and segment in self._scope_names else self.model

    def offload_experts(self, directory: str | Path, capacity: int = 2):
        """Serve every domain from its slice, at most ``capacity`` slices in memory and
        the rest read from ``directory`` on demand
        (:class:`recsys_moe.model.offload.DomainSliceCache`). The full expert pool is then
        dropped from memory (kept only for domains added by ``recsys-moe extend``, which
        read every parent expert)."""
        from recsys_moe.model.offload import DomainSliceCache

        cache = DomainSliceCache(self.model, directory, capacity)
        self.slices = cache  # type: ignore[assignment]
        if not len(self.model.extensions):
            import gc

            from recsys_moe.runtime import release_memory

            self.model = cache.model_without_experts()
            gc.collect()
            release_memory()  # the dropped pool's pages back to the OS
        return cache

    @property
    def online(self) -> OnlineFeatures:
        """The lookup tables as pre-encoded arrays (built on first use)."""
        if self._online is None:
            self._online = OnlineFeatures(self.tables, self.vocabs, self.stats, self.spec)
        return self._online

    def encode_request(
        self,
        user_id: Any,
        domain: str,
        candidates: list[Any],
        timestamp: int | None = None,
        context: dict[str, Any] | None = None,
    ) -> RequestFeatures:
        """One request's rows encoded from the pre-encoded tables (no data frame); a
        wrong-typed id or context value raises :class:`RequestError`. Context keys the
        model does not read are ignored, as :meth:`check` ignores extra columns."""
        ts = int(time.time()) if timestamp is None else int(timestamp)
        try:
            return self.online.encode(user_id, domain, candidates, ts, context)
        except ValueError as e:
            raise RequestError(str(e)) from None

    @torch.no_grad()
    def rank_many(
        self,
        requests: list[tuple[str, RequestFeatures]],
        monitors: dict[int, RouterMonitor] | None = None,
    ) -> list[np.ndarray]:
        """Per-task scores (n_i, T) of encoded requests ``(domain, features)``: the
        requests of one domain are scored together by that domain's slice."""
        out: list[np.ndarray] = [np.zeros((0, len(self.tasks)), np.float32)] * len(requests)
        by_model: dict[tuple[int, int], list[int]] = {}
        models: dict[int, RankingModel] = {}
        for i, (domain, f) in enumerate(requests):
            k = self.domain_index(domain)
            m = self._model_for(k, f.user_segment)
            models[id(m)] = m
            by_model.setdefault((k, id(m)), []).append(i)
        for (k, mid), idx in by_model.items():
            feats = [requests[i][1] for i in idx]
            data = ExampleTensors.from_arrays(
                self.model.spec, concat_columns([f.columns for f in feats]), sum(f.n for f in feats)
            )
            batch = data.batch(slice(None))
            res = models[mid](batch)
            if monitors is not None and k in monitors:
                monitors[k].update(res, batch.domain)
            preds = res.preds.float().numpy()
            start = 0
            for i, f in zip(idx, feats, strict=True):
                out[i] = preds[start : start + f.n]
                start += f.n
        return out

    def _predict(
        self,
        encoded: pl.DataFrame,
        batch_size: int,
        monitors: dict[int, RouterMonitor] | None = None,
    ) -> np.ndarray:
        spec = self.model.spec
        dom = encoded[spec.domain_column].to_numpy() if self.slices else None
        groups = np.unique(dom) if dom is not None else np.array([], dtype=np.int64)
        if len(groups) <= 1:  # one domain (a served request) or no slices: no reordering
            k = int(groups[0]) if len(groups) else -1
            data = ExampleTensors(spec, encoded, with_labels=False)
            monitor = (monitors or {}).get(k)
            return predict(self._model_for(k), data, batch_size, monitor)
        out = np.empty((encoded.height, len(self.tasks)), dtype=np.float32)
        for k in groups.tolist():
            rows = np.flatnonzero(dom == k)
            sub = ExampleTensors(spec, encoded[rows], with_labels=False)
            out[rows] = predict(self._model_for(k), sub, batch_size, (monitors or {}).get(k))
        return out

    @torch.no_grad()
    def score(self, rows: pl.DataFrame, batch_size: int = 8192) -> np.ndarray:
        """(n, T) per-task scores (probabilities for binary tasks), in row order."""
        if rows.height == 0:
            return np.zeros((0, len(self.tasks)), dtype=np.float32)
        return self._predict(self.features(rows), batch_size)

    def score_frame(
        self,
        rows: pl.DataFrame,
        blend: ScoringConfig | None = None,
        batch_size: int = 8192,
        monitors: dict[int, RouterMonitor] | None = None,
    ) -> pl.DataFrame:
        """One ``score_<task>`` column per task; with ``blend`` also ``score`` (the blended
        ranking score), ``segment`` (cold / casual / power), ``cold_user``, ``cold_item``."""
        if rows.height == 0:
            return self._empty_frame(blend)
        checked = self.check(rows)
        df = assemble(checked.select(self.input_columns()), self.tables, self.spec)
        p = self._predict(
            encode(df, self.spec, self.vocabs, self.stats, keep_split=False), batch_size, monitors
        )
        out = pl.DataFrame({f"score_{t}": p[:, i] for i, t in enumerate(self.tasks)})
        if blend is None:
            return out
        s = self.spec
        segment = df[SEGMENT].cast(pl.String) if SEGMENT in df.columns else pl.lit(None, pl.String)
        return out.with_columns(
            pl.Series("score", blended(p, self.tasks, blend)),
            segment.alias("segment"),
            (~checked[s.user_id].is_in(self.tables["users"][s.user_id].implode())).alias(
                "cold_user"
            ),
            (~checked[s.item_id].is_in(self.tables["items"][s.item_id].implode())).alias(
                "cold_item"
            ),
        )

    def _empty_frame(self, blend: ScoringConfig | None) -> pl.DataFrame:
        schema: dict[str, pl.DataType] = {f"score_{t}": pl.Float32 for t in self.tasks}
        if blend is not None:
            schema |= {"score": pl.Float32, "segment": pl.String, "cold_user": pl.Boolean,
                       "cold_item": pl.Boolean}  # fmt: skip
        return pl.DataFrame(schema=schema)


def blended(scores: np.ndarray, tasks: list[str], cfg: ScoringConfig) -> np.ndarray:
    """The ranking score from per-task scores (n, T): weighted sum or weighted product."""
    w = np.array([cfg.task_weights.get(t, 1.0) for t in tasks], dtype=np.float64)
    if cfg.blend == "product":
        return np.exp(np.log(np.clip(scores, 1e-12, None)) @ w).astype(np.float32)
    return (scores.astype(np.float64) @ w).astype(np.float32)


__all__ = ["RequestError", "Scorer", "blended"]
