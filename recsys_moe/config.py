"""Typed configuration: one frozen dataclass per concern, loaded from one TOML file.

Every section is validated in ``__post_init__``; loading rejects unknown keys and
values of the wrong type with a :class:`ConfigError` that names the file, the key
and what is allowed. Paths in the file are kept as written (relative paths are
relative to the working directory the command runs in, normally the repo root).
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

SourceKind = Literal[
    "synthetic", "files", "movielens100k", "census_kdd", "ali_ccp", "aliexpress", "kuairand",
    "douban", "womens_ecommerce",
]  # fmt: skip
TaskKind = Literal["binary", "regression"]
BadRowPolicy = Literal["error", "reject"]


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message says where and what is allowed."""


def _fail(section: str, key: str, msg: str) -> None:
    raise ConfigError(f"[{section}] {key}: {msg}")


def _require_positive(section: str, obj: object, *keys: str) -> None:
    """Every named integer field must be >= 1."""
    for key in keys:
        if getattr(obj, key) < 1:
            _fail(section, key, f"must be >= 1, got {getattr(obj, key)}")


@dataclass(frozen=True)
class TaskSpec:
    """One prediction task (a label column of the interactions table).

    Args:
        name: the label column's name.
        kind: ``binary`` (0/1 labels, BCE) or ``regression`` (float, MSE).
        funnel_parent: for funnel tasks (conversion implies click), the parent task's name.
        weight: loss weight of the task.
    """

    # the label column (and the task's name in metrics and responses)
    name: str
    # binary (0/1 labels, BCE loss) or regression (float, MSE)
    kind: TaskKind = "binary"
    # a funnel task's parent (conversion implies click): see model.funnel
    funnel_parent: str = ""
    # the task's weight in the training loss
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.name:
            _fail("data.tasks", "name", "must be a non-empty column name")
        if self.weight < 0:
            _fail("data.tasks", "weight", f"must be >= 0, got {self.weight}")
        if self.funnel_parent and self.kind != "binary":
            _fail("data.tasks", "funnel_parent", "only binary tasks can be funnel children")


@dataclass(frozen=True)
class SourceConfig:
    """Where the raw log comes from: the synthetic generator or a loader of a public dataset.

    ``path`` is the loader's input folder (e.g. ``../shared/data/movielens_100k``); it is
    ignored for ``synthetic`` and ``files`` (a raw log the user already has in ``data.raw_dir``).
    """

    # the loader: the synthetic generator, files already in data.raw_dir, or a public
    # dataset's
    kind: SourceKind = "synthetic"
    # the loader's input folder (e.g. ../shared/data/movielens_100k); unused by
    # synthetic and files
    path: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("synthetic", "files") and not self.path:
            _fail("source", "path", f"a loader of kind {self.kind!r} needs the dataset folder")


@dataclass(frozen=True)
class SyntheticConfig:
    """The embedded synthetic generator (multi-domain, multi-task impressions with true probabilities)."""

    # impressions to generate
    n_rows: int = 600_000
    # users, with attributes (age band, gender, region, tenure)
    n_users: int = 20_000
    # items, with attributes (category, brand, tags, price)
    n_items: int = 5_000
    # the surfaces impressions happen on, each with tastes of its own
    domains: list[str] = field(default_factory=lambda: ["feed", "search", "video"])
    # dimension of the users' and items' true preference vectors
    latent_dim: int = 8
    # share of a user's / item's preference vector not explained by its attributes
    idiosyncratic: float = 0.6
    # item popularity: exposure follows a Zipf law with this exponent
    zipf_exponent: float = 1.05
    # spread of user activity: events per user are log-normal with this sigma
    user_activity_sigma: float = 1.2
    # the time span of the log
    days: int = 30
    # rows generated and written per Parquet part (memory while generating)
    chunk_rows: int = 500_000
    # the generator's seed: the same config writes the same log
    seed: int = 7
    # ids as strings ("u17", "i4"), as most real logs have them, instead of integers
    string_ids: bool = False
    # share of users and of items that first appear after the log starts (at a uniform
    # time within it; they get impressions only from then on): new users and cold items
    arrival_fraction: float = 0.0
    # how far a user's tastes differ between domains: the scale of each domain's random
    # turn of the user vector (0 = the same tastes in every domain)
    domain_divergence: float = 0.6
    # popularity drift: each item's appeal and exposure follow a trend of its own across
    # the log (its logit moves by drift * N(0, 1) from the first day to the last; 0 = none)
    drift: float = 0.0

    def __post_init__(self) -> None:
        _require_positive(
            "synthetic", self, "n_rows", "n_users", "n_items", "latent_dim", "days", "chunk_rows"
        )
        if not self.domains or len(set(self.domains)) != len(self.domains):
            _fail("synthetic", "domains", "must be a non-empty list of distinct names")
        if self.idiosyncratic < 0:
            _fail("synthetic", "idiosyncratic", "must be >= 0")
        if self.zipf_exponent <= 0:
            _fail("synthetic", "zipf_exponent", "must be > 0")
        if not 0.0 <= self.arrival_fraction < 1.0:
            _fail("synthetic", "arrival_fraction", "must be in [0, 1)")
        if self.domain_divergence < 0:
            _fail("synthetic", "domain_divergence", "must be >= 0")
        if self.drift < 0:
            _fail("synthetic", "drift", "must be >= 0")


