"""Runtime settings: the allocator keeps freed heap memory in the process; training
precision "auto" follows the CPU's native bf16 support."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
import torch

from recsys_moe import runtime

# 64 blocks of 1 MiB, touched and freed: with glibc's defaults each is its own mmap and
# goes back to the OS on free; tuned, they come from the heap and the heap is not trimmed
PROBE = """
import ctypes, sys
from recsys_moe.runtime import tune_allocator
tuned = tune_allocator() if sys.argv[1] == "1" else False
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
blocks = [libc.malloc(1 << 20) for _ in range(64)]
for b in blocks:
    ctypes.memset(b, 1, 1 << 20)
peak = rss_mib()
for b in reversed(blocks):
    libc.free(b)
print(tuned, peak - rss_mib())
"""

glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)


def _released_mib(tuned: bool) -> tuple[bool, float]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, "1" if tuned else "0"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    return out[0] == "True", float(out[1])


@glibc
def test_tuned_process_keeps_freed_memory():
    tuned, kept_released = _released_mib(True)
    _, default_released = _released_mib(False)
    assert tuned
    assert default_released > 48  # glibc's defaults: the 64 MiB go back to the OS
    assert kept_released < 8  # tuned: they stay for the next step


@glibc
def test_opt_out(monkeypatch):
    monkeypatch.setenv(runtime.OPT_OUT, "0")
    assert runtime.tune_allocator() is False
    monkeypatch.delenv(runtime.OPT_OUT)
    assert runtime.tune_allocator() is True


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "expected"),
    [(True, False, torch.bfloat16), (False, True, torch.bfloat16), (False, False, None)],
)
def test_auto_precision_is_bf16_where_the_cpu_multiplies_it(monkeypatch, amx, avx512_bf16,
                                                             expected):  # fmt: skip
    """training.precision = "auto" on a CPU: bf16 with AMX tiles or AVX512-BF16 dot
    products (both native), float32 (None) without either; "fp32" / "bf16" as said."""
    from recsys_moe.config import TrainingConfig
    from recsys_moe.training import training_dtype

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    cpu = torch.device("cpu")
    assert training_dtype(TrainingConfig(precision="auto"), cpu) == expected
    assert training_dtype(TrainingConfig(precision="fp32"), cpu) is None
    assert training_dtype(TrainingConfig(precision="bf16"), cpu) == torch.bfloat16
