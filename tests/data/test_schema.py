"""Every way a raw log can break the contract gives a clear error (or a counted reject)."""

from __future__ import annotations

import polars as pl
import pytest

from recsys_moe.config import config_from_dict
from recsys_moe.data.schema import RawLogError, validate_raw_log

DATA = {
    "user_categorical": ["age"],
    "item_categorical": ["cat"],
    "context_categorical": ["device"],
    "tasks": [{"name": "click"}, {"name": "buy", "funnel_parent": "click"}],
}


def make_log(tmp_path, inter=None, users=None, items=None, fmt="parquet", **data):
    inter = inter if inter is not None else pl.DataFrame(
        {
            "user_id": [1, 1, 2, 3],
            "item_id": [10, 11, 10, 12],
            "domain": ["a", "b", "a", "a"],
            "ts": [100, 200, 300, 400],
            "device": ["ios", "web", "ios", "ios"],
            "click": [1, 0, 1, 0],
            "buy": [1, 0, 0, 0],
        }
    )
    users = users if users is not None else pl.DataFrame({"user_id": [1, 2, 3], "age": ["x", "y", "z"]})
    items = items if items is not None else pl.DataFrame({"item_id": [10, 11, 12], "cat": ["p", "q", "p"]})
    raw = tmp_path / "raw"
    raw.mkdir(exist_ok=True)
    for name, df in (("interactions", inter), ("users", users), ("items", items)):
        if fmt == "csv":
            df.write_csv(raw / f"{name}.csv")
        else:
            df.write_parquet(raw / f"{name}.parquet")
    cfg = config_from_dict({"data": {**DATA, "raw_dir": str(raw), **data}})
    return cfg.data, raw


def test_valid_log_passes(tmp_path):
    d, _ = make_log(tmp_path)
    tables, report = validate_raw_log(d)
    assert report.rows == {"interactions": 4, "users": 3, "items": 3}
    assert report.rejected == {} and report.unknown_users == 0 and report.unknown_items == 0


def test_csv_log_passes(tmp_path):
    d, _ = make_log(tmp_path, fmt="csv")
    tables, report = validate_raw_log(d)
    assert tables["interactions"].format == "csv" and report.rows["interactions"] == 4


def test_missing_file(tmp_path):
    d, raw = make_log(tmp_path)
    (raw / "items.parquet").unlink()
    with pytest.raises(RawLogError, match=r"missing table 'items' \(expected one of items.parquet"):
        validate_raw_log(d)


def test_missing_raw_dir(tmp_path):
    d = config_from_dict({"data": {**DATA, "raw_dir": str(tmp_path / "nope")}}).data
    with pytest.raises(RawLogError, match="does not exist"):
        validate_raw_log(d)


def test_missing_column_names_file_and_column(tmp_path):
    d, raw = make_log(tmp_path)
    pl.read_parquet(raw / "interactions.parquet").drop("device").write_parquet(raw / "interactions.parquet")
    with pytest.raises(RawLogError) as e:
        validate_raw_log(d)
    assert "interactions.parquet" in str(e.value) and "['device']" in str(e.value)


def test_wrong_label_dtype(tmp_path):
    inter = make_log(tmp_path)[1]
    df = pl.read_parquet(inter / "interactions.parquet").with_columns(pl.col("click").cast(pl.String))
    df.write_parquet(inter / "interactions.parquet")
    d = config_from_dict({"data": {**DATA, "raw_dir": str(inter)}}).data
    with pytest.raises(RawLogError, match=r"column 'click' \(a label\) must be numeric, found dtype String"):
        validate_raw_log(d)


def test_wrong_timestamp_dtype(tmp_path):
    d, raw = make_log(tmp_path)
    df = pl.read_parquet(raw / "interactions.parquet").with_columns(pl.col("ts").cast(pl.String))
    df.write_parquet(raw / "interactions.parquet")
    with pytest.raises(RawLogError, match="timestamp column 'ts' must be epoch seconds or a datetime"):
        validate_raw_log(d)


def _bad_inter():
    return pl.DataFrame(
        {
            "user_id": [1, None, 2, 3, 3],
            "item_id": [10, 11, 10, 12, 12],
            "domain": ["a", "b", "a", None, "a"],
            "ts": [100, 200, None, 400, 500],
            "device": ["ios"] * 5,
            "click": [1, 0, 1, 0, 2],
            "buy": [1, 0, 0, 0, 0],
        }
    )


def test_bad_rows_error_names_counts(tmp_path):
    d, _ = make_log(tmp_path, inter=_bad_inter())
    with pytest.raises(RawLogError) as e:
        validate_raw_log(d)
    msg = str(e.value)
    assert "1 row(s) with null user_id" in msg
    assert "1 row(s) with null ts" in msg
    assert "1 row(s) with null domain" in msg
    assert "1 row(s) with label click outside {0,1}" in msg
    assert 'on_bad_rows = "reject"' in msg


def test_bad_rows_reject_policy_counts(tmp_path):
    d, _ = make_log(tmp_path, inter=_bad_inter(), on_bad_rows="reject")
    _, report = validate_raw_log(d)
    assert report.rejected == {
        "label click outside {0,1}": 1,
        "null domain": 1,
        "null ts": 1,
        "null user_id": 1,
    }
    assert report.rows["interactions"] == 5 and report.rejected_total == 4


def test_duplicate_ids(tmp_path):
    users = pl.DataFrame({"user_id": [1, 2, 2, 3, 3], "age": ["x", "y", "y2", "z", "z"]})
    d, _ = make_log(tmp_path, users=users)
    with pytest.raises(RawLogError, match=r"2 duplicate 'user_id' row\(s\) in table 'users'"):
        validate_raw_log(d)


def test_null_ids_in_attribute_table(tmp_path):
    items = pl.DataFrame({"item_id": [10, 11, None], "cat": ["p", "q", "p"]})
    d, _ = make_log(tmp_path, items=items)
    with pytest.raises(RawLogError, match=r"1 row\(s\) with a null 'item_id' in table 'items'"):
        validate_raw_log(d)


def test_unknown_users_and_items_are_counted_and_kept(tmp_path):
    users = pl.DataFrame({"user_id": [1, 2], "age": ["x", "y"]})
    items = pl.DataFrame({"item_id": [10], "cat": ["p"]})
    d, _ = make_log(tmp_path, users=users, items=items)
    _, report = validate_raw_log(d)
    assert report.unknown_users == 1 and report.unknown_items == 2
    assert report.rejected == {}
    assert any("absent from users (kept" in line for line in report.lines())


def test_empty_log(tmp_path):
    d, _ = make_log(tmp_path, inter=_bad_inter().clear())
    with pytest.raises(RawLogError, match="the interaction log is empty"):
        validate_raw_log(d)


def test_id_dtype_mismatch(tmp_path):
    users = pl.DataFrame({"user_id": ["1", "2", "3"], "age": ["x", "y", "z"]})
    d, _ = make_log(tmp_path, users=users)
    with pytest.raises(RawLogError, match="ids must have the same type"):
        validate_raw_log(d)
