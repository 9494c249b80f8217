"""Output folders that appear whole or not at all, one writer at a time.

A job that writes a folder (the feature store, batch scores) writes it beside its final
place, ``.<name>.staging-<pid>``, and publishes it by renames once it is complete:

1. the previous folder, if any, is renamed ``.<name>.old-<pid>``;
2. the staging folder is renamed to the final name;
3. the old folder is removed.

A job killed before step 1 leaves the previous folder untouched (its staging folder is
removed by the next run into the same place); one killed between 1 and 2 leaves the old
folder beside the final place, and the next run puts it back. Readers never see
a half-written folder. An advisory lock (``.<name>.lock``, ``fcntl.flock``, released by the
kernel when the process dies) keeps two jobs from writing the same folder at once: the
second waits and says for whom.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path


def _siblings(final: Path, kind: str) -> list[Path]:
    return sorted(final.parent.glob(f".{final.name}.{kind}-*"))


def recover(final: str | Path) -> bool:
    """Put back a folder a publish was killed in the middle of (renamed away, its
    successor not yet in place); True if it did. Call with the lock held or before any
    writer exists."""
    final = Path(final)
    olds = [] if final.exists() else _siblings(final, "old")
    if olds:
        olds[0].rename(final)
    return bool(olds)


@contextlib.contextmanager
def _locked(final: Path, what: str) -> Iterator[None]:
    lock = final.parent / f".{final.name}.lock"
    with open(lock, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            print(f"[{what}] {final} is being written by {holder}; waiting for it to finish",
                  file=sys.stderr, flush=True)  # fmt: skip
            fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def published(final: str | Path, what: str) -> Iterator[Path]:
    """Yields the staging folder to write into; on a normal exit it replaces ``final``, on
    an exception it is removed and ``final`` stays as it was. ``what`` names the job in
    messages. Leftovers of a killed run into the same place are cleaned up first (and
    said so)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with _locked(final, what):
        if recover(final):
            print(f"[{what}] put back {final}, which a killed run had moved aside", flush=True)
        for stale in [*_siblings(final, "staging"), *_siblings(final, "old")]:
            print(f"[{what}] removing {stale.name}, left by a run that did not finish", flush=True)
            shutil.rmtree(stale, ignore_errors=True)
        staging = final.parent / f".{final.name}.staging-{os.getpid()}"
        staging.mkdir()
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        if final.exists():
            final.rename(old)
        staging.rename(final)
        shutil.rmtree(old, ignore_errors=True)


__all__ = ["published", "recover"]