@dataclass(frozen=True)
class DataConfig:
    """The raw-log contract: a folder with ``interactions``, ``users`` and ``items`` tables.

    Column names are the user's: nothing downstream hard-codes them.
    """

    # the raw log's folder: interactions/ (or interactions.parquet / .csv), users, items
    raw_dir: str = "data/raw/default"
    # file format of the raw tables; auto: from the file names
    format: Literal["auto", "parquet", "csv"] = "auto"
    # column of the user id (integers or strings)
    user_id: str = "user_id"
    # column of the item id (integers or strings)
    item_id: str = "item_id"
    # column of the domain (the surface an impression happened on)
    domain: str = "domain"
    # column of the event time (the splits and history features are by time)
    timestamp: str = "ts"
    # the prediction tasks, one [[data.tasks]] table each (below)
    tasks: list[TaskSpec] = field(default_factory=lambda: [TaskSpec("click")])
    # categorical columns of the users table
    user_categorical: list[str] = field(default_factory=list)
    # numeric columns of the users table (standardised)
    user_numeric: list[str] = field(default_factory=list)
    # categorical columns of the items table
    item_categorical: list[str] = field(default_factory=list)
    # numeric columns of the items table (standardised)
    item_numeric: list[str] = field(default_factory=list)
    # categorical columns of the interactions (hour, device, ...)
    context_categorical: list[str] = field(default_factory=list)
    # numeric columns of the interactions (standardised)
    context_numeric: list[str] = field(default_factory=list)
    # multi-valued categoricals (list columns, or strings split on `list_separator`)
    multi_valued: list[str] = field(default_factory=list)
    # separator of multi-valued strings ("a|b|c")
    list_separator: str = "|"
    # columns carried through to the examples untouched (e.g. an event id for joins)
    passthrough: list[str] = field(default_factory=list)
    # a row breaking the contract (a null id, a bad label or time): "error" stops the
    # run naming the rows; "reject" leaves them out, counted per reason, and writes them
    # to the store's rejects/ folder
    on_bad_rows: BadRowPolicy = "error"

    def __post_init__(self) -> None:
        if not self.tasks:
            _fail("data", "tasks", "declare at least one task ([[data.tasks]] name = ...)")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            _fail("data", "tasks", f"task names must be distinct, got {names}")
        for t in self.tasks:
            if t.funnel_parent and t.funnel_parent not in names:
                _fail("data", "tasks", f"{t.name}.funnel_parent={t.funnel_parent!r} is not a task")
        keys = [self.user_id, self.item_id, self.domain, self.timestamp]
        if len(set(keys)) != 4:
            _fail("data", "user_id/item_id/domain/timestamp", f"must be 4 distinct columns: {keys}")
        groups = {
            "user_categorical": self.user_categorical,
            "user_numeric": self.user_numeric,
            "item_categorical": self.item_categorical,
            "item_numeric": self.item_numeric,
            "context_categorical": self.context_categorical,
            "context_numeric": self.context_numeric,
        }
        seen: dict[str, str] = {}
        for group, cols in groups.items():
            for c in cols:
                if c in seen:
                    _fail("data", group, f"column {c!r} is also listed in {seen[c]}")
                if c in keys or c in names:
                    _fail(
                        "data", group, f"column {c!r} is an id, domain, timestamp or label column"
                    )
                seen[c] = group
        for c in self.multi_valued:
            if not any(c in cols for g, cols in groups.items() if g.endswith("categorical")):
                _fail("data", "multi_valued", f"{c!r} must also be listed as a categorical column")

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]


