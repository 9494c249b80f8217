"""What a command shows on the terminal, and where everything else goes.

A ``recsys-moe`` command runs inside :func:`session`: the terminal gets the command's own
lines (its ``[stage]`` progress lines, from the driver or relayed by Ray from a worker,
its tables and summary, its errors) and any warning or error that is not on the list of
known-harmless ones (:data:`HARMLESS`); everything, shown or not, goes to the command's
log file (``logs/<command>-<time>.log``, or under ``RECSYS_MOE_LOG_DIR``), which
``recsys-moe train`` also attaches to its MLflow run. Library logs (Ray's, Ray Data's
progress, torchrec's planner, MLflow's hints, fbgemm's loaded-library lines) are in the
file only. With ``-v`` nothing is captured: every line reaches the terminal, as the
libraries wrote it.

Capture is by file descriptor as well as by ``sys.stdout`` / ``sys.stderr``: what a
library's C++ code or a logging handler bound to the original streams writes lands in the
file, and processes started inside (Ray's) inherit it.
"""

from __future__ import annotations

import io
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

LOG_DIR_ENV = "RECSYS_MOE_LOG_DIR"

# the command's own lines: "[stage] ..." progress and "recsys-moe <command>: ..." notices
OURS = re.compile(r"^(\[[a-z][\w-]*\] |recsys-moe \w+: |usage: recsys-moe )")
# a line that may need the user's attention: shown unless it is known to be harmless
ALARM = re.compile(
    r"(?i:\b(error|exception|traceback|fatal|critical)\b)|\w(Error|Exception)\b"
    r"|\b([A-Z]\w*)?Warning\b|\bwarning:|\bWARN(ING)?\b"
    r"|^(\[rank\d+\]:)?[WEF]\d{4} "  # glog's W/E/F lines (torch's and Ray's C++)
)
# what the libraries say on every healthy run, warnings and errors by name included
HARMLESS = [
    re.compile(p)
    for p in (
        r"is_fx_tracing will return true",  # torch.fx, every torchrec import
        r"ExecutionOptions\.exclude_resources` is deprecated",  # Ray Data's own use of it
        r"torch\.distributed is disabled, unavailable or uninitialized",  # DCP, one process
        r"Inferred schema contains integer column",  # MLflow's signature hint
        r"Add type hints to the `predict` method",  # MLflow's pyfunc hint
        r"'PreemptionWatcher'.* has constructor arguments in the object store",  # Ray Train
        r"`broadcast_buffers` .*deprecated|broadcast_buffers.*deprecat",  # DDP
        r"GreedyPerfPartitioner|ShardingPlan|sharding plan",  # torchrec's planner tables
        # Ray Data, when a stage's datasets start while the last one's tasks still hold the
        # node's CPUs (a small node): it waits for them, it does not hang
        r"Ray cluster currently does not have any available CPUs",
        # the raylet, when Ray Data and Ray Train start workers on a node of few CPUs
        r"PYTHON worker processes have been started on node",
        # Ray Train's placement-group cleaner thread, at the end of a run on a machine
        # with another local Ray instance (a service, a test session): the run is done
        r"^Exception in thread PlacementGroupCleanerMonitor",
    )
]
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# a line Ray relays from a worker: "(<name> pid=N[, ip=...]) <line>"
_RELAYED = re.compile(r"^\((?:[^()]*\s)?pid=[^)]*\)\s?(.*)$")
# the first line of a traceback block (Python's, or a thread's that ended with one)
_TRACEBACK = re.compile(r"^(Traceback \(most recent call last\):|Exception in thread \S+)")


def _text(line: str) -> str:
    """A captured line as the user would read it: no colours, no Ray worker prefix."""
    return _RELAYED.sub(r"\1", _ANSI.sub("", line))


def _harmless(text: str) -> bool:
    return any(p.search(text) for p in HARMLESS)


def block_shown(block: list[str]) -> bool:
    """A whole traceback block (its first line, frames, exception line) is shown unless a
    line of it is known to be harmless (:data:`HARMLESS`): a library's harmless thread
    exception goes to the log only, every other traceback reaches the user in full."""
    return not any(_harmless(_text(line)) for line in block)


def shown(line: str, stream: str, after_shown: bool = False) -> bool:
    """Whether a captured ``line`` written to ``stream`` ("stdout" or "stderr") reaches the
    terminal: the command's own lines, and warnings or errors not known to be harmless.
    The driver's own stdout is the command's output (its tables, summaries, paths); a
    line relayed from a Ray worker is treated like stderr whichever stream it came on.
    ``after_shown``: the stream's previous line was shown; an indented line then continues
    it (a usage message, a warning's source line, a traceback's frames)."""
    text = _ANSI.sub("", line)
    relayed = _RELAYED.match(text)
    if relayed:
        text, stream = relayed.group(1), "stderr"
    if OURS.match(text) or (after_shown and text[:1].isspace()):
        return True
    if _harmless(text):
        return False
    return stream == "stdout" or bool(ALARM.search(text))


