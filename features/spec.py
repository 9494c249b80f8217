"""What the feature store holds, derived from the config: the one place feature names are made.

Columns of the examples table:
  - the raw keys under the user's own names (user id, item id, domain, timestamp);
  - ``cat__<feature>``: categorical features as vocabulary indices (int32; 0 = out of
    vocabulary / unknown), ``list<int32>`` for multi-valued ones;
  - ``num__<feature>``: numeric features (float32, nulls filled with the training mean);
  - ``label__<task>``: the labels; ``split``: train / valid / test; passthrough columns.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

CAT = "cat__"
NUM = "num__"
LABEL = "label__"
SPLIT = "split"
SEGMENT = "user_segment"
SEGMENTS = ("cold", "casual", "power")
# prefixes of the per-key aggregate columns (counts, label sums, last timestamp)
AGG = "_agg_"
# grains of the history features: name -> whose history, and whether per domain
GRAINS = {
    "user": ("user", False),
    "userdom": ("user", True),
    "item": ("item", False),
    "itemdom": ("item", True),
}
MAX_RECENCY_DAYS = 365.0


@dataclass(frozen=True)
class FeatureSpec:
    """Column names, feature lists and the constants the transforms need.

    ``priors`` (per-task mean label of the training window) smooth the label rates; it is
    filled in once the split boundaries are known (:meth:`with_priors`).
    """

    user_id: str
    item_id: str
    domain: str
    timestamp: str
    tasks: list[str]
    task_kinds: list[str]
    user_categorical: list[str]
    item_categorical: list[str]
    context_categorical: list[str]
    user_numeric: list[str]
    item_numeric: list[str]
    context_numeric: list[str]
    multi_valued: list[str]
    list_separator: str
    passthrough: list[str]
    use_id_features: bool
    history_features: bool
    smoothing_strength: float
    casual_min: int
    power_min: int
    priors: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_config(cls, d: Any, f: Any) -> FeatureSpec:
        """From the config's ``[data]`` and ``[features]`` sections (read by attribute:
        this package depends on no other package of the project)."""
        spec = cls(
            user_id=d.user_id,
            item_id=d.item_id,
            domain=d.domain,
            timestamp=d.timestamp,
            tasks=d.task_names,
            task_kinds=[t.kind for t in d.tasks],
            user_categorical=list(d.user_categorical),
            item_categorical=list(d.item_categorical),
            context_categorical=list(d.context_categorical),
            user_numeric=list(d.user_numeric),
            item_numeric=list(d.item_numeric),
            context_numeric=list(d.context_numeric),
            multi_valued=list(d.multi_valued),
            list_separator=d.list_separator,
            passthrough=list(d.passthrough),
            use_id_features=f.use_id_features,
            history_features=f.history_features,
            smoothing_strength=f.smoothing_strength,
            casual_min=f.casual_min,
            power_min=f.power_min,
        )
        clash = set(spec.history_numeric) | ({SEGMENT} if spec.history_features else set())
        taken = clash & set(spec.raw_attribute_columns)
        if taken:
            raise ValueError(
                f"column name(s) {sorted(taken)} are reserved for derived features; rename them"
            )
        return spec

    def with_priors(self, priors: dict[str, float]) -> FeatureSpec:
        return FeatureSpec(**{**asdict(self), "priors": dict(priors)})

    @property
    def raw_attribute_columns(self) -> list[str]:
        return [
            *self.user_categorical,
            *self.item_categorical,
            *self.context_categorical,
            *self.user_numeric,
            *self.item_numeric,
            *self.context_numeric,
        ]

    @property
    def history_numeric(self) -> list[str]:
        if not self.history_features:
            return []
        out = []
        for grain in GRAINS:
            out.append(f"hist_{grain}_cnt")
            out.extend(f"hist_{grain}_rate_{t}" for t in self.tasks)
        out += ["hist_user_recency", "hist_item_recency"]
        return out

    @property
    def categorical(self) -> list[str]:
        """Categorical feature names, in the model's table order."""
        ids = [self.user_id, self.item_id] if self.use_id_features else []
        seg = [SEGMENT] if self.history_features else []
        return [
            *ids,
            self.domain,
            *seg,
            *self.context_categorical,
            *self.user_categorical,
            *self.item_categorical,
        ]

    @property
    def numeric(self) -> list[str]:
        """Numeric feature names, in the model's input order."""
        return [
            *self.history_numeric,
            *self.context_numeric,
            *self.user_numeric,
            *self.item_numeric,
        ]

    def agg_cols(self, grain: str) -> list[str]:
        return [
            f"{AGG}{grain}_n",
            *(f"{AGG}{grain}_s_{t}" for t in self.tasks),
            f"{AGG}{grain}_last",
        ]

    def grain_keys(self, grain: str) -> list[str]:
        who, per_domain = GRAINS[grain]
        key = self.user_id if who == "user" else self.item_id
        return [key, self.domain] if per_domain else [key]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