@dataclass(frozen=True)
class FeaturesConfig:
    """How the feature store is built (``pipelines/build_features``).

    Splits are by time: the last ``test_fraction`` of timestamps is test, the
    ``valid_fraction`` before it is validation, the rest is training. The default,
    ``test_fraction = 0``, builds no test split: the model trains on every row but the
    validation window (the newest ``valid_fraction``), which early stopping, the reports
    and the promotion gate use. On the rows after the log ends it scored at or above a
    model that also held out a test window (bench/RESULTS.md, "training on the newest
    rows"); the benchmarks carve their own test window (bench/common.load_bench_config).
    """

    # where the feature store is written (examples, lookup tables, vocabularies,
    # manifest)
    store_dir: str = "data/features/default"
    # the newest share of time before the test window: validation (early stopping, the
    # promotion gate)
    valid_fraction: float = 0.1
    # the newest share of time: the test split; 0 builds none and trains on every row
    # but the validation window
    test_fraction: float = 0.0
    # categorical vocabularies come from the training window; rarer values map to OOV (index 0)
    min_count: int = 1
    # at most this many values per categorical vocabulary (the most frequent)
    max_vocab: int = 1_000_000
    # user and item ids as features (false: attributes and history only)
    use_id_features: bool = True
    # point-in-time history features (counts, smoothed label rates, recency, user
    # segment)
    history_features: bool = True
    # additive smoothing of label rates: (sum + prior * strength) / (count + strength)
    smoothing_strength: float = 20.0
    # user segment from the user's event count so far: cold < casual_min <= casual < power_min <= power
    casual_min: int = 5
    # (see casual_min) a user with at least this many events so far is a power user
    power_min: int = 50
    # hash partitions for the per-key (user / item) feature stages
    partitions: int = 8
    # > 0: a store of the newest window (a retrain): only rows of the last window_days
    # days of the log are examples (split by the fractions above); older rows still feed
    # the point-in-time history features and the lookup tables
    window_days: float = 0.0
    # a model (models:/<name>@<alias> or a bundle folder) whose vocabularies, numeric
    # normalisation and lookup rows the store keeps: new values appended after its
    # vocabularies, so a model warm-started from it (recsys-moe train --warm-start) keeps
    # every id it knew; "" builds everything from the log
    grow_from: str = ""

    def __post_init__(self) -> None:
        if self.window_days < 0:
            _fail(
                "features",
                "window_days",
                f"must be >= 0 (0: the whole log), got {self.window_days}",
            )
        if not 0.0 < self.valid_fraction < 0.5:
            _fail("features", "valid_fraction", f"must be in (0, 0.5), got {self.valid_fraction}")
        if not 0.0 <= self.test_fraction < 0.5:
            _fail("features", "test_fraction", f"must be in [0, 0.5), got {self.test_fraction}")
        if self.min_count < 1:
            _fail("features", "min_count", "must be >= 1")
        if self.max_vocab < 2:
            _fail("features", "max_vocab", "must be >= 2")
        if self.smoothing_strength < 0:
            _fail("features", "smoothing_strength", "must be >= 0")
        if not 0 < self.casual_min < self.power_min:
            _fail("features", "casual_min/power_min", "need 0 < casual_min < power_min")
        if self.partitions < 1:
            _fail("features", "partitions", "must be >= 1")


