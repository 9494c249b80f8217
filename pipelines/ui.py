"""``recsys-moe ui`` / ``make ui``: the MLflow experiment UI over the project's tracking store.

Binds 127.0.0.1 by default, one worker and no job execution (about 450 MB instead of
~2.5 GB with MLflow's defaults). Same store as training: ``MLFLOW_TRACKING_URI``, else the
embedded ``mlruns/mlflow.db``. Runs until interrupted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from recsys_moe.tracking import tracking_uri


def command(host: str, port: int) -> tuple[list[str], dict[str, str]]:
    """The mlflow ui command line and environment."""
    mlflow_bin = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = tracking_uri()
    cmd = [mlflow_bin, "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    cmd += ["--workers", "1"]
    if uri.startswith("sqlite:") and not os.environ.get("MLFLOW_TRACKING_URI"):
        cmd += ["--default-artifact-root", (Path("mlruns").resolve() / "artifacts").as_uri()]
    return cmd, env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="recsys-moe ui", description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=5000)
    args = ap.parse_args(argv)
    cmd, env = command(args.host, args.port)
    print(f"MLflow UI on http://{args.host}:{args.port} over {tracking_uri()} (Ctrl-C stops it)")
    os.execve(cmd[0], cmd, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
