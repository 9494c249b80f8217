"""The online log's scores files: one row per candidate, whatever form an answer's
columns came in (numpy arrays from the service, lists, integer ids) and whichever tasks
its model had."""

from __future__ import annotations

import time

import numpy as np
import polars as pl

from recsys_moe import online_log


def test_scores_written_one_row_per_candidate(tmp_path):
    log = online_log.OnlineLog(tmp_path, "t", flush_s=1000)
    base = {"segment": "s", "variant": "champion", "role": "served", "model_version": "1",
            "user_id": "u", "domain": "feed", "ts": 1.5}  # fmt: skip
    log.scores({**base, "request_id": "a", "item_id": [7, 8],
                "score": np.array([0.2, 0.1]), "p_click": np.array([0.3, 0.4])})  # fmt: skip
    log.scores({**base, "request_id": "b", "item_id": ["x"], "score": [0.5], "p_click": [0.6]})
    log.scores({**base, "request_id": "c", "item_id": ["y", "z"], "score": [0.7, 0.8],
                "p_like": [0.9, 1.0]})  # fmt: skip
    log.close()
    df = online_log.read(tmp_path, online_log.SCORES).sort("request_id", "item_id")
    assert df["item_id"].to_list() == ["7", "8", "x", "y", "z"]
    assert df["request_id"].to_list() == ["a", "a", "b", "c", "c"]
    assert df["score"].to_list() == [0.2, 0.1, 0.5, 0.7, 0.8]
    assert df["p_click"].to_list() == [0.3, 0.4, 0.6, None, None]
    assert df["p_like"].to_list() == [None, None, None, 0.9, 1.0]
    assert df.schema["ts"] == pl.Float64 and df["ts"].to_list() == [1.5] * 5
    assert df["domain"].to_list() == ["feed"] * 5


def test_the_folder_stays_bounded(tmp_path):
    log = online_log.OnlineLog(tmp_path, "t", max_files=3, flush_s=1000)
    for i in range(2 * online_log.PRUNE_EVERY + 1):
        log.scores({"request_id": str(i), "item_id": ["a"], "score": [0.5]})
        log.flush()
        held = len(list(tmp_path.glob("scores-*.parquet")))
        assert held <= 3 + online_log.PRUNE_EVERY, held
    log.close()
    kept = sorted(online_log.read(tmp_path, online_log.SCORES)["request_id"].cast(int))
    assert kept == [2 * online_log.PRUNE_EVERY - 2, 2 * online_log.PRUNE_EVERY - 1,
                    2 * online_log.PRUNE_EVERY]  # the newest three  # fmt: skip


def test_a_full_buffer_is_written_by_the_writer_thread(tmp_path):
    log = online_log.OnlineLog(tmp_path, "t", flush_rows=3, flush_s=1000)
    log.scores({"request_id": "a", "item_id": ["x", "y", "z"], "score": [0.1, 0.2, 0.3]})
    deadline = time.monotonic() + 10
    while not list(tmp_path.glob("scores-*.parquet")):  # no flush() or close() called
        assert time.monotonic() < deadline, "the writer thread never wrote the full buffer"
        time.sleep(0.05)
    assert online_log.read(tmp_path, online_log.SCORES).height == 3
    log.close()
