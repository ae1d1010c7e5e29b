"""Peak memory of some work, measured in the process that does it (so run that in a fresh process).

Both benchmark scripts re-run themselves with a hidden ``--memory-probe`` flag for each variant:
a fresh interpreter has no freed-but-kept memory from other variants that would hide their needs.
"""

from __future__ import annotations

import ctypes
import gc
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import torch


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS so the resident set measures what is in use."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: large tensors are mmap-allocated anyway
        pass


def peak_extra_bytes(work: Callable[[], None], device: str) -> int:
    """Bytes ``work()`` needs at its peak above what was in use before it started.

    CUDA: ``max_memory_allocated`` over ``memory_allocated`` before.  CPU: a thread samples the
    resident set every millisecond (large tensors are mmap-allocated, so freeing them lowers it
    again); the peak minus the resident set before ``work``.
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        work()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    release_freed_memory()
    base, peak, done = resident_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], resident_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        work()
    finally:
        done.set()
        sampler.join()
    return max(peak[0] - base, 0)


def probe_in_subprocess(script: str, argv: list[str]) -> int:
    """Run ``script --memory-probe ...`` in a fresh interpreter; the byte count it prints last."""
    proc = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe {argv} failed:\n{proc.stderr[-2000:]}")
    return int(proc.stdout.split()[-1])
