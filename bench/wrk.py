"""A compiled HTTP load generator for the serving benches: ``wrk`` (Debian's package
``wrk``) with a Lua script that posts pre-built ranking requests in turn.

``wrk -t1 -c<concurrency>`` is a closed loop like the Python client (each connection
sends its next request when the last answer arrives, keep-alive), from one C thread, so
far less of the machine goes to the client. The client's own CPU (user + system seconds
of the wrk process, from ``wait4``) is reported with each run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

# each wrk thread walks the bodies from its own starting point; done() prints one JSON
# line with the latency percentiles (microseconds) and the error counts
LUA = r"""
local bodies = {}
local idx = 0
local headers = {["Content-Type"] = "application/json"}

init = function(args)
  for line in io.lines(args[1]) do bodies[#bodies + 1] = line end
  idx = math.random(#bodies)
end

request = function()
  idx = idx % #bodies + 1
  return wrk.format("POST", "/rank", headers, bodies[idx])
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "p50": %d, "p95": %d, "p99": %d, ' ..
    '"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(95),
    latency:percentile(99), e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def available() -> str | None:
    """The wrk binary, or None (``apt-get install wrk``)."""
    return shutil.which("wrk")


def run(url: str, bodies: list[dict], concurrency: int, seconds: float) -> dict:
    """``concurrency`` connections for ``seconds`` against ``url``/rank; the same summary
    keys as the Python client (``p50``/``p95``/``p99`` in ms, ``rps``, ``errors``) plus
    ``client_cpu_s`` and ``wall_s``."""
    binary = available()
    if binary is None:
        raise RuntimeError("wrk is not installed (apt-get install wrk)")
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        script, data = Path(tmp) / "rank.lua", Path(tmp) / "bodies.jsonl"
        script.write_text(LUA)
        data.write_text("\n".join(json.dumps(b, separators=(",", ":")) for b in bodies) + "\n")
        argv = [binary, "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "--timeout", "30s",
                "-s", str(script), url, "--", str(data)]  # fmt: skip
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    line = next((x for x in out.splitlines() if x.startswith("WRK_JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {out[-500:]}")
    r = json.loads(line[len("WRK_JSON ") :])
    wall = r["duration_us"] / 1e6
    errors = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
    return {
        "concurrency": concurrency,
        "requests": r["requests"],
        "errors": errors,
        "p50": r["p50"] / 1e3,
        "p95": r["p95"] / 1e3,
        "p99": r["p99"] / 1e3,
        "rps": r["requests"] / wall,
        "client_cpu_s": usage.ru_utime + usage.ru_stime,
        "wall_s": wall,
    }
