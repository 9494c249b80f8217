"""The embedded default data: a synthetic multi-domain, multi-task impression log.

Structure (so that models have something real to learn and the best AUC is known):

- users: a latent preference vector ``u`` (d dims) that is mostly a sum of vectors of
  the user's ``age_band``, ``gender`` and ``region`` (users who share demographics share
  tastes) plus an idiosyncratic part (``synthetic.idiosyncratic``); a heavy-tailed
  (log-normal) activity weight, a per-user mixture over domains, a preferred device;
  ``region`` also sets the time zone.
- items: a latent vector ``v`` from the item's ``category`` and ``brand`` vectors plus an
  idiosyncratic part; Zipf popularity with per-domain multipliers; ``price`` (log-normal,
  tied to ``v``) and multi-valued ``tags`` (drawn from ``v``); with ``synthetic.drift``
  each item also has a trend ``g`` (its appeal and exposure rise or fall across the log).
- an impression in domain ``k`` at hour ``h`` on device ``dev``: for task ``t``
  ``logit = b[t,k] + s * <(M_k u) * v, w[t,k]> + pop + hour[k,h] + device[dev,t]``, where
  ``M_k = I + domain_divergence * N(0, 1/d)`` is the domain's turn of the user's tastes and ``w[t,k] = rho_k c + sqrt(1 - rho_k^2) a[t,k]``:
  tasks share direction ``c`` strongly in some domains (rho near 1) and weakly in others;
  ``+ drift * (f - 1/2) * g`` at the fraction ``f`` of the log's time (exposure likewise).
- tasks: ``click``; ``conversion`` only after a click (``p = p_click * p_cvr``, a funnel);
  ``like`` (independent draw, correlated through ``w``).

The true probabilities are written to ``truth/`` (joined by ``event_id``), and the
oracle AUC per task x domain is computed while streaming (binned, 2^16 bins).
Generation streams in chunks: memory is bounded by the chunk size, not the row count.
Chunk ``c`` uses its own RNG stream ``(seed, c)``, so output is deterministic.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl
from tqdm import tqdm

from recsys_moe import console
from recsys_moe.config import SyntheticConfig

TASKS = ("click", "like", "conversion")
DEVICES = ("ios", "android", "web")
AGE_BANDS = ("18-24", "25-34", "35-44", "45-54", "55-64", "65+")
N_REGIONS = 8
N_CATEGORIES = 12
N_BRANDS = 200
N_TAGS = 30
START_TS = 1_767_225_600  # 2026-01-01T00:00:00Z
AUC_BINS = 1 << 16


@dataclass
class World:
    """Every latent quantity of the generator (small: users x d, items x d, domains x ...)."""

    user_latent: np.ndarray  # (U, d)
    user_activity: np.ndarray  # (U,) sums to 1
    user_arrival: np.ndarray  # (U,) seconds after the log's start the user appears
    item_arrival: np.ndarray  # (I,) likewise for items
    user_domain_cdf: np.ndarray  # (U, K)
    user_device: np.ndarray  # (U,)
    user_tz: np.ndarray  # (U,)
    item_latent: np.ndarray  # (I, d)
    item_log_pop: np.ndarray  # (I,)
    item_domain_p: np.ndarray  # (K, I) rows sum to 1, at the log's middle
    item_domain_logit: np.ndarray  # (K, I) the log-weights item_domain_p is the softmax of
    item_trend: np.ndarray  # (I,) each item's drift direction (N(0, 1))
    drift: float
    domain_transform: np.ndarray  # (K, d, d)
    task_weight: np.ndarray  # (T, K, d)
    task_bias: np.ndarray  # (T, K)
    hour_effect: np.ndarray  # (K, 24)
    device_effect: np.ndarray  # (3, T)
    pop_effect: np.ndarray  # (T,)
    scale: float


def _softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def build_world(cfg: SyntheticConfig) -> tuple[World, pl.DataFrame, pl.DataFrame]:
    """Draw the latent world and the users / items attribute tables."""
    rng = np.random.default_rng([cfg.seed, 0])
    d, n_u, n_i, n_k = cfg.latent_dim, cfg.n_users, cfg.n_items, len(cfg.domains)

    # users: demographics drive most of the preference vector; the rest is idiosyncratic
    idio = cfg.idiosyncratic
    age = rng.choice(len(AGE_BANDS), size=n_u, p=[0.18, 0.27, 0.22, 0.16, 0.11, 0.06])
    gender = rng.integers(0, 2, size=n_u)
    region = rng.integers(0, N_REGIONS, size=n_u)
    age_vec, gender_vec, region_vec = rng.normal(size=(len(AGE_BANDS), d)), rng.normal(size=(2, d)), rng.normal(size=(N_REGIONS, d))
    u = 0.6 * age_vec[age] + 0.45 * gender_vec[gender] + 0.35 * region_vec[region] + idio * rng.normal(size=(n_u, d))
    activity = rng.lognormal(0.0, cfg.user_activity_sigma, size=n_u)
    base_domain = np.linspace(1.0, 0.7, n_k)
    domain_mix = rng.dirichlet(base_domain * 2.0, size=n_u)
    device = rng.choice(len(DEVICES), size=n_u, p=[0.45, 0.4, 0.15])
    tz = (region * 3 - 9) % 24
    tenure = np.round(rng.exponential(300.0, size=n_u) * (0.5 + activity / (1.0 + activity)), 1)
    users = pl.DataFrame(
        {
            "user_id": ids(np.arange(n_u), "u", cfg),
            "age_band": np.array(AGE_BANDS)[age],
            "gender": np.array(["f", "m"])[gender],
            "region": np.char.add("r", region.astype(str)),
            "tenure_days": tenure,
        }
    )

    # items: category and brand drive the item vector; price and tags follow from it
    rank = rng.permutation(n_i)
    log_pop = -cfg.zipf_exponent * np.log1p(rank)
    dom_mult = rng.normal(0.0, 0.7, size=(n_k, n_i))
    item_domain_logit = log_pop[None, :] + dom_mult
    item_domain_p = _softmax(item_domain_logit, axis=1)
    category = rng.integers(0, N_CATEGORIES, size=n_i)
    brand = rng.integers(0, N_BRANDS, size=n_i)
    cat_vec, brand_vec = rng.normal(size=(N_CATEGORIES, d)), rng.normal(size=(N_BRANDS, d))
    v = 0.75 * cat_vec[category] + 0.4 * brand_vec[brand] + idio * rng.normal(size=(n_i, d))
    price = np.round(np.exp(3.0 + 0.4 * v[:, 2] + 0.5 * rng.normal(size=n_i)), 2)
    tag_scores = v @ rng.normal(size=(d, N_TAGS)) + rng.gumbel(size=(n_i, N_TAGS))
    n_tags = rng.integers(1, 4, size=n_i)
    top_tags = np.argsort(-tag_scores, axis=1)[:, :3]
    tags = [[f"t{t}" for t in top_tags[i, : n_tags[i]]] for i in range(n_i)]
    items = pl.DataFrame(
        {
            "item_id": ids(np.arange(n_i), "i", cfg),
            "category": np.char.add("c", category.astype(str)),
            "brand": np.char.add("b", brand.astype(str)),
            "price": price,
            "tags": tags,
        }
    )

    n_t = len(TASKS)
    turn = cfg.domain_divergence * rng.normal(size=(n_k, d, d)) / math.sqrt(d)
    transform = np.eye(d)[None] + turn
    rho = np.linspace(0.9, 0.2, n_k)
    common = rng.normal(size=d)
    own = rng.normal(size=(n_t, n_k, d))
    w = rho[None, :, None] * common[None, None, :] + np.sqrt(1 - rho**2)[None, :, None] * own
    w /= np.linalg.norm(w, axis=2, keepdims=True)
    bias = np.stack(
        [
            np.linspace(-1.4, -2.2, n_k),  # click
            np.linspace(-2.2, -1.6, n_k),  # like
            np.linspace(-1.0, -1.8, n_k),  # conversion after click
        ]
    )
    hours = np.arange(24)
    peak = rng.uniform(0, 24, size=n_k)
    hour_effect = 0.35 * np.cos((hours[None, :] - peak[:, None]) / 24.0 * 2 * np.pi)
    device_effect = rng.normal(0.0, 0.25, size=(len(DEVICES), n_t))
    span = cfg.days * 86400
    arrival_rng = np.random.default_rng([cfg.seed, 2])

    def arrivals(n: int) -> np.ndarray:
        late = arrival_rng.random(n) < cfg.arrival_fraction
        return np.where(late, arrival_rng.integers(1, span, n), 0)

    world = World(
        user_latent=u,
        user_activity=activity / activity.sum(),
        user_arrival=arrivals(n_u),
        item_arrival=arrivals(n_i),
        user_domain_cdf=np.cumsum(domain_mix, axis=1),
        user_device=device,
        user_tz=tz,
        item_latent=v,
        item_log_pop=log_pop,
        item_domain_p=item_domain_p,
        item_domain_logit=item_domain_logit,
        # a stream of its own, so that drift = 0 draws the very same world as before
        item_trend=np.random.default_rng([cfg.seed, 3]).normal(size=n_i),
        drift=cfg.drift,
        domain_transform=transform,
        task_weight=w,
        task_bias=bias,
        hour_effect=hour_effect,
        device_effect=device_effect,
        pop_effect=np.array([0.08, 0.04, 0.02]),
        scale=2.2,
    )
    return world, users, items


def ids(index: np.ndarray, prefix: str, cfg: SyntheticConfig) -> np.ndarray:
    """Entity ids: int64, or strings ``<prefix><index>`` with ``synthetic.string_ids``."""
    index = index.astype(np.int64)
    return np.char.add(prefix, index.astype(str)) if cfg.string_ids else index


def _sample_cdf(cdf: np.ndarray, r: np.ndarray) -> np.ndarray:
    return np.minimum(np.searchsorted(cdf, r, side="right"), len(cdf) - 1)


def generate_chunk(world: World, cfg: SyntheticConfig, chunk: int, start: int, n: int) -> tuple[pl.DataFrame, pl.DataFrame, np.ndarray]:
    """Rows ``[start, start + n)``: the impressions, their true probabilities, domain indices."""
    rng = np.random.default_rng([cfg.seed, 1, chunk])
    n_k = len(cfg.domains)
    span = cfg.days * 86400
    t0 = START_TS + (start * span) // cfg.n_rows
    t1 = START_TS + ((start + n) * span) // cfg.n_rows
    ts = np.sort(rng.integers(t0, max(t1, t0 + 1), size=n))
    # users and items that have arrived by the chunk's start (all, without arrivals)
    now = t0 - START_TS
    item_p = world.item_domain_p
    if world.drift:  # exposure follows each item's trend, at the chunk's middle
        mid = ((t0 + t1) / 2 - START_TS) / span - 0.5
        item_p = _softmax(world.item_domain_logit + world.drift * mid * world.item_trend, axis=1)
    users_in = world.user_activity * (world.user_arrival <= now)
    items_in = item_p * (world.item_arrival <= now)[None, :]
    if (world.user_arrival <= now).all() and (world.item_arrival <= now).all():
        users_in, items_in = world.user_activity, item_p  # sum to 1 already
    else:
        users_in = users_in / users_in.sum()
        items_in = items_in / items_in.sum(axis=1, keepdims=True)
    user_cdf, item_cdf = np.cumsum(users_in), np.cumsum(items_in, axis=1)

    user = _sample_cdf(user_cdf, rng.random(n))
    dom = (world.user_domain_cdf[user] < rng.random(n)[:, None]).sum(axis=1)
    dom = np.minimum(dom, n_k - 1)
    item = np.empty(n, dtype=np.int64)
    r = rng.random(n)
    for k in range(n_k):  # a handful of domains: per-domain popularity
        m = dom == k
        item[m] = _sample_cdf(item_cdf[k], r[m])
    device = np.where(rng.random(n) < 0.8, world.user_device[user], rng.integers(0, len(DEVICES), size=n))
    hour = ((ts // 3600) + world.user_tz[user]) % 24

    mu = np.einsum("bij,bj->bi", world.domain_transform[dom], world.user_latent[user])  # (B, d)
    z = mu * world.item_latent[item]  # (B, d)
    d = z.shape[1]
    inter = np.einsum("bd,tbd->bt", z, world.task_weight[:, dom, :]) / math.sqrt(d)  # (B, T)
    logits = (
        world.task_bias[:, dom].T
        + world.scale * inter
        + world.pop_effect[None, :] * world.item_log_pop[item][:, None]
        + world.hour_effect[dom, hour][:, None]
        + world.device_effect[device]
    )
    if world.drift:
        trend = world.drift * ((ts - START_TS) / span - 0.5) * world.item_trend[item]
        logits = logits + trend[:, None]
    p = _sigmoid(logits)
    p_click, p_like, p_cvr = p[:, 0], p[:, 1], p[:, 2]
    click = rng.random(n) < p_click
    like = rng.random(n) < p_like
    conversion = click & (rng.random(n) < p_cvr)
    event_id = np.arange(start, start + n, dtype=np.int64)
    domains = np.array(cfg.domains)
    inter_df = pl.DataFrame(
        {
            "event_id": event_id,
            "user_id": ids(user, "u", cfg),
            "item_id": ids(item, "i", cfg),
            "domain": domains[dom],
            "ts": ts.astype(np.int64),
            "hour": hour.astype(np.int8),
            "device": np.array(DEVICES)[device],
            "click": click.astype(np.int8),
            "like": like.astype(np.int8),
            "conversion": conversion.astype(np.int8),
        }
    )
    truth = pl.DataFrame(
        {
            "event_id": event_id,
            "domain": domains[dom],
            "p_click": p_click.astype(np.float32),
            "p_like": p_like.astype(np.float32),
            "p_conversion": (p_click * p_cvr).astype(np.float32),
        }
    )
    return inter_df, truth, dom


class BinnedAUC:
    """Streaming AUC per (task, domain) from histograms of the predicted probability."""

    def __init__(self, n_tasks: int, n_domains: int, bins: int = AUC_BINS) -> None:
        self.bins = bins
        self.pos = np.zeros((n_tasks, n_domains, bins), dtype=np.int64)
        self.neg = np.zeros((n_tasks, n_domains, bins), dtype=np.int64)

    def update(self, t: int, dom: np.ndarray, p: np.ndarray, y: np.ndarray) -> None:
        b = np.minimum((p * self.bins).astype(np.int64), self.bins - 1)
        n_k = self.pos.shape[1]
        flat = dom * self.bins + b
        self.pos[t] += np.bincount(flat[y == 1], minlength=n_k * self.bins).reshape(n_k, self.bins)
        self.neg[t] += np.bincount(flat[y == 0], minlength=n_k * self.bins).reshape(n_k, self.bins)

    @staticmethod
    def auc(pos: np.ndarray, neg: np.ndarray) -> float:
        n_pos, n_neg = pos.sum(), neg.sum()
        if n_pos == 0 or n_neg == 0:
            return float("nan")
        neg_below = np.cumsum(neg) - neg
        return float((pos * (neg_below + 0.5 * neg)).sum() / (n_pos * n_neg))

    def table(self, domains: list[str]) -> dict[str, dict[str, float]]:
        return {
            task: {dom: self.auc(self.pos[t, k], self.neg[t, k]) for k, dom in enumerate(domains)}
            | {"all": self.auc(self.pos[t].sum(0), self.neg[t].sum(0))}
            for t, task in enumerate(TASKS)
        }


def generate(cfg: SyntheticConfig, out_dir: str | Path, progress: bool = True) -> dict:
    """Write the raw log (``interactions/``, ``users.parquet``, ``items.parquet``) and ``truth/``.

    Returns:
        the metadata written to ``generator.json``: config, row counts, label rates and
        the oracle AUC per task x domain.
    """
    out = Path(out_dir)
    (out / "interactions").mkdir(parents=True, exist_ok=True)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    for old in [*(out / "interactions").glob("*.parquet"), *(out / "truth").glob("*.parquet")]:
        old.unlink()
    started = time.perf_counter()
    world, users, items = build_world(cfg)
    users.write_parquet(out / "users.parquet")
    items.write_parquet(out / "items.parquet")

    domains = list(cfg.domains)
    auc = BinnedAUC(len(TASKS), len(domains))
    label_sums = np.zeros((len(TASKS), len(domains)))
    domain_rows = np.zeros(len(domains), dtype=np.int64)
    n_chunks = math.ceil(cfg.n_rows / cfg.chunk_rows)
    bar = tqdm(total=cfg.n_rows, unit="rows", desc="generate", disable=not progress,
               unit_scale=True, file=console.terminal())  # fmt: skip
    for c in range(n_chunks):
        start = c * cfg.chunk_rows
        n = min(cfg.chunk_rows, cfg.n_rows - start)
        inter, truth, dom_idx = generate_chunk(world, cfg, c, start, n)
        inter.write_parquet(out / "interactions" / f"part-{c:05d}.parquet")
        truth.write_parquet(out / "truth" / f"part-{c:05d}.parquet")
        domain_rows += np.bincount(dom_idx, minlength=len(domains))
        for t, task in enumerate(TASKS):
            y = inter[task].to_numpy()
            auc.update(t, dom_idx, truth[f"p_{task}"].to_numpy(), y)
            label_sums[t] += np.bincount(dom_idx, weights=y, minlength=len(domains))
        bar.update(n)
    bar.close()
    rates = {
        task: {dom: float(label_sums[t, k] / max(domain_rows[k], 1)) for k, dom in enumerate(domains)}
        for t, task in enumerate(TASKS)
    }
    meta = {
        "config": asdict(cfg),
        "rows": int(cfg.n_rows),
        "rows_per_domain": dict(zip(domains, domain_rows.tolist(), strict=True)),
        "label_rate": rates,
        "oracle_auc": auc.table(domains),
        "seconds": round(time.perf_counter() - started, 2),
    }
    (out / "generator.json").write_text(json.dumps(meta, indent=2))
    return meta
