"""The serve config's ``args``: model, limits and segments, validated at start-up.

A *segment* is one ranker: the domains (and optionally the user segments) it answers
for, where it runs (``placement``: inside the ingress, or a deployment of its own with its
replicas), the model alias it serves and its task blend. A request goes to the first
segment whose ``domains`` hold its domain and whose ``user_segments`` (default: all) hold
the user's segment; a domain no segment names gets a 422 unless ``default_segment`` names
a segment to send it to.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from features.spec import SEGMENTS
from recsys_moe.config import (
    COLLAPSE_THRESHOLD,
    DEAD_EXPERT_THRESHOLD,
    ConfigError,
    build_checked,
)


class SettingsError(ConfigError):
    """A bad serve config: the message names the key."""


@dataclass(frozen=True)
class Segment:
    name: str
    domains: list[str]
    user_segments: list[str] = field(default_factory=lambda: list(SEGMENTS))
    replicas: int = 1
    # "inline": the ranker runs in the ingress replica (no second hop; scales with the
    # ingress's replicas); "deployment": a SegmentRanker deployment of its own (its own
    # replicas, CPUs or GPU; one more hop). bench/serve_latency.py measures both.
    placement: Literal["inline", "deployment"] = "inline"
    model_alias: str | None = None  # None: the application's alias
    blend: Literal["sum", "product"] = "sum"
    task_weights: dict[str, float] = field(default_factory=dict)
    max_batch_size: int = 32
    # 0: a batch is whatever queued while the last one computed (no added wait at low
    # load, batches grow under load); > 0 waits up to this long to fill a batch
    batch_wait_timeout_s: float = 0.0
    # Ray's logical CPUs per replica (scheduling only; torch runs one thread per replica)
    num_cpus: float = 0.25
    # > 0: the segment's expert pool is never loaded whole: a domain's experts are read
    # from the bundle when asked for and at most this many domains stay resident (LRU;
    # recsys_moe/model/offload.py) - for segments serving many domains of a STAR / MMoE
    # model; 0: every slice of the segment's domains resident
    offload_capacity: int = 0
    # a challenger for this segment: the version at this alias (e.g. "challenger") runs
    # beside the champion; None: none
    challenger_alias: str | None = None
    # shadow: the champion answers every request and the challenger scores the same
    # request after the answer is sent (its scores logged, never returned); canary: the
    # users a stable hash of the user id puts in canary_fraction are answered by it
    challenger_mode: Literal["shadow", "canary"] = "shadow"
    canary_fraction: float = 0.05

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").isalnum():
            raise SettingsError(f"segments: name {self.name!r} must be alphanumeric/underscore")
        if not self.domains:
            raise SettingsError(f"segments.{self.name}.domains: name at least one domain")
        bad = set(self.user_segments) - set(SEGMENTS)
        if bad:
            raise SettingsError(
                f"segments.{self.name}.user_segments: {sorted(bad)} not in {SEGMENTS}"
            )
        if self.replicas < 1 or self.max_batch_size < 1 or self.batch_wait_timeout_s < 0:
            raise SettingsError(f"segments.{self.name}: replicas, max_batch_size must be >= 1")
        if self.offload_capacity < 0:
            raise SettingsError(f"segments.{self.name}.offload_capacity: must be >= 0")
        if self.placement not in ("inline", "deployment"):
            raise SettingsError(f"segments.{self.name}.placement: 'inline' or 'deployment'")
        if self.placement == "inline" and self.replicas != 1:
            raise SettingsError(
                f"segments.{self.name}.replicas: an inline segment runs in the ingress "
                f"(scale ingress_replicas); use placement: deployment for replicas of its own"
            )
        if self.blend not in ("sum", "product"):
            raise SettingsError(f"segments.{self.name}.blend: 'sum' or 'product'")
        if self.challenger_mode not in ("shadow", "canary"):
            raise SettingsError(f"segments.{self.name}.challenger_mode: 'shadow' or 'canary'")
        if not 0.0 <= self.canary_fraction <= 1.0:
            raise SettingsError(f"segments.{self.name}.canary_fraction: must be in [0, 1]")
        if self.challenger_alias is not None and self.challenger_alias == self.model_alias:
            raise SettingsError(
                f"segments.{self.name}.challenger_alias: must differ from the segment's alias"
            )


@dataclass(frozen=True)
class ServeSettings:
    # the registered model served, at this alias (`make train` registers
    # recsys_moe_<config name> and promotes to champion)
    model_name: str = "recsys_moe_default"
    model_alias: str = "champion"
    # None: MLFLOW_TRACKING_URI or the repository's mlruns/ store (recsys_moe.tracking)
    tracking_uri: str | None = None
    # a model bundle folder instead of the registry (tests, air-gapped use); no polling;
    # a segment's challenger_alias then loads the same folder (what bench/serve_latency.py
    # --shadow uses to measure a challenger's cost)
    model_dir: str | None = None
    # seconds between looks at the alias: a moved alias is hot-swapped in
    poll_s: float = 10.0
    # routing health: each ranker's window (metrics, /readyz "routing", collapse warning),
    # judged by the rule and thresholds of training's router monitor
    # (recsys_moe.config.DEAD_EXPERT_THRESHOLD, COLLAPSE_THRESHOLD)
    router_window_s: float = 10.0
    dead_threshold: float = DEAD_EXPERT_THRESHOLD
    collapse_threshold: float = COLLAPSE_THRESHOLD
    # request limits (a larger request gets a 4xx naming the limit; the OpenAPI schema
    # states them): candidates per request, characters per id, bytes per body
    max_candidates: int = 1000
    max_id_length: int = 64
    max_body_bytes: int = 1_000_000
    # the segment that answers a domain no segment names (None: such a request gets a 422)
    default_segment: str | None = None
    # the longest the ingress waits for a ranker deployment's answer (a replica that died
    # or hangs): past it the request gets a 503 with Retry-After, which clients retry
    ranker_timeout_s: float = 5.0
    # the online log: every answer's scores (and a challenger's) and the feedback posted
    # to /feedback, as Parquet files under this folder (kept across restarts; the oldest
    # files removed past online_log_max_files of each kind); None: no log, /feedback off
    online_log_dir: str | None = None
    online_log_max_files: int = 1000
    # seconds between a process's writes of the answers it logged (also written every
    # OnlineLog.flush_rows rows and when the replica stops; a killed replica loses at
    # most this much)
    online_log_flush_s: float = 10.0
    # seconds between the ingress's readings of the online log (online AUC per version x
    # segment x task as Prometheus gauges; GET /online reads it at once)
    online_metrics_s: float = 60.0
    ingress_replicas: int = 1
    ingress_num_cpus: float = 0.1
    segments: list[Segment] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.segments:
            raise SettingsError("segments: declare at least one segment")
        names = [s.name for s in self.segments]
        if len(set(names)) != len(names):
            raise SettingsError(f"segments: duplicate names in {names}")
        if self.default_segment is not None and self.default_segment not in names:
            raise SettingsError(f"default_segment: {self.default_segment!r} is not in {names}")
        if not 1 <= self.max_candidates <= 10_000:
            raise SettingsError("max_candidates: must be in 1..10000")
        if self.poll_s <= 0 or self.router_window_s <= 0 or self.ranker_timeout_s <= 0:
            raise SettingsError("poll_s, router_window_s, ranker_timeout_s: must be > 0")
        if (
            self.online_log_max_files < 1
            or self.online_metrics_s <= 0
            or self.online_log_flush_s <= 0
        ):
            raise SettingsError("online_log_max_files: must be >= 1; online_metrics_s, "
                                "online_log_flush_s: > 0")  # fmt: skip
        if not 0 <= self.dead_threshold < 1 or not 0 < self.collapse_threshold <= 1:
            raise SettingsError("dead_threshold: in [0, 1); collapse_threshold: in (0, 1]")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ServeSettings:
        """Settings from a serve config's ``args``: unknown keys refused and every value
        checked against its field's type (config.py's checks), then the rules above."""
        try:
            return build_checked(cls, raw)
        except ConfigError as e:
            raise SettingsError(str(e)) from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def segment(self, name: str) -> Segment:
        for s in self.segments:
            if s.name == name:
                return s
        raise KeyError(name)

    def model_uri(self, alias: str | None) -> str:
        if self.model_dir:
            return self.model_dir
        return f"models:/{self.model_name}@{alias or self.model_alias}"

    def route(self, domain: str, user_segment: str) -> Segment | None:
        """The segment answering a request (None: unknown domain, no default segment)."""
        for s in self.segments:
            if domain in s.domains and user_segment in s.user_segments:
                return s
        if self.default_segment is not None:
            return self.segment(self.default_segment)
        return None


__all__ = ["Segment", "ServeSettings", "SettingsError"]
