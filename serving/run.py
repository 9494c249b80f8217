"""``recsys-moe serve``: start the ranking application from a Ray Serve config file.

    recsys-moe serve [--serve-config serving/config.yaml] [--port 8000] [--model models:/...]

Reads ``serving/config.yaml`` (the same file ``serve run`` takes), starts Ray (or joins
``RAY_ADDRESS``) and Serve on 127.0.0.1, deploys the ingress and one ranker per segment,
waits until ``/readyz`` answers, prints the endpoints and serves until Ctrl-C or SIGTERM.

HTTP comes in through HAProxy (``--ingress haproxy``, the default: HAProxy hands each
request straight to the ingress replica's own HTTP server; :func:`recsys_moe.cluster.
haproxy_env` keeps its listeners on loopback and ties it to Ray's life) or Serve's own
Python proxy (``--ingress proxy``). Which one is read when the local Ray starts; a
cluster joined through ``RAY_ADDRESS`` uses the one its ``ray start`` environment chose.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from recsys_moe.config import read_config_file
from serving.settings import ServeSettings, SettingsError

DEFAULT = Path(__file__).resolve().parent / "config.yaml"


def read_serve_config(path: str | Path) -> dict[str, Any]:
    """The parsed serve config, its ``args`` validated (:class:`ServeSettings`); every
    mistake a SettingsError naming the file and the key."""
    p = Path(path)
    raw = read_config_file(p, yaml.safe_load, "YAML", SettingsError, missing="no such serve config")
    apps = raw.get("applications") if isinstance(raw, dict) else None
    if not isinstance(apps, list) or len(apps) != 1 or not isinstance(apps[0], dict):
        raise SettingsError(f"{p}: applications: expected one application with args")
    http = raw.get("http_options") or {}
    port = http.get("port", 8000) if isinstance(http, dict) else None
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise SettingsError(f"{p}: http_options.port: expected a port number, got {port!r}")
    if not isinstance(apps[0].get("args"), dict):
        raise SettingsError(f"{p}: applications[0].args: expected a table of settings")
    try:
        ServeSettings.from_dict(apps[0]["args"])  # validate before starting anything
    except SettingsError as e:
        raise SettingsError(f"{p}: applications[0].args.{e}") from None
    return raw


def start(
    raw: dict[str, Any], *, blocking_ready_s: float = 300.0, require_ready: bool = True
) -> str:
    """Deploy the application of a parsed serve config; returns the base URL once
    ``/readyz`` says ready (``require_ready=False``: also once it says why not - e.g. no
    model registered yet - the service then answers 503 until the model appears)."""
    from ray import serve

    from recsys_moe.cluster import init_ray
    from serving.app import app_builder

    init_ray(serve=True)
    http = raw.get("http_options") or {}
    host, port = http.get("host", "127.0.0.1"), int(http.get("port", 8000))
    serve.start(http_options={"host": host, "port": port})
    app = raw["applications"][0]
    serve.run(
        app_builder(app["args"]),
        name=app.get("name", "ranking"),
        route_prefix=app.get("route_prefix", "/"),
    )
    url = f"http://{host}:{port}"
    _wait_ready(url, blocking_ready_s, require_ready)
    return url


INGRESSES = ("haproxy", "proxy")


def check_port_free(host: str, port: int) -> None:
    """A SettingsError naming the address when something already listens there (an
    earlier service still running?): said before Ray and Serve start, not as their
    traceback."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise SettingsError(
                f"{host}:{port} is not free ({e.strerror}): another service on it? "
                f"choose another with --port"
            ) from None


def _log_traceback() -> None:
    """The exception being handled, whole, into the command's log (on the terminal with
    ``-v``, where nothing is captured)."""
    import traceback

    from recsys_moe.console import log_path

    where = log_path()
    if where is None:
        traceback.print_exc()
        return
    with open(where, "a", encoding="utf-8") as f:
        traceback.print_exc(file=f)


def not_ready_reasons(body: dict[str, Any]) -> list[str]:
    """The load errors of a ``/readyz`` body, one per distinct reason."""
    parts = [body.get("router") or {}, *(body.get("segments") or {}).values()]
    return sorted({p["load_error"] for p in parts if not p.get("ready") and p.get("load_error")})


def _wait_ready(url: str, timeout_s: float, require_ready: bool = True) -> dict[str, Any]:
    import requests

    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            r = requests.get(f"{url}/readyz", timeout=5)
            last = r.json()
            if r.status_code == 200 or (not require_ready and not_ready_reasons(last)):
                return last
        except (requests.RequestException, ValueError) as e:
            last = str(e)
        time.sleep(0.5)
    raise TimeoutError(f"{url}/readyz not ready after {timeout_s}s: {last}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="recsys-moe serve", description=__doc__.splitlines()[0])
    ap.add_argument("--serve-config", default=str(DEFAULT), help="Ray Serve config file")
    ap.add_argument("--config", default=None, help="(unused; accepted like every command)")
    ap.add_argument("--host", default=None)
    ap.add_argument("--port", type=int, default=None)
    ap.add_argument("--model", default=None,
                    help="a bundle folder to serve instead of the registry alias")  # fmt: skip
    ap.add_argument("--alias", default=None, help="registry alias (default: the config's)")
    ap.add_argument("--ingress", choices=INGRESSES, default=None,
                    help="haproxy (default) or Serve's own proxy")  # fmt: skip
    args = ap.parse_args(argv)
    try:
        raw = read_serve_config(args.serve_config)
        http = raw.setdefault("http_options", {})
        if args.host:
            http["host"] = args.host
        if args.port:
            http["port"] = args.port
        a = raw["applications"][0]["args"]
        if args.model:
            a["model_dir"] = args.model
        if args.alias:
            a["model_alias"] = args.alias
        ServeSettings.from_dict(a)
        if a.get("model_dir") and not (Path(a["model_dir"]) / "model.json").is_file():
            raise SettingsError(f"--model {a['model_dir']}: not a model bundle (no model.json)")
        check_port_free(http.get("host", "127.0.0.1"), int(http.get("port", 8000)))
    except SettingsError as e:
        print(f"recsys-moe serve: error: {e}", file=sys.stderr)
        return 2
    import requests

    if args.ingress:
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1" if args.ingress == "haproxy" else "0"
    try:
        url = start(raw, require_ready=False)
    except (RuntimeError, TimeoutError) as e:  # Serve's own errors, e.g. its HAProxy failing
        _log_traceback()
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"recsys-moe serve: error: the service did not start: {first}",
              file=sys.stderr)  # fmt: skip
        return 1
    segs = ", ".join(s["name"] for s in raw["applications"][0]["args"]["segments"])
    ready = requests.get(f"{url}/readyz", timeout=10)
    state = "ready" if ready.status_code == 200 else "up, NOT READY"
    for why in () if ready.status_code == 200 else not_ready_reasons(ready.json()):
        print(f"recsys-moe serve: waiting for a model: {why}; /rank answers 503 until it "
              f"loads (polled every {a.get('poll_s', 10)} s)", file=sys.stderr)  # fmt: skip
    from recsys_moe.cluster import ingress

    print(
        f"ranking service {state} at {url} (segments: {segs}; ingress: {ingress()})\n"
        f"  POST {url}/rank   GET {url}/healthz  {url}/readyz  {url}/docs (OpenAPI)\n"
        f"  metrics: Ray's Prometheus endpoint (ray metrics-export-port); Ctrl-C stops",
        flush=True,
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
