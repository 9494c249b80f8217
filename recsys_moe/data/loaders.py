"""Loaders that map public datasets onto the raw-log contract.

Each reads the dataset from its folder (``source.path`` in the config, normally under
``../shared/data``; the data is never copied into this repository) and returns the three
tables; :func:`materialize` writes them to ``data.raw_dir``. The choices each loader makes
(tasks, domain, timestamp) are in its docstring and in its ``configs/*.toml``.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl

from recsys_moe.data.schema import RawLogError

Tables = tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]

ML_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
]  # fmt: skip
ML_DOMAIN = {  # primary genre -> domain (content vertical)
    **dict.fromkeys(["Action", "Adventure", "Sci-Fi", "Thriller", "War", "Western", "Crime",
                     "Horror", "Mystery", "Film-Noir"], "action"),
    **dict.fromkeys(["Comedy", "Romance", "Musical", "Children's", "Animation", "Fantasy"], "light"),
    **dict.fromkeys(["Drama", "Documentary", "unknown"], "drama"),
}  # fmt: skip
AGE_EDGES = [18, 25, 35, 45, 50, 56]
AGE_LABELS = ["<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+"]


def _need(path: Path) -> Path:
    if not path.exists():
        raise RawLogError(f"{path}: dataset file not found (is ../shared/data present? see docs/data.md)")
    return path


def _first_per_key(df: pl.DataFrame, key: str, cols: list[str]) -> pl.DataFrame:
    """Attribute table from an impression-level file: the first row of each key."""
    return df.select(key, *cols).unique(subset=key, keep="first", maintain_order=True)


def load_movielens100k(root: Path) -> Tables:
    """MovieLens-100K: tasks ``like`` (rating >= 4) and ``love`` (rating == 5, a funnel
    child of like); domain = content vertical from the item's first genre (action /
    light / drama); context = UTC hour and weekday of the rating; ids are the originals."""
    inter = pl.read_csv(
        _need(root / "u.data"), separator="\t", has_header=False,
        new_columns=["user_id", "item_id", "rating", "ts"],
    )  # fmt: skip
    users = pl.read_csv(
        _need(root / "u.user"), separator="|", has_header=False,
        new_columns=["user_id", "age", "gender", "occupation", "zip"],
        schema_overrides={"zip": pl.String},
    )  # fmt: skip
    raw_items = _need(root / "u.item").read_bytes().decode("latin-1")
    rows = [line.split("|") for line in raw_items.splitlines() if line.strip()]
    genres = [[g for g, flag in zip(ML_GENRES, r[5:24], strict=True) if flag == "1"] or ["unknown"] for r in rows]
    items = pl.DataFrame(
        {
            "item_id": [int(r[0]) for r in rows],
            "release_year": [float(r[2][-4:]) if r[2] else None for r in rows],
            "genres": genres,
        }
    ).with_columns(
        pl.col("genres").list.first().replace_strict(ML_DOMAIN).alias("vertical"),
        ((pl.col("release_year") // 10) * 10).cast(pl.Int32).cast(pl.String).fill_null("unknown").alias("decade"),
    )
    band = np.array(AGE_LABELS)[np.digitize(users["age"].to_numpy(), AGE_EDGES)]
    users = users.with_columns(
        pl.Series("age_band", band, dtype=pl.String),
        pl.col("zip").str.slice(0, 1).alias("zip1"),
        pl.col("age").cast(pl.Float64),
    ).drop("zip")
    dt = pl.from_epoch("ts", time_unit="s")
    inter = (
        inter.join(items.select("item_id", "vertical"), on="item_id", how="left")
        .with_columns(
            (pl.col("rating") >= 4).cast(pl.Int8).alias("like"),
            (pl.col("rating") == 5).cast(pl.Int8).alias("love"),
            dt.dt.hour().alias("hour"),
            dt.dt.weekday().alias("weekday"),
        )
        .rename({"vertical": "domain"})
        .select("user_id", "item_id", "domain", "ts", "hour", "weekday", "like", "love", "rating")
    )
    return inter, users, items.drop("vertical")


CENSUS_NUMERIC = ["age", "wage_per_hour", "capital_gains", "capital_losses", "stock_dividends", "num_emp", "weeks_worked"]
CENSUS_DOMAIN = {
    "Private": "private",
    "Federal government": "government",
    "State government": "government",
    "Local government": "government",
    "Self-employed-incorporated": "self_employed",
    "Self-employed-not incorporated": "self_employed",
}


def load_census_kdd(root: Path) -> Tables:
    """Census-Income KDD (the MMoE paper's data; only the 99,762-row test file is here).

    Each person is a user with one impression of a single pseudo item; tasks
    ``income_50k`` and ``never_married`` (the paper's group 1); domain = class of worker
    grouped (private / government / self_employed / other); the file has no time, so
    ``ts`` is the row number and the time split is a row-order split."""
    names = _need(root / "columns.txt").read_text().split()
    with gzip.open(_need(root / "census-income.test.gz"), "rb") as fh:
        df = pl.read_csv(
            fh.read(), has_header=False, new_columns=names, separator=",",
            infer_schema_length=0, null_values=["?", "NA"],
        )  # fmt: skip
    df = df.with_columns(pl.all().str.strip_chars())
    df = df.with_columns(
        [pl.col(c).cast(pl.Float64) for c in CENSUS_NUMERIC]
    ).with_row_index("user_id")
    inter = df.select(
        pl.col("user_id").cast(pl.Int64),
        pl.lit(0, dtype=pl.Int64).alias("item_id"),
        pl.col("class_worker").replace_strict(CENSUS_DOMAIN, default="other").alias("domain"),
        pl.col("user_id").cast(pl.Int64).alias("ts"),
        (pl.col("income_50k") == "50000+.").cast(pl.Int8).alias("income_50k"),
        (pl.col("marital_stat") == "Never married").cast(pl.Int8).alias("never_married"),
    )
    drop = {"user_id", "income_50k", "marital_stat", "instance_weight", "class_worker"}
    cat = [c for c in names if c not in drop and c not in CENSUS_NUMERIC]
    users = df.select(pl.col("user_id").cast(pl.Int64), *[pl.col(c).fill_null("?") for c in cat], *CENSUS_NUMERIC)
    items = pl.DataFrame({"item_id": [0]}, schema={"item_id": pl.Int64})
    return inter, users, items


ALI_CCP_USER = ["121", "122", "124", "125", "126", "127", "128", "129"]
ALI_CCP_ITEM = ["206", "207", "210", "216"]


def load_ali_ccp(root: Path) -> Tables:
    """Ali-CCP samples (train, val, test concatenated in that order; ``ts`` = row number).
    Tasks ``click`` and ``purchase`` (funnel child of click); domain = field ``301``;
    user id = field ``101``, item id = ``205``; attributes are each id's first row."""
    parts = [pl.read_csv(_need(root / f"ali_ccp_{s}_sample.csv"), infer_schema_length=0) for s in ("train", "val", "test")]
    df = pl.concat(parts).with_row_index("ts")
    dense = [c for c in df.columns if c.startswith("D")]
    df = df.with_columns(
        pl.col("ts").cast(pl.Int64),
        pl.col("click", "purchase", "101", "205").cast(pl.Int64),
        *[pl.col(c).cast(pl.Float64) for c in dense],
    )
    users = _first_per_key(df, "101", ALI_CCP_USER)
    items = _first_per_key(df, "205", ALI_CCP_ITEM)
    inter = df.drop(ALI_CCP_USER + ALI_CCP_ITEM)
    return inter, users, items


def load_aliexpress(root: Path) -> Tables:
    """AliExpress samples (train then test; ``ts`` = row number). Tasks ``click`` and
    ``conversion`` (funnel child of click); the sample's country is unknown, so there is one
    domain ``all``; user id = ``search_id``, item id = row number; all fields are context."""
    parts = [pl.read_csv(_need(root / f"aliexpress_{s}_sample.csv")) for s in ("train", "test")]
    df = pl.concat(parts, how="vertical_relaxed").with_row_index("ts")
    df = df.with_columns(
        pl.col("ts").cast(pl.Int64),
        pl.col("ts").cast(pl.Int64).alias("item_id"),
        pl.lit("all").alias("domain"),
        pl.col("click", "conversion").cast(pl.Int8),
    )
    users = df.select("search_id").unique(maintain_order=True)
    items = df.select("item_id")
    return df, users, items


KUAI_USER_CAT = [
    "user_active_degree", "is_lowactive_period", "is_live_streamer", "is_video_author",
    "follow_user_num_range", "fans_user_num_range", "friend_user_num_range", "register_days_range",
    *[f"onehot_feat{i}" for i in range(18)],
]  # fmt: skip
KUAI_USER_NUM = ["follow_user_num", "fans_user_num", "friend_user_num", "register_days"]
KUAI_ITEM_CAT = ["video_type", "visible_status"]
KUAI_ITEM_NUM = ["server_width", "server_height", "duration_ms"]


def load_kuairand(root: Path) -> Tables:
    """KuaiRand-1K sample (``ts`` = row number). Tasks ``is_click`` and ``long_view``
    (play time >= min(duration, 18 s), counted only for clicks: a funnel child of is_click);
    domain = ``tab`` (one value in this sample); attributes are each id's first row."""
    df = pl.read_csv(_need(root / "kuairand_sample.csv")).rename({"server_heigh": "server_height"}, strict=False)
    df = df.with_row_index("ts").with_columns(
        pl.col("ts").cast(pl.Int64),
        pl.col("tab").cast(pl.String),
        (
            (pl.col("is_click") == 1)
            & (pl.col("play_time_ms") >= pl.min_horizontal(pl.col("duration_ms"), pl.lit(18_000)))
        )
        .cast(pl.Int8)
        .alias("long_view"),
    )
    users = _first_per_key(df, "user_id", KUAI_USER_CAT + KUAI_USER_NUM)
    items = _first_per_key(df, "video_id", KUAI_ITEM_CAT + KUAI_ITEM_NUM)
    inter = df.select("user_id", "video_id", "tab", "ts", "is_click", "long_view")
    return inter, users, items


def _shuffled_ts(n: int, seed: int = 0) -> pl.Series:
    """A fixed random order as the timestamp of a file without time: the time split is
    then a random split (the same one every run)."""
    return pl.Series("ts", np.random.default_rng(seed).permutation(n), dtype=pl.Int64)


def load_douban(root: Path) -> Tables:
    """Douban book + music ratings (two domains, shared users; explicit ratings only):
    tasks ``like`` (rating >= 4) and ``love`` (rating == 5, a funnel child of like);
    domain = the file (book / music); user ids are shared across the files, item ids are
    per file, so items become ``book:<id>`` / ``music:<id>`` strings. The files carry no
    time: ``ts`` is a fixed random order (a random split, as the DTCDR papers use)."""
    parts = []
    for domain in ("book", "music"):
        df = pl.read_csv(
            _need(root / f"douban_{domain}_ratings.dat"), separator="\t", has_header=False,
            new_columns=["user_id", "item_id", "rating"],
            schema_overrides={"user_id": pl.Int64, "item_id": pl.String, "rating": pl.Int64},
        )  # fmt: skip
        parts.append(
            df.with_columns(
                (pl.lit(f"{domain}:") + pl.col("item_id")).alias("item_id"),
                pl.lit(domain).alias("domain"),
            )
        )
    inter = pl.concat(parts)
    inter = inter.with_columns(
        _shuffled_ts(inter.height),
        (pl.col("rating") >= 4).cast(pl.Int8).alias("like"),
        (pl.col("rating") == 5).cast(pl.Int8).alias("love"),
    ).select("user_id", "item_id", "domain", "ts", "like", "love", "rating")
    users = inter.select("user_id").unique().sort("user_id")
    items = inter.select("item_id").unique().sort("item_id")  # no attributes in these files
    return inter, users, items


WOMENS_COLUMNS = {
    "Clothing ID": "item_id", "Age": "age", "Rating": "rating",
    "Recommended IND": "recommended_ind", "Positive Feedback Count": "feedback_count",
    "Division Name": "division", "Department Name": "department", "Class Name": "class_name",
}  # fmt: skip


def load_womens_ecommerce(root: Path) -> Tables:
    """Women's E-Commerce Clothing Reviews (23,486 reviews): tasks ``recommended``
    (Recommended IND), ``rating4`` (rating >= 4) and ``helpful`` (positive feedback count
    > 0); domain = the item's department (six; "unknown" for the 14 rows without one).
    There are no user ids: each review is its own user (a cold user, with the reviewer's
    age); item attributes are division and class. No time either: ``ts`` is a fixed
    random order (a random split)."""
    path = root / "womens_ecommerce_reviews.csv.gz"
    with gzip.open(_need(path), "rb") as fh:
        df = pl.read_csv(fh.read(), columns=list(WOMENS_COLUMNS), infer_schema_length=10_000)
    df = df.rename(WOMENS_COLUMNS).with_row_index("user_id")
    df = df.with_columns(
        pl.col("user_id").cast(pl.Int64),
        pl.col("item_id").cast(pl.Int64),
        pl.col("age").cast(pl.Float64),
        *[pl.col(c).fill_null("unknown") for c in ("division", "department", "class_name")],
    )
    inter = df.select(
        "user_id", "item_id", pl.col("department").alias("domain"), _shuffled_ts(df.height),
        pl.col("recommended_ind").cast(pl.Int8).alias("recommended"),
        (pl.col("rating") >= 4).cast(pl.Int8).alias("rating4"),
        (pl.col("feedback_count") > 0).cast(pl.Int8).alias("helpful"),
    )  # fmt: skip
    band = np.array(AGE_LABELS)[np.digitize(df["age"].fill_null(0).to_numpy(), AGE_EDGES)]
    users = df.select("user_id", "age").with_columns(pl.Series("age_band", band, dtype=pl.String))
    items = _first_per_key(df, "item_id", ["division", "class_name"])
    return inter, users, items


LOADERS: dict[str, Callable[[Path], Tables]] = {
    "douban": load_douban,
    "womens_ecommerce": load_womens_ecommerce,
    "movielens100k": load_movielens100k,
    "census_kdd": load_census_kdd,
    "ali_ccp": load_ali_ccp,
    "aliexpress": load_aliexpress,
    "kuairand": load_kuairand,
}


def materialize(kind: str, source: str | Path, raw_dir: str | Path) -> dict[str, int]:
    """Run loader ``kind`` on ``source`` and write the raw log to ``raw_dir``; returns row counts."""
    if kind not in LOADERS:
        raise RawLogError(f"unknown loader {kind!r}; known: {sorted(LOADERS)}")
    inter, users, items = LOADERS[kind](Path(source))
    out = Path(raw_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, df in (("interactions", inter), ("users", users), ("items", items)):
        df.write_parquet(out / f"{name}.parquet")
    return {"interactions": inter.height, "users": users.height, "items": items.height}
