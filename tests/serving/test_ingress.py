"""`recsys-moe serve` as a user runs it, in a process of its own with its own Ray: HTTP
comes in through HAProxy, nothing it opens listens beyond loopback, and when the command
stops (SIGTERM, Ctrl-C's SIGINT) or fails to start, no process of it is left and its port
is free."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests

from recsys_moe.cluster import free_port
from recsys_moe.haproxy_guard import loopback
from recsys_moe.scorer import Scorer

pytestmark = [pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
LOOPBACK = {"127.0.0.1", "::1"}
# Serve's processes: the controller, the proxy, HAProxy's manager and the replicas
SERVE = ("ray::Serve", "ray::ProxyActor", "ray::HAProxyManager")


def _command(port: int, tmp: Path, bundle: Path, extra_env: dict[str, str] | None = None):
    """``recsys-moe serve --model <bundle> --port <port>`` started as a user would (its
    own local Ray), its output lines in a queue."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RECSYS_MOE_LOG_DIR=str(tmp), PYTHONPATH=str(REPO), **(extra_env or {}))
    argv = [sys.executable, "-m", "pipelines.cli", "serve", "--model", str(bundle),
            "--port", str(port)]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=tmp, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return proc, lines


def _wait_for(lines: queue.Queue, text: str, timeout_s: float) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if line is None:
            break
        seen.append(line)
        if text in line:
            return seen
    raise AssertionError(f"no {text!r} within {timeout_s} s; output:\n{''.join(seen)}")


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _speaks_http(port: int) -> bool:
    try:
        requests.get(f"http://127.0.0.1:{port}/", timeout=2)
    except requests.RequestException:
        return False
    return True


def _listeners(pids: set[int]) -> list[tuple[str, int, psutil.Process]]:
    out = []
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            out.append((c.laddr.ip, c.laddr.port, psutil.Process(c.pid)))
    return out


def _wait_collecting(proc: subprocess.Popen, timeout_s: float) -> tuple[int, list]:
    """Wait for the command to exit, gathering every process it started meanwhile (a
    process that outlives it is then reparented, out of reach of ``children()``)."""
    seen: dict[int, psutil.Process] = {}
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(psutil.Error):
            seen.update({p.pid: p for p in _tree(proc.pid)})
        time.sleep(0.2)
    if proc.poll() is None:
        proc.kill()
        raise AssertionError(f"the command did not exit within {timeout_s} s")
    return proc.returncode, list(seen.values())


def _gone(tree: list[psutil.Process], port: int, timeout_s: float = 60) -> None:
    """Every process of the command's tree has exited and nothing answers on its port."""
    _, alive = psutil.wait_procs(tree, timeout=timeout_s)
    assert not alive, [(p.pid, p.name()) for p in alive]
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, f"something still listens on {port}"


def test_haproxy_binds_only_named_hosts_on_loopback():
    cfg = "listen stats\n  bind *:8404\nfrontend prometheus\n    bind :9101\n" \
          "frontend http_frontend\n    bind *:8000\n"  # fmt: skip
    out = loopback(cfg, ["8404", "9101"])
    assert "bind 127.0.0.1:8404" in out and "bind 127.0.0.1:9101" in out
    assert "bind *:8000" in out  # the frontend keeps the host the serve config gave it


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_serve_listens_on_loopback_and_leaves_nothing_when_stopped(scoring_model, tmp_path, stop):
    _cfg, bundle, _uri, _tmp = scoring_model
    port = free_port()
    proc, lines = _command(port, tmp_path, bundle)
    try:
        ready = _wait_for(lines, "ranking service", 240)
        assert "ingress: HAProxy" in ready[-1], ready[-1]
        tree = _tree(proc.pid)
        pids = {p.pid for p in tree}
        haproxy = [p for p in tree if p.name() == "haproxy"]
        assert haproxy, "HAProxy is the default ingress"

        # a ranking through HAProxy -> the ingress replica
        sc = Scorer.from_dir(bundle)
        items = sc.tables["items"][sc.spec.item_id].to_list()[:20]
        r = requests.post(f"http://127.0.0.1:{port}/rank", timeout=30,
                          json={"user_id": 1, "domain": "feed", "candidates": items})  # fmt: skip
        assert r.status_code == 200, r.text
        assert sorted(i["item_id"] for i in r.json()["items"]) == sorted(items)

        served = False
        for ip, p, owner in _listeners(pids):
            name = " ".join(owner.cmdline()) or owner.name()
            if owner.name() == "haproxy":
                assert ip in LOOPBACK, (ip, p, "HAProxy")
            served |= p == port and owner.name() == "haproxy"
            if name.startswith(SERVE) and ip not in LOOPBACK:
                # Ray's own (token-guarded gRPC) ports: never HTTP beyond loopback
                assert not _speaks_http(p), (ip, p, name)
        assert served, f"HAProxy does not hold the service's port {port}"
    finally:
        proc.send_signal(stop)
        code, later = _wait_collecting(proc, 90)
    assert code == 0, code  # a service stopped on request
    _gone(tree + later, port)


def test_a_failed_start_says_why_and_leaves_nothing(scoring_model, tmp_path):
    """HAProxy that cannot start (here: a binary that exits at once): a one-line error,
    exit status 1, and the Ray it started is gone with every process of it."""
    _cfg, bundle, _uri, _tmp = scoring_model
    broken = tmp_path / "haproxy"
    broken.write_text("#!/bin/sh\necho 'cannot start' >&2\nexit 1\n")
    broken.chmod(0o755)
    port = free_port()
    proc, lines = _command(port, tmp_path, bundle, {"RAY_SERVE_HAPROXY_BINARY_PATH": str(broken)})
    code, tree = _wait_collecting(proc, 240)
    out = []
    while (line := lines.get(timeout=10)) is not None:
        out.append(line)
    text = "".join(out)
    assert code == 1, text
    assert "recsys-moe serve: error: the service did not start" in text, text
    assert "Traceback" not in text, text
    assert len(tree) > 3, "the command had started its Ray (and Serve) before it failed"
    _gone(tree, port)


def test_a_busy_port_is_refused_before_anything_starts(tmp_path, scoring_model):
    _cfg, bundle, _uri, _tmp = scoring_model
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc, lines = _command(port, tmp_path, bundle)
        code = proc.wait(timeout=60)
    out = []
    while (line := lines.get(timeout=10)) is not None:
        out.append(line)
    assert code == 2
    assert f"127.0.0.1:{port} is not free" in "".join(out)
