"""Peak memory of a piece of work, for the benchmarks that report one (bench_calibration, bench_train_sizes).

The work runs once to warm up (lazy imports: a process's first optimizer step imports about 900 modules and makes
about 157 MiB resident with torch 2.14; first-use caches and kernels), then again, measured: on CUDA the
allocator's peak over the memory allocated before it; on the CPU (Linux) the resident high-water mark, reset first,
over the resident memory before it. For the CPU figure to be the work's own, glibc must hand freed blocks back to
the system: run the measuring process with :data:`CHILD_ENV` (a fixed mmap threshold), as the benchmarks do.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch

__all__ = ["CHILD_ENV", "peak_mib"]

# glibc serves allocations above this from mmap and returns them on free; left to itself it raises the threshold
# after frees and keeps freed tensors resident, so a second run would reuse them and show no peak.
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def peak_mib(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """Run ``fn`` twice (a warm-up, then measured); the measured run's result and the MiB it added to the peak.

    Example:
        >>> total, mib = peak_mib(lambda: torch.ones(2**22).sum(), torch.device("cpu"))  # 16 MiB (with CHILD_ENV)
        >>> int(total), mib >= 0
        (4194304, True)
    """
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current resident size
        f.write("5")
    before = _rss()
    out = fn()
    return out, max(0, _peak_rss() - before) / 2**20
