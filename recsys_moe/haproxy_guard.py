"""Ray Serve's HAProxy, closed to the network and tied to the life of its parent.

Ray Serve 2.60 starts HAProxy as ``<binary> -db -f <config> [-sf <pid>...]``, the binary
being ``RAY_SERVE_HAPROXY_BINARY_PATH``. :func:`recsys_moe.cluster.haproxy_env` points
that at a two-line script that runs this file, stdlib only, with the real binary first::

    python -I -S haproxy_guard.py <real haproxy> -db -f <config> [...]

- **Listeners.** Ray's template binds HAProxy's stats page and its Prometheus exporter
  on every interface (``bind *:<stats port>``, ``bind :<metrics port>``), whatever
  ``http_options.host`` says. This runs HAProxy on a copy of the config in which those
  two binds, found by their ports (``RAY_SERVE_HAPROXY_STATS_PORT``,
  ``RAY_SERVE_HAPROXY_METRICS_PORT``), name 127.0.0.1. The HTTP frontend keeps the host
  the serve config gives it (loopback by default; ``0.0.0.0`` where a user opts out).
- **Life.** HAProxy gets SIGTERM when the process that started it (Serve's proxy actor)
  dies (Linux ``PR_SET_PDEATHSIG``, which ``exec`` keeps): a Ray instance that is killed
  rather than shut down leaves no HAProxy holding the service's port.

The process then *is* HAProxy (``exec``): Serve's own handle on it (reloads, stop) works
unchanged.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import sys

PR_SET_PDEATHSIG = 1


def loopback(config: str, ports: list[str]) -> str:
    """``config`` with every bind that names no host (``*:P`` or ``:P``) for one of
    ``ports`` bound to 127.0.0.1 instead."""
    for port in ports:
        config = re.sub(
            rf"^(\s*bind\s+)\*?:{re.escape(port)}\b", rf"\g<1>127.0.0.1:{port}", config, flags=re.M
        )
    return config


def main(argv: list[str]) -> None:
    real, args = argv[0], list(argv[1:])
    i = args.index("-f") + 1
    ports = [
        os.environ[k]
        for k in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")
        if os.environ.get(k)
    ] or ["8404", "9101"]  # Ray's defaults
    with open(args[i]) as f:
        text = loopback(f.read(), ports)
    guarded = f"{args[i]}.loopback"
    tmp = f"{guarded}.{os.getpid()}"  # a reload's guard never sees a half-written copy
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, guarded)
    args[i] = guarded
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the signal was armed
        sys.exit(1)
    os.execv(real, [real, *args])


if __name__ == "__main__":
    main(sys.argv[1:])
