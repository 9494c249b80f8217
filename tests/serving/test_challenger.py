"""A challenger on live traffic, through the real service (Ray Serve on loopback, a
temporary MLflow store): shadow mode answers exactly as the champion and logs the
challenger's scores of every request; canary mode sends a stable hash of users to the
challenger; feedback is joined to the logged scores and survives a restart; and
``promote --from-live`` moves the alias only on enough evidence that the challenger
is better."""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import polars as pl
import pytest
import requests

from recsys_moe import online_log
from recsys_moe.cluster import free_port
from recsys_moe.config import ScoringConfig
from recsys_moe.scorer import Scorer

pytestmark = [pytest.mark.ray, pytest.mark.slow]

NAME = "recsys_moe_live"
FEED_WEIGHTS = {"click": 1.0, "conversion": 2.0}
SEGMENTS = [
    {"name": "shadowed", "domains": ["feed"], "task_weights": FEED_WEIGHTS,
     "challenger_alias": "challenger", "challenger_mode": "shadow"},
    {"name": "canaried", "domains": ["search", "video"], "challenger_alias": "challenger",
     "challenger_mode": "canary", "canary_fraction": 0.5},
]  # fmt: skip


def _register(cfg, bundle, uri: str, alias: str) -> str:
    """Log ``bundle`` in a run of ``uri`` and register it under NAME at ``alias``."""
    import mlflow

    from features.store import read_examples
    from recsys_moe import registry, tracking

    old = mlflow.get_tracking_uri()
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        with tracking.Tracker.open(cfg, f"live-{alias}") as tr:
            tr.log_model(bundle, read_examples(cfg.features.store_dir, "test").head(5))
            version = registry.register(tr.model_info.model_uri, NAME, {"run_id": tr.run_id})
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
        mlflow.set_tracking_uri(old)
    mlflow.MlflowClient(uri).set_registered_model_alias(NAME, alias, version)
    return version


