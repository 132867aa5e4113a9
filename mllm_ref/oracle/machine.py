"""This machine's limits, measured in a few seconds, and how busy the other processes keep it.

``bench`` reports each fast path's achieved GB/s or GFLOP/s as a fraction of these measured limits, not of a
datasheet's: on a shared 2-core VM the datasheet is not what a kernel can reach (see ``PERF-NOTES.md``).

- Memory bandwidth: ``np.copyto`` between two 128 MB float64 arrays, four times the last-level cache, counting
  bytes read plus bytes written as STREAM does (no write-allocate). NumPy's ``sum`` would understate it: its
  pairwise summation is compute-bound at about half the bandwidth.
- Compute: a float32 1024 x 1024 matmul through NumPy's BLAS, with the thread count in force (the command line
  sets one BLAS thread unless ``OPENBLAS_NUM_THREADS`` says otherwise).
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def threads() -> str:
    """The thread counts in force, for the report (numba and torch only if something imported them)."""
    parts = [f"BLAS {os.environ.get('OPENBLAS_NUM_THREADS', 'default')}"]
    if "numba" in sys.modules:
        parts.append(f"numba {sys.modules['numba'].get_num_threads()}")
    if "torch" in sys.modules:
        parts.append(f"torch {sys.modules['torch'].get_num_threads()}")
    return ", ".join(parts)


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: page in the arrays, start the BLAS threads
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def machine_limits(quick: bool = False) -> dict[str, float]:
    """``{bandwidth_gbs, matmul_gflops}``: the best of a few runs of a large copy and a float32 matmul.

    ``quick`` copies 32 MB instead of 128 MB (it then partly measures the cache) and runs fewer repeats.
    """
    n = (32 if quick else 128) * 2**20 // 8
    a, b = np.ones(n), np.empty(n)
    copy_seconds = _best_seconds(lambda: np.copyto(b, a), 3 if quick else 7)
    m = np.ones((1024, 1024), dtype=np.float32)
    matmul_seconds = _best_seconds(lambda: m @ m, 3 if quick else 7)
    return {
        "bandwidth_gbs": 2 * a.nbytes / copy_seconds / 1e9,
        "matmul_gflops": 2 * 1024**3 / matmul_seconds / 1e9,
    }


def _busy_seconds() -> float | None:
    """CPU seconds spent busy by all processes since boot (Linux ``/proc/stat``), or ``None`` elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / _CLOCK_TICKS


class OtherLoad:
    """Measures how many cores other processes kept busy while a timing ran (``None`` where unknown)::

        load = OtherLoad()
        ...  # the timed work
        cores = load.cores()

    Our own CPU time (every thread of this process) is subtracted from the machine's busy time. A value above
    about 0.05 means the timing shared the machine (PERF-NOTES gates its batches at that level).
    """

    def __init__(self) -> None:
        self._wall = time.perf_counter()
        self._busy = _busy_seconds()
        self._own = sum(os.times()[:2])

    def cores(self) -> float | None:
        busy = _busy_seconds()
        if busy is None or self._busy is None:
            return None
        wall = time.perf_counter() - self._wall
        other = (busy - self._busy) - (sum(os.times()[:2]) - self._own)
        return max(0.0, other / wall) if wall > 0 else None
