"""The model watcher of a serving replica against a real MLflow registry whose store
becomes unreachable (issue 28, item 5): the current version keeps serving, ``status()``
(what ``/readyz`` reports) says why the registry cannot be read, and the error clears once
it can again."""

from __future__ import annotations

import shutil

import pytest

from serving.lifecycle import ModelWatcher
from tests.conftest import register_bundle

pytestmark = pytest.mark.ray


def test_registry_unreachable_during_a_poll_keeps_the_version_and_says_so(scoring_model, tmp_path):
    cfg, bundle, _, _ = scoring_model
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    assert register_bundle(cfg, bundle, uri, 0.6, "first")["promoted"]
    loads = []
    w = ModelWatcher(f"models:/{cfg.model_name}@champion", uri,
                     loader=lambda b, v: loads.append(v) or v, poll_s=3600)  # fmt: skip
    try:
        assert w.status()["ready"] and w.current.version == "1" and loads == ["1"]
        shutil.copy(db, tmp_path / "saved.db")
        db.write_bytes(b"not a database" * 100)  # the store answers garbage
        w.check_now()
        st = w.status()
        assert st["ready"] and st["model_version"] == "1" and w.current.payload == "1"
        assert st["load_error"].startswith(f"cannot read models:/{cfg.model_name}@champion")
        shutil.copy(tmp_path / "saved.db", db)  # reachable again
        w.check_now()
        assert w.status()["load_error"] is None and loads == ["1"]  # no reload
    finally:
        w.stop()
