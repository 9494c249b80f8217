"""The local Ray every command starts (recsys_moe.cluster.init_ray) is closed to the
network as far as Ray allows: token authentication on, and only Ray's token-guarded core
processes listen beyond loopback (read from the process table)."""

from __future__ import annotations

import psutil
import pytest

pytestmark = [pytest.mark.ray]

LOOPBACK = {"127.0.0.1", "::1"}
# Ray's core processes, which authenticate every call with the token when it is on
RAY_CORE = ("gcs_server", "raylet", "ray::", "python", "default_worker")


def _listeners() -> list[tuple[str, int, str, str]]:
    """(address, port, process name, command line) of every listening TCP socket."""
    out = []
    for c in psutil.net_connections(kind="inet"):
        if c.status != psutil.CONN_LISTEN or not c.pid:
            continue
        try:
            p = psutil.Process(c.pid)
            out.append((c.laddr.ip, c.laddr.port, p.name(), " ".join(p.cmdline())))
        except psutil.Error:
            continue
    return out


def test_local_ray_has_token_auth_and_loopback_dashboard(ray_session):
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    assert is_token_auth_enabled(), "a local Ray must start with token authentication on"
    ray_pids = {p.pid for p in psutil.process_iter() if _is_ray(p)}
    outside = [
        (ip, port, name) for ip, port, name, cmd in _listeners()
        if ip not in LOOPBACK and any(k in name or k in cmd for k in ("ray", "gcs_server", "raylet"))
    ]  # fmt: skip
    # what listens beyond loopback is Ray's core (token-guarded), never a dashboard, the
    # Serve proxy or anything of ours
    for ip, port, name in outside:
        assert name.startswith(RAY_CORE), (ip, port, name)
    assert ray_pids


def _is_ray(p: psutil.Process) -> bool:
    try:
        return p.name() in ("gcs_server", "raylet") or p.name().startswith("ray::")
    except psutil.Error:
        return False