@dataclass(frozen=True)
class ModelConfig:
    """The ranking model (see ``recsys_moe.model``)."""

    # the expert core: shared_bottom, mmoe, ple (CGC levels) or star (shared + per-
    # domain experts)
    arch: Literal["shared_bottom", "mmoe", "ple", "star"] = "mmoe"
    # D, the dimension of every embedding table
    embedding_dim: int = 16
    # embedding rows start N(0, embedding_init_std); 0: torchrec's default, uniform in
    # +-1/sqrt(rows) (up to +-0.7 on a table of a few rows). torch-rechub: N(0, 1e-4)
    embedding_init_std: float = 0.0
    # E, the experts of mmoe (without expert_groups)
    n_experts: int = 8
    # each expert's MLP widths; the last is the experts' output width
    expert_hidden: list[int] = field(default_factory=lambda: [128, 64])
    # each task tower's MLP widths, before its output
    tower_hidden: list[int] = field(default_factory=lambda: [32])
    # feature crosses appended to the expert input: "a+b*c+d" is the elementwise product of
    # (e_a + e_b) and (e_c + e_d), pooled embeddings; e.g. a user side times an item side,
    # the bilinear user x item signal that an MLP on concatenated embeddings learns poorly
    interactions: list[str] = field(default_factory=list)
    # gates: one per task ("task", MMoE) or one shared by all tasks ("one", OMoE); per domain too
    gates: Literal["task", "one"] = "task"
    # a gate per domain as well as per task (false: one per task for all domains)
    gate_by_domain: bool = True
    # how gates weigh experts: softmax (every expert), topk, noisy_topk or expert_choice
    # (sparse)
    routing: Literal["softmax", "topk", "noisy_topk", "expert_choice"] = "softmax"
    # how the stacked experts are computed (recsys_moe/model/experts.py); same results
    expert_impl: Literal["loop", "bmm", "concat", "blockdiag", "fused", "compiled", "auto"] = (
        "concat"
    )
    # top-k / expert-choice routing: each expert computes only the rows routed to it
    # (grouped per-expert GEMMs, recsys_moe/model/experts.sparse_expert_forward) instead
    # of every row with the unrouted outputs masked; same results, faster at every E and
    # k bench/kernels.py measures
    sparse_experts: bool = True
    # experts per row under topk and noisy_topk (and expert_choice's fallback at
    # inference): 1 or 2
    top_k: int = 2
    # topk / noisy_topk, in training: each expert takes at most ceil(capacity_factor x B
    # x k / E) rows of a batch per gate, the lowest-scored beyond it dropped (token
    # dropping); expert_choice: each expert picks ceil(capacity_factor x B / E) rows
    capacity_factor: float = 1.25
    # weight of the Switch-Transformer load-balancing loss E x sum_e f_e x P_e in the
    # training loss
    aux_loss_coef: float = 0.0
    # weight of the router z-loss (the gate logits' log-sum-exp squared), in training
    # only
    z_loss_coef: float = 0.0
    # ple: the number of CGC levels
    ple_levels: int = 2
    # ple / star / expert_groups: experts every task or routing key reaches
    shared_experts: int = 4
    # ple: experts per task; star / expert_groups: experts per routing key value
    specific_experts: int = 2
    # experts private to a routing key besides the shared ones (mmoe / star): "domain"
    # (specific_experts per domain: STAR), "user_segment" (per cold / casual / power user,
    # the segment the feature store computes point-in-time), or both; the gates are then
    # per task x routing key (domain x segment) and a key's gates reach the shared_experts
    # and its own. [] means ["domain"] for arch "star" and no private experts (n_experts
    # shared) for "mmoe"
    expert_groups: list[str] = field(default_factory=list)
    # dropout between expert layers, in training only
    dropout: float = 0.0
    # normalisation of the expert input x = [embeddings | crosses | dense] before experts
    # and gates: "layer" (LayerNorm over x, learned scale and shift) or "none".
    # trials of the project's model on the peers bench's stores (bench/RESULTS.md, "what
    # was tried on MovieLens-100K"): +0.002 / +0.007 AUC on MovieLens-100K, +0.0015 /
    # +0.001 on the sparse config, within noise on the dense default
    input_norm: Literal["none", "layer"] = "layer"
    # "batch": BatchNorm after every hidden layer of the task towers, before the ReLU, as
    # torch-rechub's MLPs have (running statistics for evaluation and serving). Without it
    # torch-rechub's own MMoE loses 0.003-0.004 AUC on MovieLens-100K "like" and lands on
    # the project's model (bench/RESULTS.md, "reproducing torch-rechub's MMoE")
    tower_norm: Literal["none", "batch"] = "none"
    # "batch": BatchNorm on every gate logit before routing, as torch-rechub's gates have
    # (running statistics for evaluation and serving). Without it torch-rechub's own MMoE
    # loses 0.004 click AUC on the sparse config and lands on the project's model as
    # torch-rechub configures it. Not the default: on the regime suite's tune half
    # (`regimes --trial`) it moved the default model's click AUC by +0.003, +0.002, +0.002
    # and -0.002 (many arrivals, outside the spread); docs/model.md, "Towers and gates"
    gate_norm: Literal["none", "batch"] = "none"
    # "batch": BatchNorm before every ReLU inside the experts, per expert unit, as
    # torch-rechub's expert MLPs have (running statistics, folded into the weights, for
    # evaluation and serving). Every expert computes every row (sparse_experts does not
    # apply) and the pool is trained and served whole: no domain slices,
    # expert-parallel shards, extend or revival. The peer reproduction's (bench/quality/
    # peers.py); torch-rechub's MMoE without it loses 0.002 / 0.005 AUC on the sparse config
    expert_norm: Literal["none", "batch"] = "none"
    # how a funnel child (data.tasks' funnel_parent: conversion implies click) is predicted:
    # "product": P(parent) x its own tower's P(child | parent), trained on the product, so
    # the child's loss also trains the parent's tower (ESMM); "independent": its own
    # tower's P(child) with its own loss, as torch-rechub's MMoE / PLE predict every task.
    # Both predict P(parent and child); docs/model.md, "Funnel tasks"
    funnel: Literal["product", "independent"] = "product"
    # training only: each user / item id is replaced by the out-of-vocabulary index with
    # this probability, so the OOV row learns to stand for users and items never seen
    # (cold start) and rare ids lean on attributes and history
    id_dropout: float = 0.0

    def __post_init__(self) -> None:
        _require_positive("model", self, "embedding_dim", "n_experts", "ple_levels")
        for pair in self.interactions:
            if pair.count("*") != 1 or "" in pair.replace("*", "+").split("+"):
                _fail(
                    "model", "interactions", f'{pair!r}: write a cross as "a+b*c+d" (feature names)'
                )
        if not self.expert_hidden or min(self.expert_hidden) < 1:
            _fail("model", "expert_hidden", "must be a non-empty list of positive widths")
        if self.top_k not in (1, 2):
            _fail("model", "top_k", f"must be 1 or 2, got {self.top_k}")
        if self.routing in ("topk", "noisy_topk") and self.top_k > self.n_experts:
            _fail("model", "top_k", "cannot exceed n_experts")
        if self.capacity_factor <= 0:
            _fail("model", "capacity_factor", "must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            _fail("model", "dropout", "must be in [0, 1)")
        if self.embedding_init_std < 0:
            _fail("model", "embedding_init_std", "must be >= 0 (0: torchrec's default)")
        if not 0.0 <= self.id_dropout < 1.0:
            _fail("model", "id_dropout", "must be in [0, 1)")
        bad = [g for g in self.expert_groups if g not in EXPERT_GROUPS]
        if bad or len(set(self.expert_groups)) != len(self.expert_groups):
            _fail(
                "model",
                "expert_groups",
                f"{self.expert_groups}: distinct values of {EXPERT_GROUPS}",
            )
        if self.expert_groups and self.arch not in ("mmoe", "star"):
            _fail("model", "expert_groups", f"needs arch mmoe or star, not {self.arch!r}")

    @property
    def groups(self) -> list[str]:
        """The routing keys with private experts (``expert_groups``; STAR: the domain)."""
        if self.arch == "star" and not self.expert_groups:
            return ["domain"]
        return list(self.expert_groups)


EXPERT_GROUPS = ("domain", "user_segment")


EMBEDDING_OPTIMIZERS = ("adagrad", "rowwise_adagrad", "sgd", "adam")
# routing health, the same defaults wherever the rule is applied (training's monitor and
# reviver, serving's windows): an expert under DEAD_EXPERT_THRESHOLD / (its gate's
# experts) of the load is dead; a gate whose top expert takes more than
# COLLAPSE_THRESHOLD of it has collapsed
DEAD_EXPERT_THRESHOLD = 0.1
COLLAPSE_THRESHOLD = 0.9


@dataclass(frozen=True)
class TrainingConfig:
    """Optimisation and evaluation settings."""

    # at most this many epochs (early stopping may stop sooner)
    epochs: int = 3
    # the global batch: each of W distributed workers takes batch_size // W rows a step
    batch_size: int = 4096
    # Adam's learning rate for the dense parameters (experts, gates, towers)
    lr: float = 3e-3
    # mixed precision of training steps: "bf16" computes experts, gates and towers in
    # bfloat16 under autocast (parameters, embeddings, routing, losses stay float32);
    # "auto": bf16 where the hardware multiplies bf16 natively (CPUs with AMX, e.g.
    # Sapphire Rapids, or AVX512-BF16, e.g. AMD Zen 4; CUDA GPUs with bf16), fp32
    # elsewhere (emulated bf16 is slower).
    # Evaluation, batch scoring and serving always compute in float32.
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    # the expert implementation of training steps: one of model.expert_impl's choices, or
    # "model" (the model's own). Evaluation, scoring and serving use model.expert_impl.
    expert_impl: Literal[
        "model", "loop", "bmm", "concat", "blockdiag", "fused", "compiled", "auto"
    ] = "model"
    # the embedding tables' learning rate
    embedding_lr: float = 0.05
    # the embedding tables' optimiser, fused into FBGEMM's backward where FBGEMM has it:
    # adagrad, rowwise_adagrad and sgd on CPU, adam too on GPU. adam on CPU trains the
    # tables with torch's Adam (dense table gradients; data-parallel tables on several
    # workers). Dense parameters always use Adam.
    embedding_optimizer: str = "adagrad"
    # L2 on the dense weights (Adam's weight_decay)
    weight_decay: float = 0.0
    # L2 on the embedding tables, as torch-rechub's Adam applies it (its tables are plain
    # parameters): every row, every step, so rows of ids seen rarely are pulled to zero.
    # With embedding_optimizer = "adam" on CPU only (torch's Adam on dense table
    # gradients); FBGEMM's fused kernels update only the rows a step touches
    embedding_weight_decay: float = 0.0
    # learning rates are multiplied by this after every epoch
    lr_decay: float = 1.0
    # a warm start (train --warm-start) trains at lr and embedding_lr times this: it
    # continues a trained model without its optimiser state, and fresh Adagrad
    # accumulators make the first steps the largest (default: the rates one epoch of
    # configs/default.toml's lr_decay leaves)
    warm_start_lr_scale: float = 0.3
    # stop after more than this many epochs in a row without a better validation score
    # (0: at the first; torch-rechub's earlystop_patience = n is n - 1 here)
    early_stopping_patience: int = 2
    # after early stopping has chosen the epoch count on the validation window, train a
    # fresh model on train + validation for that many epochs and register it (the newest
    # rows then reach the served model; the promotion gate and the held-out metrics of a
    # store without a test split use the first model, which never saw those rows).
    # bench/quality/newest.py measures both on the rows after the log ends
    refit: bool = False
    # seed of initialisation and shuffling
    seed: int = 0
    # Ray Train workers; 0 = the fastest layout measured (bench/RESULTS.md, "Training
    # layouts"): one worker per node using every core of it, on CPU (one per GPU with
    # use_gpu). `recsys-moe train --workers N` overrides
    workers: int = 0
    # GPU workers with NCCL (recsys-moe train --use-gpu)
    use_gpu: bool = False
    # each worker holds its share of the training and validation rows in memory as tensors
    # (read once, shuffled by the loop every epoch); false streams them from Ray Data with
    # a local shuffle buffer every epoch (for stores larger than the workers' memory)
    in_memory: bool = True
    # experts of MMoE / STAR split across workers (E/W each); false = replicated (DDP)
    expert_parallel: bool = True
    # rows in each worker's local shuffle buffer (the store's rows are already shuffled)
    shuffle_buffer: int = 50_000
    # Ray Train worker placement: PACK (fewest nodes) or SPREAD (one node each where possible)
    placement_strategy: str = "PACK"
    # Ray Train run storage: one folder per run with its per-epoch checkpoints
    checkpoint_dir: str = "checkpoints"
    # Ray Train restarts the worker group from the last checkpoint up to this many times
    max_failures: int = 2
    # the validation metric early stopping and the promotion gate compare (higher is
    # better)
    promote_metric: str = "valid/auc_mean"
    # the router monitor of training and test (metrics in MLflow): an expert under
    # dead_expert_threshold / (its gate's experts) of the load counts as dead, a gate
    # whose top expert takes more than collapse_threshold of it as collapsed
    dead_expert_threshold: float = DEAD_EXPERT_THRESHOLD
    # router health: a gate whose top expert takes more than this share of the load
    # raises the collapse alarm
    collapse_threshold: float = COLLAPSE_THRESHOLD
    # dying experts treated (MMoE / STAR; recsys_moe/model/revive.py): every this many
    # steps, an expert dead by dead_expert_threshold in every gate that may use it is
    # re-initialised from its domain's busiest expert (+ revive_noise x its weights' std)
    # and given that expert's gate columns; 0 = never
    revive_after_steps: int = 0
    # revival: Gaussian noise, this times each weight's standard deviation, added to the
    # donor's weights a dead expert copies, so the two separate
    revive_noise: float = 0.01

    def __post_init__(self) -> None:
        _require_positive("training", self, "epochs", "batch_size")
        if self.early_stopping_patience < 0:
            _fail("training", "early_stopping_patience", "must be >= 0 (0: stop at the first "
                  "epoch without a better validation score)")  # fmt: skip
        if self.workers < 0:
            _fail("training", "workers", f"must be >= 0 (0: one per node), got {self.workers}")
        if self.revive_after_steps < 0 or self.revive_noise < 0:
            _fail("training", "revive_after_steps/revive_noise", "must be >= 0")
        if not 0 <= self.dead_expert_threshold < 1 or not 0 < self.collapse_threshold <= 1:
            _fail("training", "dead_expert_threshold/collapse_threshold",
                  "must be in [0, 1) and (0, 1]")  # fmt: skip
        if self.lr <= 0 or self.embedding_lr <= 0:
            _fail("training", "lr/embedding_lr", "must be > 0")
        if self.weight_decay < 0 or self.embedding_weight_decay < 0:
            _fail("training", "weight_decay/embedding_weight_decay", "must be >= 0")
        if self.embedding_weight_decay and (self.embedding_optimizer != "adam" or self.use_gpu):
            _fail("training", "embedding_weight_decay",
                  "needs embedding_optimizer = \"adam\" on CPU (use_gpu = false): FBGEMM's "
                  "fused table kernels would apply it only to the rows a step touches")  # fmt: skip
        if self.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            _fail(
                "training",
                "placement_strategy",
                f"must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD, got {self.placement_strategy!r}",
            )
        if self.embedding_optimizer not in EMBEDDING_OPTIMIZERS:
            _fail(
                "training",
                "embedding_optimizer",
                f"must be one of {list(EMBEDDING_OPTIMIZERS)}, got {self.embedding_optimizer!r}",
            )
        if not 0 < self.lr_decay <= 1:
            _fail("training", "lr_decay", f"must be in (0, 1], got {self.lr_decay}")
        if not 0 < self.warm_start_lr_scale <= 1:
            _fail("training", "warm_start_lr_scale",
                  f"must be in (0, 1], got {self.warm_start_lr_scale}")  # fmt: skip


@dataclass(frozen=True)
class ServingConfig:
    """Where a trained model is registered: the registered model's name and the alias that
    marks the served version. The service itself is configured in ``serving/config.yaml``
    (which names the model it serves)."""

    # "" = recsys_moe_<config name>: a model trained on other data never competes with
    # (or replaces) another config's champion
    model_name: str = ""
    # the registry alias of the served version; training promotes to it through the gate
    model_alias: str = "champion"

    def __post_init__(self) -> None:
        if not self.model_alias:
            _fail("serving", "model_alias", "must be non-empty")


@dataclass(frozen=True)
class ExtendConfig:
    """``recsys-moe extend``: a new domain added to a trained model (recsys_moe/model/grow.py)."""

    # experts of the new domain (its gates also reach the parent's shared experts)
    experts: int = 3
    # at most this many epochs training the new parameters
    epochs: int = 3
    # rows per training step
    batch_size: int = 2048
    # Adam's learning rate for the new parameters
    lr: float = 3e-3
    # learning rate x this after every epoch (as [training] lr_decay)
    lr_decay: float = 0.3
    # stop after more than this many epochs without a better validation auc_mean
    early_stopping_patience: int = 1
    # the new domain's own crosses: a learned D x D transform of each interaction's first
    # side, (A left) * right, fed to its experts only (needs model.interactions)
    cross: bool = True
    # the parent's activations of the new domain's rows are constants while only the new
    # parameters train: cache them in memory up to this size (0: never)
    cache_gb: float = 4.0
    # append values first seen in the new data to the vocabularies and train their
    # embedding rows (old rows never change). Rows of existing domains that carry such a
    # value (a user first seen in the new domain) then score differently from the parent,
    # which had no embedding for it; false keeps them out-of-vocabulary, as in the parent
    new_embedding_rows: bool = True
    # parent parts to train as well ("embeddings", "experts", "gates", "towers"): existing
    # domains' scores then change, and the promotion gate below must allow it
    unfreeze: list[str] = field(default_factory=list)
    # share of the existing domains' training rows (from the parent's raw log) mixed in
    replay_fraction: float = 0.0
    # promotion gate: the new domain's valid auc_mean must reach this and beat the parent's
    # own scores for the domain (an unknown domain to it); existing domains may move at most
    # existing_tolerance (0: bit-identical) on probe rows
    min_auc: float = 0.55
    # the most an existing domain's scores may move on the probe rows (0: bit-identical)
    existing_tolerance: float = 0.0
    # existing domains' rows scored by parent and child to check the tolerance
    probe_rows: int = 2000
    # seed of the new parameters' initialisation and shuffling
    seed: int = 0

    def __post_init__(self) -> None:
        _require_positive("extend", self, "experts", "epochs", "batch_size", "probe_rows")
        if self.early_stopping_patience < 0:
            _fail("extend", "early_stopping_patience", "must be >= 0")
        bad = set(self.unfreeze) - {"embeddings", "experts", "gates", "towers"}
        if bad:
            _fail("extend", "unfreeze", f"unknown part(s) {sorted(bad)}")
        if not 0.0 <= self.replay_fraction <= 1.0:
            _fail("extend", "replay_fraction", "must be in [0, 1]")
        if self.existing_tolerance < 0:
            _fail("extend", "existing_tolerance", "must be >= 0")


@dataclass(frozen=True)
class ScoringConfig:
    """Batch scoring (``recsys-moe score``) and the blended ranking score.

    The blended score of a candidate is ``sum_t w_t * p_t`` (``blend = "sum"``) or
    ``prod_t p_t ** w_t`` (``"product"``) over the model's tasks; ``task_weights`` maps a
    task name to its weight (a task left out weighs 1.0).
    """

    # rows per scoring batch
    batch_size: int = 16384
    # scoring actors (each loads the model once); 0 = one per CPU of the cluster (at most
    # 8), sized to leave half a CPU to Ray Data's readers and writers
    concurrency: int = 0
    # CPUs each scoring actor reserves
    num_cpus_per_actor: float = 1.0
    # how task probabilities combine into one ranking score: sum (weighted sum) or
    # product (weighted geometric)
    blend: Literal["sum", "product"] = "sum"
    # task name -> weight in the blend (a task left out weighs 1.0)
    task_weights: dict[str, float] = field(default_factory=dict)
    # keep the K best candidates per user in <output>/top_k (0 = off)
    top_k: int = 0

    def __post_init__(self) -> None:
        _require_positive("scoring", self, "batch_size")
        if self.concurrency < 0 or self.top_k < 0:
            _fail("scoring", "concurrency/top_k", "must be >= 0")
        if self.num_cpus_per_actor <= 0:
            _fail("scoring", "num_cpus_per_actor", "must be > 0")


@dataclass(frozen=True)
class Config:
    """The whole configuration: one section per concern."""

    source: SourceConfig = field(default_factory=SourceConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    data: DataConfig = field(default_factory=DataConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    extend: ExtendConfig = field(default_factory=ExtendConfig)
    name: str = "default"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def model_name(self) -> str:
        """The registered model this config's training registers under."""
        return self.serving.model_name or f"recsys_moe_{self.name}"

    @property
    def model_uri(self) -> str:
        """``models:/<name>@<alias>``: the version this config's commands use by default."""
        return f"models:/{self.model_name}@{self.serving.model_alias}"

    def replace(self, **sections: Any) -> Config:
        return dataclasses.replace(self, **sections)


# ---------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert TOML types where lossless."""
    origin = get_origin(tp)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not allowed; use {_type_name(tp)}")
        return value
    if origin in (list, tuple):
        (inner,) = get_args(tp)[:1]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__} {value!r}")
        _, inner = get_args(tp)
        return {str(k): _coerce(v, inner, f"{where}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in get_args(tp) if a is not type(None)]
        if len(inner) != 1 or len(get_args(tp)) != 2:
            raise ConfigError(f"{where}: union types are not supported in configs")
        # X | None (YAML's null; TOML has none): None, or an X
        return None if value is None else _coerce(value, inner[0], where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        return _build(tp, value, where)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")


def _build(cls: type, raw: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed keys: {sorted(fields)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where or 'config'}: {e}") from None


def build_checked(cls: type, raw: Any, where: str = "") -> Any:
    """A dataclass ``cls`` from a parsed mapping, every value checked against its field's
    annotation (literals, numbers, lists, tables, nested dataclasses, ``X | None``) and
    unknown keys refused: ConfigError naming the key (``where`` prefixes it)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a table, got {type(raw).__name__}")
    return _build(cls, raw, where)


def config_from_dict(raw: dict[str, Any], origin: str = "<dict>") -> Config:
    """Build and validate a :class:`Config` from a parsed TOML mapping."""
    try:
        return _build(Config, raw, "")
    except ConfigError as e:
        raise ConfigError(f"{origin}: {e}") from None


def read_config_file(
    path: Path, parse: Any, language: str, error: type[Exception], *, missing: str
) -> Any:
    """``parse(text)`` of the file at ``path``; a missing file or one ``parse`` refuses is
    an ``error`` naming the file (``missing``; "not valid <language>: <why>", on one
    line). Every config file (TOML configs, the YAML serve config) is read through it."""
    if not path.is_file():
        raise error(f"{path}: {missing}")
    try:
        return parse(path.read_text())
    except Exception as e:  # the parser's own error type (tomllib's, yaml's)
        raise error(f"{path}: not valid {language}: {' '.join(str(e).split())}") from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Load ``path`` (TOML), apply ``overrides`` ({"section.key": value}) and validate.

    Raises:
        ConfigError: the file is missing or unparsable, a key is unknown or a value is invalid.
    """
    p = Path(path)
    raw = read_config_file(p, tomllib.loads, "TOML", ConfigError, missing="config file not found")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    raw.setdefault("name", p.stem)
    return config_from_dict(raw, str(p))
