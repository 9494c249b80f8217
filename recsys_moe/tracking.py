"""MLflow tracking and registry: what every training run records, and promotion.

Embedded default: a SQLite backend at ``mlruns/mlflow.db`` and artifacts under
``mlruns/artifacts`` (relative to the working directory, i.e. the repository for ``make``);
``MLFLOW_TRACKING_URI`` points anywhere else (a server, another database). One experiment
per config name (``recsys-moe-<name>``).

A run holds: the full config as params, the data fingerprint and the manifest, per-epoch
train/valid loss and per task x domain metrics (logged by rank 0 while training), router
metrics, throughput, the sharding plan, plots (expert utilisation heatmaps, per-domain AUC
bars, calibration curves) and the model as an MLflow pyfunc that scores a table of raw
request rows (``user_id, item_id, domain[, ts, context]``) using the manifest,
vocabularies and lookup tables packed with it, logged from code
(``recsys_moe/mlflow_model.py``: no pickle). Registration and promotion:
:mod:`recsys_moe.registry`.
"""

from __future__ import annotations

import importlib.metadata as md
import math
import os
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recsys_moe.config import Config

PACKAGES = ("recsys_moe", "features")
REPO = Path(__file__).resolve().parent.parent
MODEL_CODE = Path(__file__).resolve().parent / "mlflow_model.py"
MAX_PARAM = 500  # MLflow's limit on a param value's length


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = Path("mlruns").resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite store's database file
    (MLflow's own default, ``./mlruns`` under the working directory, would scatter them
    wherever a command runs); a server decides for itself (None)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "artifacts").as_uri()
    return None


def experiment_name(cfg: Config) -> str:
    return f"recsys-moe-{cfg.name}"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested dict as MLflow params: dotted keys, values as strings cut to MLflow's limit."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:MAX_PARAM]
    return out


def log_metrics(client, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    """Log finite float metrics in batches (MLflow takes at most 1000 per call)."""
    import time

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = [
        Metric(k.replace("@", "_"), float(v), ts, step or 0)
        for k, v in metrics.items()
        if isinstance(v, int | float) and math.isfinite(float(v))
    ]
    for i in range(0, len(items), 900):
        client.log_batch(run_id, metrics=items[i : i + 900])


def log_revivals(client, run_id: str, events: list[dict], epoch: int) -> None:
    """Each dead expert revived in an epoch (recsys_moe/model/revive.py) as metrics at its
    training step (``revival/expert``, ``revival/donor``, ``revival/load_share``: the
    share it had) and the epoch's list as ``revivals/epoch_<n>.json``."""
    if not events:
        return
    for ev in events:
        log_metrics(client, run_id, {f"revival/{k}": ev[k] for k in ("expert", "donor", "load_share")},
                    step=int(ev["step"]))  # fmt: skip
    client.log_dict(run_id, events, f"revivals/epoch_{epoch}.json")


def _pip_requirements() -> list[str]:
    names = ["torch", "torchrec", "fbgemm-gpu-cpu", "polars", "pyarrow", "safetensors", "numpy"]
    names += ["pandas", "scikit-learn", "mlflow"]
    out = []
    for n in names:
        try:
            out.append(f"{n}=={md.version(n)}")
        except md.PackageNotFoundError:
            continue
    return out


@dataclass
class Tracker:
    """One MLflow run of ``recsys-moe train`` (the driver's side; rank 0 logs epochs)."""

    uri: str
    experiment_id: str
    run_id: str
    model_info: Any = None

    @classmethod
    def open(cls, cfg: Config, run_name: str) -> Tracker:
        import mlflow

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        uri = tracking_uri()
        mlflow.set_tracking_uri(uri)
        name = experiment_name(cfg)
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            exp_id = mlflow.create_experiment(name, artifact_location=artifact_location(uri))
        else:
            exp_id = exp.experiment_id
        for run_id in close_abandoned_runs(mlflow.MlflowClient(uri), exp_id):
            print(f"[train] MLflow run {run_id} was left running by a killed driver; "
                  "marked KILLED", flush=True)  # fmt: skip
        run = mlflow.start_run(experiment_id=exp_id, run_name=run_name)
        # who drives the run: a later run can tell it was abandoned (close_abandoned_runs)
        mlflow.set_tags({"train.host": socket.gethostname(), "train.pid": str(os.getpid())})
        return cls(uri, exp_id, run.info.run_id)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        import mlflow

        from recsys_moe import console

        log = console.log_path()  # the command's library logs so far (recsys_moe.console)
        if log is not None and log.is_file():
            try:
                sys.stdout.flush()
                sys.stderr.flush()
                mlflow.log_artifact(str(log), "logs")
            except Exception as e:  # the run's end must still be recorded
                print(f"[train] the log file could not be attached to the run: {e}")
        if exc_type is None:
            status = "FINISHED"
        else:  # stopped (Ctrl-C, SIGTERM) or failed
            status = "KILLED" if issubclass(exc_type, KeyboardInterrupt | SystemExit) else "FAILED"
        mlflow.end_run(status=status)

    def log_start(
        self, cfg: Config, manifest: dict[str, Any], *, workers: int, run_name: str, storage
    ) -> None:
        import mlflow

        mlflow.log_params(flatten(cfg.to_dict()))
        mlflow.set_tags(
            {
                "data.fingerprint": manifest.get("fingerprint", ""),
                "data.store": str(Path(cfg.features.store_dir).resolve()),
                "train.workers": str(workers),
                "train.run_name": run_name,
                "train.checkpoints": str(Path(storage).resolve() / run_name),
            }
        )
        mlflow.log_dict(manifest, "manifest.json")

    def log_end(self, summary, model, monitor, preds, test_df, model_dir) -> None:
        import mlflow

        client = mlflow.MlflowClient(self.uri)
        split = summary.get("evaluated_on", "test")
        # a store without a test split: the held-out rows are the validation window, where
        # the best epoch's model is the one evaluated (best/valid, now with the slices)
        held = "test" if split == "test" else "best/valid"
        flat = {f"best/valid/{k}": v for k, v in summary["valid"].items()}
        flat.update({f"{held}/{k}": v for k, v in summary["test"].items()})
        flat.update({f"oracle/{k}": v for k, v in (summary["oracle"] or {}).items()})
        flat.update({f"{held}/{k}": v for k, v in summary["router"].items()})
        flat.update(
            {
                "best_epoch": summary["best_epoch"],
                "train/samples_per_s_mean": summary["samples_per_s"],
            }
        )
        log_metrics(client, self.run_id, flat)
        with tempfile.TemporaryDirectory() as tmp:
            for path in plots(model, monitor, summary["test"], preds, test_df, Path(tmp), split):
                mlflow.log_artifact(str(path), "plots")
        self.log_model(model_dir, test_df.head(5))

    def log_model(self, model_dir, encoded_rows) -> None:
        """Log the bundle as an MLflow pyfunc over raw request rows (signature + example
        rebuilt from a few encoded store rows)."""
        import mlflow
        import pandas as pd
        from mlflow.models import infer_signature
        from mlflow.types.schema import ColSpec, Schema

        from recsys_moe.scorer import Scorer

        scorer = Scorer.from_dir(model_dir)
        example = scorer.example_rows(encoded_rows)
        out = scorer.score_frame(example)
        sig = infer_signature(example.to_pandas(), out.to_pandas())
        # only the ids and the domain are required; timestamp and context are optional
        sig.inputs = Schema(
            [ColSpec(c.type, c.name, required=c.name in scorer.required) for c in sig.inputs.inputs]
        )
        self.model_info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(MODEL_CODE),  # from code: loading never unpickles
            artifacts={"bundle": str(model_dir)},
            code_paths=[str(REPO / p) for p in PACKAGES],
            signature=sig,
            input_example=pd.DataFrame(example.to_pandas()),
            pip_requirements=_pip_requirements(),
        )


