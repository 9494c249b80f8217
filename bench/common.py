"""Helpers shared by the benchmarks: machine description, timing, RESULTS.md sections."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))  # type: ignore[union-attr]
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, AttributeError):
        pass
    return f"{cpu}, {os.cpu_count()} cores{mem}, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def commit() -> str:
    """The checked-out commit (short), "+ uncommitted changes" when the tree differs from
    it outside bench/RESULTS.md; "unknown" outside a git checkout."""
    import subprocess

    def git(*args: str) -> str:
        here = Path(__file__).resolve().parent  # the checkout this bench runs from
        r = subprocess.run(["git", *args], capture_output=True, text=True, cwd=here)
        return r.stdout.strip() if r.returncode == 0 else ""

    sha = git("rev-parse", "--short", "HEAD")
    if not sha:
        return "unknown"
    dirty = [line for line in git("status", "--porcelain", "--untracked-files=no").splitlines()
             if not line.endswith("bench/RESULTS.md")]  # fmt: skip
    return sha + (" + uncommitted changes" if dirty else "")


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section ``## name`` of bench/RESULTS.md, and say where. A
    body that names no commit gets the checked-out one (:func:`commit`) as its last line;
    every section names its machine (:func:`machine`) in its body."""
    if not re.search(r"\bCommit [0-9a-f]{7}", body):
        body = body.rstrip() + f"\n\nCommit {commit()}."
    text = (
        RESULTS.read_text()
        if RESULTS.exists()
        else "# Benchmark results\n\nWritten by `make bench` (bench/*.py); each section names the machine it ran on.\n"
    )
    section = f"## {name}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.M | re.S)
    text = (
        pattern.sub(section + "\n", text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + section
    )
    RESULTS.write_text(text.rstrip() + "\n")
    print(f"results: {RESULTS} (section: {name})", flush=True)


def load_bench_config(path: str, overrides: dict | None = None):
    """``load_config`` for a benchmark: models are judged on a test window they never saw.
    A config without a test split (``features.test_fraction = 0``, the shipped default)
    gets one as large as its validation window, in a store of its own beside the user's
    (``<store_dir>-heldout``)."""
    import dataclasses

    from recsys_moe.config import load_config

    cfg = load_config(path, overrides)
    f = cfg.features
    if f.test_fraction > 0:
        return cfg
    held = dataclasses.replace(
        f, test_fraction=f.valid_fraction, store_dir=f"{f.store_dir.rstrip('/')}-heldout"
    )
    return cfg.replace(features=held)


def ensure_raw(cfg) -> None:
    """The config's raw log, generated (or loaded) where missing or stale."""
    from pipelines.generate import raw_log_is_current, run_generate

    if not raw_log_is_current(cfg):
        run_generate(cfg, progress=False)


def ensure_store(cfg) -> None:
    """The config's raw log (:func:`ensure_raw`) and feature store (built where missing)."""
    from pipelines.build_features import build_features

    ensure_raw(cfg)
    if not (Path(cfg.features.store_dir) / "manifest.json").exists():
        build_features(cfg, progress=False)
