"""Jobs killed while they write (issue 28): the folder they publish appears whole or not at
all, the previous one stays usable and untouched, a rerun produces what an uninterrupted
run does, and two writers into one folder take turns."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import polars as pl
import pytest

from pipelines.publish import published, recover
from tests.test_cli import ENV, shrunk_toml, small_toml

# a writer that stops in the middle of writing its folder until it is killed
_HALF_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from pipelines.publish import published
    with published(sys.argv[1], "test") as out:
        (out / "part-0").write_text("half")
        print("writing", flush=True)
        time.sleep(float(sys.argv[2]))
        (out / "part-1").write_text("the rest")
    """
)


def _half_writer(final: Path, hold_s: float) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", _HALF_WRITER, str(final), str(hold_s)],
                         env=ENV, stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert p.stdout.readline().strip() == "writing"
    return p


def _tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` by relative path -> content hash."""
    return {
        str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(folder.rglob("*"))
        if f.is_file()
    }


def test_published_folder_replaces_the_old_only_when_complete(tmp_path, capsys):
    final = tmp_path / "out"
    with published(final, "test") as out:
        (out / "a").write_text("1")
        assert not final.exists()
    assert _tree(final) == _tree(final) and (final / "a").read_text() == "1"
    with pytest.raises(RuntimeError), published(final, "test") as out:
        (out / "a").write_text("2")
        raise RuntimeError("the job failed")
    assert (final / "a").read_text() == "1"  # untouched, and no staging left
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "out"]


def test_a_killed_writer_leaves_the_old_folder_and_the_next_run_cleans_up(tmp_path, capsys):
    final = tmp_path / "out"
    with published(final, "test") as out:
        (out / "a").write_text("old")
    before = _tree(final)
    p = _half_writer(final, 60)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    assert _tree(final) == before
    assert len(list(tmp_path.glob(".out.staging-*"))) == 1  # what the killed run wrote
    with published(final, "test") as out:  # the lock died with its holder: no wait
        (out / "a").write_text("new")
    assert "left by a run that did not finish" in capsys.readouterr().out
    assert (final / "a").read_text() == "new" and not list(tmp_path.glob(".out.staging-*"))


def test_a_publish_killed_between_its_renames_is_put_back(tmp_path):
    final = tmp_path / "out"
    with published(final, "test") as out:
        (out / "a").write_text("old")
    final.rename(tmp_path / ".out.old-12345")  # the state after step 1 of the swap
    assert recover(final) and (final / "a").read_text() == "old"
    assert not recover(final)


def test_a_second_writer_waits_for_the_first_and_says_for_whom(tmp_path, capsys):
    final = tmp_path / "out"
    p = _half_writer(final, 3)
    t0 = time.monotonic()
    with published(final, "test") as out:
        waited = time.monotonic() - t0
        # the first writer published whole before this one began
        assert sorted(f.name for f in final.iterdir()) == ["part-0", "part-1"]
        (out / "mine").write_text("second")
    assert p.wait(timeout=30) == 0 and waited > 1
    assert f"is being written by pid {p.pid}; waiting" in capsys.readouterr().err
    assert sorted(f.name for f in final.iterdir()) == ["mine"]


# ------------------------------------------------ the real jobs, killed by SIGKILL


def _start(args: list[str], cwd: Path, env: dict) -> subprocess.Popen:
    # a session of its own: the kill takes the job's whole process group (its local Ray
    # included), as a scheduler or a closed terminal does
    log = cwd / f"killed-{time.monotonic_ns()}.log"
    with open(log, "w") as fh:
        p = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, env=env,
                             stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    p.log = log  # type: ignore[attr-defined]
    return p


def _kill_when(p: subprocess.Popen, ready, delay_s: float, timeout_s: float = 240) -> bool:
    """SIGKILL ``p``'s process group ``delay_s`` after ``ready()`` holds; False if the job
    finished first."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if p.poll() is not None:
            assert p.returncode == 0, p.log.read_text()[-3000:]
            return False
        assert time.monotonic() < deadline, "the job never reached the kill point"
        time.sleep(0.05)
    time.sleep(delay_s)
    if p.poll() is not None:
        return False
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=60)
    return True


def _run(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _store_content(store: Path) -> dict:
    """What a store holds, independent of file names and timings: the examples (sorted),
    vocabularies, tables and the manifest without its timings and creation time."""
    m = json.loads((store / "manifest.json").read_text())
    for k in ("created_at", "timings_s"):
        m.pop(k)
    ex = pl.read_parquet(store / "examples" / "**" / "*.parquet", hive_partitioning=True)
    frames = {"examples": ex.sort(ex.columns)}
    for sub in ("vocab", "tables"):
        for f in sorted((store / sub).glob("*.parquet")):
            frames[f"{sub}/{f.name}"] = pl.read_parquet(f)
    return {"manifest": m, **{k: v.hash_rows().sum() for k, v in frames.items()},
            "rows": {k: v.height for k, v in frames.items()}}  # fmt: skip


@pytest.fixture(scope="module")
def job_folder(tmp_path_factory):
    """A folder with a small config (3 epochs), its raw log and its feature store, built
    by the commands; the features and train tests below run in it."""
    d = tmp_path_factory.mktemp("killed")
    cfg = shrunk_toml(d, "default", "small", n_rows="6000", n_users="300",
                      n_items="100", epochs="3", batch_size="512")  # fmt: skip
    env = {**ENV, "MLFLOW_TRACKING_URI": f"sqlite:///{d}/mlflow.db"}
    _run(["generate", "--config", str(cfg), "--no-progress"], d, env)
    _run(["features", "--config", str(cfg), "--no-progress"], d, env)
    return d, cfg, env


@pytest.mark.slow
def test_features_killed_anywhere_keeps_the_old_store_and_a_rerun_equals_a_clean_run(job_folder):
    tmp_path, cfg, env = job_folder
    store = tmp_path / "store"
    files, content = _tree(store), _store_content(store)
    staging = lambda: any(tmp_path.glob(".store.staging-*"))  # noqa: E731
    examples = lambda: any(tmp_path.glob(".store.staging-*/examples/*"))  # noqa: E731
    # killed while Ray runs the stages, and while the examples are written
    killed = []
    for ready, delay in ((staging, 2.0), (examples, 0.0)):
        p = _start(["features", "--config", str(cfg), "--no-progress"], tmp_path, env)
        killed.append(_kill_when(p, ready, delay))
        assert _tree(store) == files  # the previous store, untouched and whole
    assert any(killed), "every run finished before its kill point"
    r = _run(["features", "--config", str(cfg), "--no-progress"], tmp_path, env)
    assert "left by a run that did not finish" in r.stdout
    assert _store_content(store) == content
    assert not list(tmp_path.glob(".store.staging-*"))
    # SIGTERM (a scheduler's stop) unwinds: its staging folder goes with it, exit code 130
    files = _tree(store)
    p = _start(["features", "--config", str(cfg), "--no-progress"], tmp_path, env)
    deadline = time.monotonic() + 120
    while not examples() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if p.poll() is None:  # Ray is up and writing (while ray.init runs, Ray's exit(15) rules)
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=120) == 130, p.log.read_text()[-3000:]
        assert "stopped before it finished; rerun the same command" in p.log.read_text()
        assert not staging() and _tree(store) == files
    with contextlib.suppress(ProcessLookupError):  # whatever of its local Ray outlived it
        os.killpg(p.pid, signal.SIGKILL)
    # two runs into the one store at once: they take turns, the second says it waits
    a, b = (_start(["features", "--config", str(cfg), "--no-progress"], tmp_path, env)
            for _ in range(2))  # fmt: skip
    assert a.wait(timeout=300) == 0 and b.wait(timeout=300) == 0
    logs = a.log.read_text() + b.log.read_text()
    assert "/store is being written by pid" in logs and "waiting for it to finish" in logs
    assert _store_content(store) == content and not staging()


@pytest.mark.slow
def test_score_killed_mid_run_and_rerun_scores_every_row_once(scoring_model, tmp_path):
    from pipelines.candidates import write_candidates

    cfg, bundle, _, _ = scoring_model
    cands = write_candidates(cfg.features.store_dir, tmp_path / "cands", 200_000,
                             null_fraction=0.01, part_rows=25_000)  # fmt: skip
    env = {**ENV, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    out = tmp_path / "scored"
    args = ["score", "--config", str(small_toml(tmp_path)), "--model", str(bundle),
            "--input", str(cands), "--output", str(out), "--no-progress"]  # fmt: skip
    staging = lambda: any(tmp_path.glob(".scored.staging-*"))  # noqa: E731
    rows = lambda: any(tmp_path.glob(".scored.staging-*/scores/*"))  # noqa: E731
    # killed while the scored rows are being written (or, where it outran that, while
    # Ray starts)
    assert _kill_when(_start(args, tmp_path, env), rows, 0.0) or _kill_when(
        _start(args, tmp_path, env), staging, 1.0
    ), "scoring finished before its kill points"
    assert staging() and not out.exists()  # a killed run publishes nothing
    r = _run(args, tmp_path, env)
    assert "left by a run that did not finish" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    inp = pl.read_parquet(cands)
    keys = ["user_id", "item_id", "domain", "ts"]
    scored = pl.read_parquet(out / "scores").select(keys)
    rejected = pl.read_parquet(out / "rejects").select(keys)
    assert summary["rows_in"] == inp.height == scored.height + rejected.height
    # every input row exactly once: scored or rejected, none twice, none missing
    both = pl.concat([scored, rejected]).sort(keys, nulls_last=True)
    assert both.equals(inp.select(keys).sort(keys, nulls_last=True))


@pytest.mark.slow
def test_train_killed_resumes_beside_a_second_run_and_leaves_no_run_running(job_folder):
    import mlflow

    tmp_path, cfg, env = job_folder
    uri = env["MLFLOW_TRACKING_URI"]
    # killed (the driver's whole process group) once its first epoch's checkpoint is down
    # and Ray Train has recorded it (its snapshot: a checkpoint folder alone may be one it
    # never registered, and a rerun rightly starts from scratch)
    ckpt = lambda: any(tmp_path.glob("checkpoints/*/checkpoint_manager_snapshot.json"))  # noqa: E731
    p = _start(["train", "--config", str(cfg), "--no-progress"], tmp_path, env)
    assert _kill_when(p, ckpt, 0.0), "training finished before its kill point"
    client = mlflow.MlflowClient(uri)
    (killed,) = client.search_runs(
        [client.get_experiment_by_name("recsys-moe-small").experiment_id]
    )
    assert killed.info.status == "RUNNING"  # SIGKILL: nothing could end it
    assert client.search_model_versions("name = 'recsys_moe_small'") == []
    (run_name,) = [d.name for d in (tmp_path / "checkpoints").iterdir()]
    # the resume and a second, fresh run at once: one SQLite store, one output folder
    # -v: every library line on the pipes, where a locked database would show
    train = ["train", "--config", str(cfg), "--no-progress", "-v"]
    other = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *train], cwd=tmp_path,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)  # fmt: skip
    r = _run([*train, "--resume", run_name], tmp_path, env)
    out, _ = other.communicate(timeout=900)
    assert other.returncode == 0, out[-3000:]
    assert "database is locked" not in r.stderr + out
    assert "[train] resumed after epoch" in r.stdout, r.stdout[-3000:]
    # the killed run was closed by whichever run started first
    assert f"MLflow run {killed.info.run_id} was left running by a killed driver" in r.stdout + out
    runs = {x.info.run_id: x for x in client.search_runs([killed.info.experiment_id])}
    assert runs[killed.info.run_id].info.status == "KILLED"
    assert "train.aborted" in runs[killed.info.run_id].data.tags
    assert sorted(x.info.status for x in runs.values()) == ["FINISHED", "FINISHED", "KILLED"]
    versions = client.search_model_versions("name = 'recsys_moe_small'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert all(v.status == "READY" and runs[v.run_id].info.status == "FINISHED" for v in versions)
    # the output folder holds one run's bundle whole, not a mix of the two
    bundle = tmp_path / "models" / "small"
    model_json = json.loads((bundle / "model.json").read_text())
    assert json.loads((bundle / "metrics.json").read_text())["run_name"] == model_json["run_name"]