def close_abandoned_runs(client: Any, experiment_id: str) -> list[str]:
    """End as KILLED the runs of an experiment left RUNNING by a driver that no longer
    exists on this host (killed by SIGKILL, out of memory, the machine rebooted), tagged
    ``train.aborted``; returns their ids. A run driven from another host, or whose
    driver's pid is alive, is left alone."""
    host, out = socket.gethostname(), []
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'"):
        tags = run.data.tags
        pid = tags.get("train.pid", "")
        if tags.get("train.host") != host or not pid.isdigit() or _alive(int(pid)):
            continue
        client.set_tag(run.info.run_id, "train.aborted", f"driver pid {pid} on {host} gone")
        client.set_terminated(run.info.run_id, status="KILLED")
        out.append(run.info.run_id)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


# ------------------------------------------------------------------ plots


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def plots(
    model, monitor, test_metrics, preds: np.ndarray, test_df, out: Path, split: str = "test"
) -> list[Path]:
    """Expert-utilisation heatmaps per gate layer, per-domain AUC bars, calibration curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = model.spec
    paths: list[Path] = []
    for layer in monitor.acc:
        load = monitor.load_table(layer).numpy()  # (O, K, E)
        outputs = monitor.acc[layer].outputs
        fig, axes = plt.subplots(1, len(outputs), figsize=(4 * len(outputs), 3), squeeze=False)
        for o, gate in enumerate(outputs):
            ax = axes[0][o]
            im = ax.imshow(load[o], vmin=0, vmax=max(float(load.max()), 1e-6), cmap="viridis")
            ax.set_title(f"{layer}: {gate}")
            ax.set_yticks(range(len(monitor.domains)), monitor.domains)
            ax.set_xlabel("expert")
        fig.colorbar(im, ax=axes.ravel().tolist(), label="load share")
        paths.append(_save(fig, out / f"expert_utilisation_{layer}.png"))

    tasks = [t.name for t in spec.tasks if t.kind == "binary"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / max(len(tasks), 1)
    for i, t in enumerate(tasks):
        vals = [test_metrics.get(f"{t}/{d}/auc", np.nan) for d in spec.domains]
        ax.bar(np.arange(len(spec.domains)) + i * width, vals, width, label=t)
    ax.set_xticks(np.arange(len(spec.domains)) + width * (len(tasks) - 1) / 2, spec.domains)
    ax.set_ylim(0.5, 1.0)
    ax.set_ylabel(f"{split} AUC")
    ax.legend()
    paths.append(_save(fig, out / "auc_per_domain.png"))

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for i, t in enumerate(spec.tasks):
        if t.kind != "binary":
            continue
        y = test_df[t.column].to_numpy()
        edges = np.quantile(preds[:, i], np.linspace(0, 1, 11))
        idx = np.clip(np.searchsorted(edges, preds[:, i], side="right") - 1, 0, 9)
        mp = [preds[idx == b, i].mean() for b in range(10) if (idx == b).any()]
        my = [y[idx == b].mean() for b in range(10) if (idx == b).any()]
        ax.plot(mp, my, marker="o", label=t.name)
    lim = float(max(preds.max(), 1e-3))
    ax.plot([0, lim], [0, lim], "k--", lw=0.8)
    ax.set_xlabel("mean predicted")
    ax.set_ylabel("observed rate")
    ax.set_title(f"calibration ({split}, deciles)")
    ax.legend()
    paths.append(_save(fig, out / "calibration.png"))
    return paths