def _other_bundle(bundle, out):
    """A copy of ``bundle`` whose weights are moved a little: another model's scores."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(bundle, out)
    weights = load_file(out / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    moved = {k: v + 0.3 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
             for k, v in weights.items()}  # fmt: skip
    save_file(moved, out / "model.safetensors")
    return out


@pytest.fixture(scope="module")
def live(scoring_model, ray_session, tmp_path_factory):
    from ray import serve

    from serving.app import app_builder
    from serving.run import start

    cfg, bundle, uri, _ = scoring_model
    tmp = tmp_path_factory.mktemp("live")
    other = _other_bundle(bundle, tmp / "other")
    versions = {"champion": _register(cfg, bundle, uri, "champion"),
                "challenger": _register(cfg, other, uri, "challenger")}  # fmt: skip
    args = {"tracking_uri": uri, "model_name": NAME, "poll_s": 0.5,
            "online_log_dir": str(tmp / "online"), "online_metrics_s": 1.0,
            "online_log_flush_s": 2.0,
            "segments": SEGMENTS}  # fmt: skip
    port = free_port()
    raw = {"http_options": {"host": "127.0.0.1", "port": port},
           "applications": [{"name": "live", "route_prefix": "/", "args": args}]}  # fmt: skip
    url = start(raw, blocking_ready_s=240)

    def restart() -> None:
        serve.delete("live")
        serve.run(app_builder(args), name="live", route_prefix="/")
        deadline = time.monotonic() + 120
        while requests.get(f"{url}/readyz", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "never ready after the restart"
            time.sleep(0.5)

    yield url, cfg, bundle, other, versions, tmp / "online", restart
    serve.shutdown()


def _users_items(bundle):
    sc = Scorer.from_dir(bundle)
    users = sc.tables["users"]["user_id"].to_list()
    return users, sc.tables["items"]["item_id"].to_list()


def _scores(bundle, user, domain, items, blend=None):
    rows = pl.DataFrame({"user_id": [user] * len(items), "item_id": items,
                         "domain": [domain] * len(items), "ts": [1_700_000_000] * len(items)})  # fmt: skip
    return Scorer.from_dir(bundle).score_frame(rows, blend or ScoringConfig())


def _wait_rows(folder, request_ids: set[str], role: str, timeout: float = 60) -> pl.DataFrame:
    deadline = time.monotonic() + timeout
    while True:
        rows = online_log.read(folder, online_log.SCORES)
        if not rows.is_empty():
            rows = rows.filter(pl.col("role") == role)
            if request_ids <= set(rows["request_id"].to_list()):
                return rows
        assert time.monotonic() < deadline, f"no {role} rows for every request"
        time.sleep(0.3)


def test_shadow_answers_as_the_champion_and_logs_the_challenger(live):
    url, _cfg, bundle, other, versions, folder, _ = live
    users, items = _users_items(bundle)
    cands = items[:20]
    sent = {}
    for i, user in enumerate(users[:12]):
        rid = f"shadow-{i}"
        r = requests.post(f"{url}/rank", timeout=30, json={
            "user_id": user, "domain": "feed", "candidates": cands, "request_id": rid,
            "timestamp": 1_700_000_000})  # fmt: skip
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["variant"] == "champion" and body["model_version"] == versions["champion"]
        sent[rid] = (user, body)
    blend = ScoringConfig(task_weights=FEED_WEIGHTS)
    shadow = _wait_rows(folder, set(sent), "shadow")
    served = _wait_rows(folder, set(sent), "served")
    for rid, (user, body) in sent.items():
        champ = _scores(bundle, user, "feed", cands, blend)
        chal = _scores(other, user, "feed", cands, blend)
        got = {it["item_id"]: it["score"] for it in body["items"]}
        # the answer is the champion's, exactly as a service without a challenger gives it
        np.testing.assert_allclose([got[c] for c in cands], champ["score"], rtol=1e-5)
        returned = [it["score"] for it in body["items"]]
        assert returned == sorted(returned, reverse=True)
        assert np.abs(chal["score"].to_numpy() - champ["score"].to_numpy()).max() > 1e-3
        # the challenger scored the same request, logged under its version, never returned
        mine = shadow.filter(pl.col("request_id") == rid)
        assert mine["variant"].unique().to_list() == ["challenger"]
        assert mine["model_version"].unique().to_list() == [versions["challenger"]]
        logged = dict(zip(mine["item_id"].to_list(), mine["score"].to_list(), strict=True))
        np.testing.assert_allclose([logged[str(c)] for c in cands], chal["score"], rtol=1e-5)
        ours = served.filter(pl.col("request_id") == rid)
        assert ours["variant"].unique().to_list() == ["champion"] and ours.height == len(cands)
    ready = requests.get(f"{url}/readyz", timeout=10).json()
    status = ready["segments"]["shadowed"]["challenger"]
    assert status["mode"] == "shadow" and status["model_version"] == versions["challenger"]


def test_canary_sends_a_stable_fraction_of_users(live):
    from serving.app import in_canary

    url, _cfg, bundle, _other, versions, _folder, _ = live
    # over 10k users the configured fraction, within 2 points, the same user always alike
    ids = [f"user-{i}" for i in range(10_000)]
    for fraction in (0.05, 0.5):
        share = np.mean([in_canary(u, fraction) for u in ids])
        assert abs(share - fraction) <= 0.02, (fraction, share)
    assert [in_canary(u, 0.5) for u in ids[:100]] == [in_canary(u, 0.5) for u in ids[:100]]
    users, items = _users_items(bundle)
    seen: dict[object, str] = {}
    for user in [*users[:25], *users[:25]]:  # each user twice
        r = requests.post(f"{url}/rank", timeout=30, json={
            "user_id": user, "domain": "search", "candidates": items[:5]})  # fmt: skip
        assert r.status_code == 200, r.text
        variant = r.json()["variant"]
        assert variant == ("challenger" if in_canary(user, 0.5) else "champion")
        assert r.json()["model_version"] == versions[variant]
        assert seen.setdefault(user, variant) == variant
    assert set(seen.values()) == {"champion", "challenger"}


def test_feedback_joined_counted_and_kept_across_a_restart(live):
    url, _cfg, bundle, _other, _versions, folder, restart = live
    users, items = _users_items(bundle)
    events = []
    for i in range(10):
        rid = f"fb-{i}"
        r = requests.post(f"{url}/rank", timeout=30, json={
            "user_id": users[i], "domain": "feed", "candidates": items[:4], "request_id": rid})  # fmt: skip
        assert r.status_code == 200, r.text
        events.append({"request_id": rid, "item_id": items[i % 4], "labels": {"click": i % 2}})
    events += [{"request_id": f"nobody-{i}", "item_id": items[0], "labels": {"click": 1}}
               for i in range(3)]  # fmt: skip
    r = requests.post(f"{url}/feedback", json={"events": events}, timeout=30)
    assert r.status_code == 200 and r.json() == {"accepted": 13}, r.text
    for bad, says in (({"click": 2}, "must be in [0, 1]"), ({"dwell": 1}, "unknown task")):
        r = requests.post(f"{url}/feedback", timeout=30, json={"events": [
            {"request_id": "fb-0", "item_id": items[0], "labels": bad}]})  # fmt: skip
        assert r.status_code == 422 and says in r.json()["error"], r.text
    _wait_rows(folder, {f"fb-{i}" for i in range(10)}, "shadow")

    def counts():
        return requests.get(f"{url}/online", timeout=60).json()["counts"]

    before = counts()
    assert before == {"feedback": 13, "joined": 10, "unmatched": 3}
    metrics = requests.get(f"{url}/online", timeout=60).json()["metrics"]
    assert {(m["variant"], m["role"]) for m in metrics if m["segment"] == "shadowed"} >= {
        ("champion", "served"), ("challenger", "shadow")}  # fmt: skip
    # and in Prometheus: the challenger's requests, online AUC per variant, the counts
    lines = _prometheus(("recsys_moe_challenger_requests", "recsys_moe_online_auc{",
                         'status="unmatched"'))  # fmt: skip
    assert any("recsys_moe_challenger_requests" in x and 'mode="shadow"' in x for x in lines)
    assert any("recsys_moe_online_auc{" in x and 'variant="challenger"' in x
               and 'role="shadow"' in x for x in lines)  # fmt: skip
    unmatched = [x for x in lines if "recsys_moe_feedback_events{" in x and "unmatched" in x]
    assert unmatched and float(unmatched[0].split()[-1]) == 3
    restart()
    assert counts() == before  # nothing lost: the log is on disk


def _prometheus(want: tuple[str, ...], timeout: float = 90) -> list[str]:
    """Ray's Prometheus endpoint once every string of ``want`` is on it: its sample lines."""
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    deadline, text = time.monotonic() + timeout, ""
    while not all(w in text for w in want):
        assert time.monotonic() < deadline, f"not all of {want} on /metrics"
        time.sleep(1)
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return [x for x in text.splitlines() if not x.startswith("#")]


