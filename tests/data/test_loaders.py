"""Loaders of public datasets (read from ../shared/data; skipped when it is absent)."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from recsys_moe.config import load_config
from recsys_moe.data.loaders import LOADERS, materialize
from recsys_moe.data.schema import RawLogError, validate_raw_log
from tests.conftest import REPO, need_shared

pytestmark = pytest.mark.data


def load(name: str, tmp_path: Path):
    """Materialise dataset ``name`` (its shipped config, paths redirected to ``tmp_path``)."""
    base = load_config(REPO / "configs" / f"{name}.toml")
    rel = Path(base.source.path).relative_to("../shared/data")
    src = need_shared(*rel.parts)
    cfg = load_config(
        REPO / "configs" / f"{name}.toml",
        {"source.path": str(src), "data.raw_dir": str(tmp_path / "raw"), "features.store_dir": str(tmp_path / "store")},
    )
    rows = materialize(cfg.source.kind, cfg.source.path, cfg.data.raw_dir)
    _, report = validate_raw_log(cfg.data)
    inter = pl.read_parquet(Path(cfg.data.raw_dir) / "interactions.parquet")
    return cfg, rows, report, inter


def test_movielens(tmp_path):
    cfg, rows, report, inter = load("movielens", tmp_path)
    assert rows == {"interactions": 100_000, "users": 943, "items": 1_682}
    assert inter["like"].mean() == pytest.approx(0.554, abs=1e-3)  # SOURCE.md: rating >= 4 is 55.4 %
    assert inter["love"].mean() == pytest.approx(0.212, abs=1e-3)
    assert ((inter["love"] == 1) <= (inter["like"] == 1)).all()
    assert set(inter["domain"].unique()) == {"action", "light", "drama"}
    items = pl.read_parquet(Path(cfg.data.raw_dir) / "items.parquet")
    assert items.schema["genres"] == pl.List(pl.String)
    assert report.unknown_users == 0 and report.rejected == {}


def test_census(tmp_path):
    cfg, rows, report, inter = load("census", tmp_path)
    assert rows["interactions"] == 99_762
    assert inter["income_50k"].sum() == 6_186  # SOURCE.md statistics
    assert inter["never_married"].sum() == 43_143
    assert inter["domain"].n_unique() == 4
    users = pl.read_parquet(Path(cfg.data.raw_dir) / "users.parquet")
    assert "instance_weight" not in users.columns and "marital_stat" not in users.columns


def test_douban(tmp_path):
    cfg, rows, report, inter = load("douban", tmp_path)
    # SOURCE.md counts: 96,041 book + 69,709 music ratings, 2,216 users, per-file item ids
    assert rows == {"interactions": 96_041 + 69_709, "users": 2_216, "items": 6_777 + 5_567}
    assert inter.group_by("domain").len().sort("domain")["len"].to_list() == [96_041, 69_709]
    assert inter["item_id"].str.starts_with("book:").sum() == 96_041  # string ids, no clash
    assert inter["like"].sum() == 38_975 + 30_236 + 24_805 + 27_180  # rating >= 4
    assert inter["love"].sum() == 30_236 + 27_180
    assert ((inter["love"] == 1) <= (inter["like"] == 1)).all()
    assert inter["ts"].sort().to_list() == list(range(inter.height))  # a fixed random order
    assert not inter["ts"].head(100).is_sorted()
    assert report.unknown_users == 0 and report.rejected == {}


def test_womens_ecommerce(tmp_path):
    cfg, rows, report, inter = load("womens_ecommerce", tmp_path)
    assert rows == {"interactions": 23_486, "users": 23_486, "items": 1_206}
    assert inter["recommended"].sum() == 19_314  # SOURCE.md statistics
    assert inter["rating4"].sum() == 5_077 + 13_131
    assert inter["helpful"].sum() == 12_310
    counts = dict(inter.group_by("domain").len().iter_rows())
    assert counts["Tops"] == 10_468 and counts["Trend"] == 119 and counts["unknown"] == 14
    assert report.rejected == {}


@pytest.mark.parametrize(
    ("name", "n", "tasks"),
    [("ali_ccp", 200, ("click", "purchase")), ("aliexpress", 120, ("click", "conversion")), ("kuairand", 200, ("is_click", "long_view"))],
)
def test_fixture_samples(tmp_path, name, n, tasks):
    cfg, rows, report, inter = load(name, tmp_path)
    assert rows["interactions"] == n
    for t in tasks:
        assert set(inter[t].unique().to_list()) <= {0, 1}
    parent, child = tasks
    assert ((inter[child] == 1) <= (inter[parent] == 1)).all()  # funnel children imply the parent


def test_ali_ccp_domains(tmp_path):
    _, _, _, inter = load("ali_ccp", tmp_path)
    # SOURCE.md: scenario 301 counts over train / val / test
    assert inter.group_by("301").len().sort("301")["len"].to_list() == [69 + 38 + 39, 19 + 7 + 6, 12 + 5 + 5]


def test_missing_dataset_folder_is_a_clear_error(tmp_path):
    for kind in LOADERS:
        with pytest.raises(RawLogError, match="dataset file not found"):
            materialize(kind, tmp_path / "nothing", tmp_path / "raw")


@pytest.mark.ray
@pytest.mark.parametrize("name", ["movielens", "census", "douban", "womens_ecommerce"])
def test_feature_store_from_real_data(tmp_path, name, ray_session):
    from pipelines.build_features import build_features

    cfg, rows, _, _ = load(name, tmp_path)
    manifest = build_features(cfg, progress=False)
    assert sum(manifest["splits"]["rows"].values()) == rows["interactions"]
    assert (Path(cfg.features.store_dir) / "manifest.json").is_file()
    if name == "movielens":
        assert any(f["name"] == "genres" and f["multi_valued"] for f in manifest["features"]["categorical"])