class _Filtered(io.TextIOBase):
    """A text stream that writes every line to ``log`` and the lines :func:`shown` lets
    through to ``term``. Thread-safe (Ray relays worker lines from a thread of its own)."""

    def __init__(self, name: str, term: TextIO, log: TextIO, fd: int) -> None:
        self.name, self._term, self._log, self._fd = name, term, log, fd
        self._pending = ""
        self._last_shown = False
        self._block: list[str] | None = None  # the traceback being read, until it ends
        self._lock = threading.Lock()

    @property
    def encoding(self) -> str:
        return "utf-8"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False  # libraries draw no bars on a stream only a file may see

    def fileno(self) -> int:
        return self._fd  # the log file, which fd 1 / 2 now point at

    def write(self, s: str) -> int:
        with self._lock:
            *lines, self._pending = (self._pending + s).split("\n")
            for line in lines:
                self._emit(line)
        return len(s)

    def _emit(self, line: str) -> None:
        self._log.write(line + "\n")
        text = _text(line)
        if self._block is not None:  # a traceback ends with its first unindented line
            self._block.append(line)
            if text.strip() and not text[:1].isspace() and not _TRACEBACK.match(text):
                self._end_block()
            return
        if _TRACEBACK.match(text):
            self._block = [line]
            return
        self._last_shown = shown(line, self.name, self._last_shown)
        if self._last_shown:
            self._term.write(text + "\n")

    def _end_block(self) -> None:
        block, self._block = self._block or [], None
        self._last_shown = block_shown(block)
        if self._last_shown:
            self._term.write("".join(_text(line) + "\n" for line in block))

    def flush(self) -> None:
        with self._lock:
            self._log.flush()
            self._term.flush()

    def close_pending(self) -> None:
        with self._lock:
            if self._pending:
                self._emit(self._pending)
                self._pending = ""
            if self._block is not None:  # a traceback cut short: shown as far as it got
                self._end_block()
        self.flush()


_state: dict[str, object] = {}


def log_path() -> Path | None:
    """The log file of the command running in this process (None outside a session or
    with ``-v``)."""
    path = _state.get("log")
    return path if isinstance(path, Path) else None


def terminal() -> TextIO:
    """The stream progress bars draw on: the terminal's stderr during a session (not the
    log file), ``sys.stderr`` otherwise."""
    term = _state.get("stderr")
    return term if term is not None else sys.stderr  # type: ignore[return-value]


def new_log_path(command: str) -> Path:
    """``<RECSYS_MOE_LOG_DIR or logs>/<command>-<YYYYmmdd-HHMMSS>-<pid>.log``."""
    root = Path(os.environ.get(LOG_DIR_ENV) or "logs")
    return root.resolve() / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


@contextmanager
def session(command: str, verbose: bool = False) -> Iterator[Path | None]:
    """Run a command quietly (see the module's docstring); yields its log file (None with
    ``verbose``: nothing is captured). On exit, however the command ended, the terminal's
    streams are back, so an error or traceback printed after reaches the user."""
    if verbose or _state:
        yield None
        return
    path = new_log_path(command)
    path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path, "a", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115
    saved_fds = {}
    sys.stdout.flush()
    sys.stderr.flush()
    terms = {name: _terminal_stream(getattr(sys, name), fd, saved_fds)
             for name, fd in (("stdout", 1), ("stderr", 2))}  # fmt: skip
    originals = (sys.stdout, sys.stderr)
    streams = {name: _Filtered(name, terms[name], log, fd)
               for name, fd in (("stdout", 1), ("stderr", 2))}  # fmt: skip
    for fd in saved_fds:
        os.dup2(log.fileno(), fd)
    sys.stdout, sys.stderr = streams["stdout"], streams["stderr"]
    _state.update(log=path, stderr=terms["stderr"])
    try:
        yield path
    finally:
        for s in streams.values():
            s.close_pending()
        sys.stdout, sys.stderr = originals
        for fd, saved in saved_fds.items():
            os.dup2(saved, fd)
            os.close(saved)
            terms["stdout" if fd == 1 else "stderr"].close()  # our copy of the descriptor
        _state.clear()
        log.close()


def _terminal_stream(current: TextIO, fd: int, saved: dict[int, int]) -> TextIO:
    """Where the command's shown lines go: a copy of file descriptor ``fd`` when
    ``current`` writes to it (a terminal, a pipe), which is then free to point at the log
    file; else ``current`` itself (a test's capture, which has no descriptor of its own)."""
    try:
        own = current.fileno() == fd
    except (AttributeError, OSError, ValueError):
        own = False
    if not own:
        return current
    saved[fd] = os.dup(fd)
    return open(os.dup(saved[fd]), "w", buffering=1, encoding="utf-8", errors="replace")
