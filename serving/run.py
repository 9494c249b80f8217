"""``recsys-moe serve``: start the ranking application from a Ray Serve config file.

    recsys-moe serve [--serve-config serving/config.yaml] [--port 8000] [--model models:/...]

Reads ``serving/config.yaml`` (the same file ``serve run`` takes), starts Ray (or joins
``RAY_ADDRESS``) and Serve on 127.0.0.1, deploys the ingress and one ranker per segment,
waits until ``/readyz`` answers, prints the endpoints and serves until Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from serving.settings import ServeSettings, SettingsError

DEFAULT = Path(__file__).resolve().parent / "config.yaml"


def read_serve_config(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise SettingsError(f"{p}: no such serve config")
    raw = yaml.safe_load(p.read_text())
    apps = raw.get("applications") or []
    if len(apps) != 1 or "args" not in apps[0]:
        raise SettingsError(f"{p}: expected one application with args")
    ServeSettings.from_dict(apps[0]["args"])  # validate before starting anything
    return raw


def start(raw: dict[str, Any], *, blocking_ready_s: float = 300.0) -> str:
    """Deploy the application of a parsed serve config; returns the base URL."""
    from ray import serve

    from recsys_moe.cluster import init_ray
    from serving.app import app_builder

    init_ray()
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
    _wait_ready(url, blocking_ready_s)
    return url


def _wait_ready(url: str, timeout_s: float) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            r = requests.get(f"{url}/readyz", timeout=5)
            if r.status_code == 200:
                return
            last = r.text
        except requests.RequestException as e:
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
    except SettingsError as e:
        print(f"recsys-moe serve: error: {e}", file=sys.stderr)
        return 2
    url = start(raw)
    segs = ", ".join(s["name"] for s in raw["applications"][0]["args"]["segments"])
    print(
        f"ranking service ready at {url} (segments: {segs})\n"
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