def _stream(folder, n_requests: int, challenger_noise: float, seed: int) -> None:
    """A simulated shadow stream: labels from a latent score; the champion sees it through
    noise 1.0, the challenger through ``challenger_noise``; feedback for every item."""
    log = online_log.OnlineLog(folder, "sim")
    rng = np.random.default_rng(seed)
    feedback = []
    for r in range(n_requests):
        z = rng.normal(size=4)
        y = (rng.random(4) < 1 / (1 + np.exp(-2 * z))).astype(float)
        items = [f"i{r}-{j}" for j in range(4)]
        for variant, role, noise, version in (
            ("champion", "served", 1.0, "1"),
            ("challenger", "shadow", challenger_noise, "2"),
        ):
            p = 1 / (1 + np.exp(-(z + noise * rng.normal(size=4))))
            log.scores({"request_id": f"r{r}", "segment": "s", "variant": variant, "role": role,
                        "model_version": version, "user_id": "u", "domain": "feed", "ts": 0.0,
                        "item_id": items, "score": p.tolist(), "p_click": p.tolist()})  # fmt: skip
        feedback += [{"request_id": f"r{r}", "item_id": items[j], "received_at": 0.0,
                      "label_click": y[j]} for j in range(4)]  # fmt: skip
    log.feedback(feedback)
    log.close()


@pytest.fixture
def process_store(scoring_model, monkeypatch):
    """The scoring model's MLflow store as the process-wide one for a test (a version's
    source, ``models:/m-...``, resolves against it), restored after."""
    import mlflow

    uri = scoring_model[2]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    old = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(old)


def test_promote_from_live_moves_the_alias_only_on_enough_evidence(process_store, tmp_path):
    import mlflow

    from serving.live import decide_from_live, main_report, promote_from_live
    from serving.settings import ServeSettings

    uri = process_store
    client = mlflow.MlflowClient(uri)
    v1 = client.get_model_version("recsys_moe_default", "1")
    name = "recsys_moe_promo"
    client.create_registered_model(name)
    for _ in range(2):
        client.create_model_version(name, v1.source, run_id=v1.run_id)

    def settings(folder):
        return ServeSettings.from_dict({
            "tracking_uri": uri, "model_name": name, "online_log_dir": str(folder),
            "segments": [{"name": "s", "domains": ["feed"], "challenger_alias": "challenger"}],
        })  # fmt: skip

    def aliases(champion: str) -> None:
        client.set_registered_model_alias(name, "champion", champion)
        client.set_registered_model_alias(name, "challenger", "2")

    # worse, and too little: refused, the alias stays
    _stream(tmp_path / "worse", 600, challenger_noise=2.0, seed=1)
    _stream(tmp_path / "few", 40, challenger_noise=0.3, seed=2)
    _stream(tmp_path / "better", 600, challenger_noise=0.3, seed=3)
    aliases("1")
    worse = promote_from_live(settings(tmp_path / "worse"), min_events=1000)
    assert not worse["decision"].promoted and "not promoted from live" in worse["decision"].reason
    assert worse["bootstrap"]["diff"] < 0
    few = decide_from_live(settings(tmp_path / "few"), min_events=1000)
    assert not few["decision"].promoted and "at least 1,000 needed" in few["decision"].reason
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    # better, on enough events: promoted, with the evidence on the version
    better = promote_from_live(settings(tmp_path / "better"), min_events=1000)
    assert better["decision"].promoted and better["bootstrap"]["low"] > 0, better
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"
    assert "from live traffic" in client.get_model_version(name, "2").tags["promotion"]
    # the report command over the same log: a table and an MLflow run
    cfg = tmp_path / "serve.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump({"applications": [{"name": "x", "args": {
        "tracking_uri": uri, "model_name": name, "online_log_dir": str(tmp_path / "better"),
        "segments": [{"name": "s", "domains": ["feed"]}]}}]}))  # fmt: skip
    assert main_report(["--serve-config", str(cfg)]) == 0
    runs = client.search_runs([client.get_run(v1.run_id).info.experiment_id],
                              "tags.`online.report` = 'true'")  # fmt: skip
    assert runs and runs[0].data.metrics["online/feedback_joined"] == 2400
