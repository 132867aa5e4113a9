"""Benchmarks: the reference against its fast paths, measured in one run, against this machine's limits.

First the machine's limits are measured (memory read bandwidth from a large float64 sum, float32 matmul
GFLOP/s from NumPy); then every registered technique's ``bench`` cases are timed with the reference and each fast
path. Inputs smaller than :data:`COLD_BYTES` are replicated and cycled through, so every call reads them from
memory rather than from the cache. A timing is the median of at least ``repeats`` batches, each at least ``min_batch`` seconds long, after a
warm-up call (which also compiles a Numba kernel). ``ratio_to_reference`` is the reference's time over the
implementation's, both measured here and now; ``achieved`` is GFLOP/s or GB/s from the technique's ``cost`` and
``limit`` the matching machine limit.

Speed is measured here, never asserted in a test: this machine is shared and two-thread timings swing.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Callable

import numpy as np

from mllm_ref.oracle import registry


def time_call(fn: Callable[[], object], *, repeats: int = 5, min_batch: float = 0.05) -> float:
    """Median seconds per call of ``fn`` over ``repeats`` batches of at least ``min_batch`` seconds."""
    fn()  # warm-up (and JIT compilation)
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    calls = max(1, int(min_batch / once))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t0) / calls)
    return statistics.median(samples)


def machine_limits(quick: bool = False) -> dict[str, float]:
    """Measured limits: ``bandwidth_gbs`` (a copy of a 128 MB float64 array, bytes read plus bytes written per
    second, as STREAM counts them; far larger than the caches) and ``matmul_gflops`` (float32 1024 x 1024 matmul
    with NumPy's BLAS at its current thread count)."""
    n = (32 if quick else 128) * 2**20 // 8
    a, b = np.ones(n), np.empty(n)
    t = time_call(lambda: np.copyto(b, a), repeats=3 if quick else 5)
    m = np.ones((1024, 1024), dtype=np.float32)
    tm = time_call(lambda: m @ m, repeats=3 if quick else 5)
    return {"bandwidth_gbs": 2 * a.nbytes / t / 1e9, "matmul_gflops": 2 * 1024**3 / tm / 1e9}


#: Inputs smaller than this are replicated and cycled through, so that each call reads them from memory and not
#: from the last-level cache (32 MB here), as a decode step over a large model's many layers does.
COLD_BYTES = 96 * 2**20


def _arg_sets(kwargs: dict) -> list[dict]:
    size = sum(v.nbytes for v in kwargs.values() if isinstance(v, np.ndarray))
    copies = 1 if size == 0 or size >= COLD_BYTES else min(16, -(-COLD_BYTES // size))
    return [copy.deepcopy(kwargs) for _ in range(copies)]


def threads() -> str:
    """The thread counts in force, for the report."""
    import os
    import sys

    parts = [f"BLAS {os.environ.get('OPENBLAS_NUM_THREADS', 'default')}"]
    if "numba" in sys.modules:
        parts.append(f"numba {sys.modules['numba'].get_num_threads()}")
    if "torch" in sys.modules:
        parts.append(f"torch {sys.modules['torch'].get_num_threads()}")
    return ", ".join(parts)


def bench(
    technique_id: str | None = None,
    *,
    quick: bool = False,
    limits: dict[str, float] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Rows ``{id, impl, size, seconds, ratio_to_reference, achieved, limit, unit}``."""
    limits = machine_limits(quick) if limits is None else limits
    techniques = [registry.get(technique_id)] if technique_id else registry.all_techniques()
    rows = []
    for tech in techniques:
        for size, kwargs in tech.cases("bench"):
            impls = [("reference", tech.reference)]
            impls += [(b, fn) for b in registry.BACKENDS if (fn := tech.fast_path(b)) is not None]
            cost = tech.cost(kwargs) if tech.cost else None
            balance = limits["matmul_gflops"] / limits["bandwidth_gbs"]  # FLOPs per byte at the ridge point
            if cost and cost.get("flops", 0) >= balance * cost.get("bytes", 0):  # compute-bound: report GFLOP/s
                unit, amount, limit = "GFLOP/s", cost["flops"], limits["matmul_gflops"]
            elif cost:
                unit, amount, limit = "GB/s", cost["bytes"], limits["bandwidth_gbs"]
            else:
                unit, amount, limit = None, None, None
            ref_seconds = None
            for name, fn in impls:
                if progress:
                    progress(f"{tech.id} [{size}] {name}")
                sets = _arg_sets(kwargs)
                turn = [0]

                def call():
                    turn[0] = (turn[0] + 1) % len(sets)
                    return fn(**sets[turn[0]])

                seconds = time_call(call, repeats=3 if quick else 5, min_batch=0.02 if quick else 0.05)
                if name == "reference":
                    ref_seconds = seconds
                rows.append(
                    {
                        "id": tech.id,
                        "impl": name,
                        "size": size,
                        "seconds": seconds,
                        "ratio_to_reference": ref_seconds / seconds,
                        "achieved": amount / seconds / 1e9 if amount else None,
                        "limit": limit,
                        "unit": unit,
                    }
                )
    return rows


def format_rows(rows: list[dict], limits: dict[str, float]) -> str:
    """A plain-text table of bench rows, headed by the machine's limits."""
    out = [
        f"machine: memory {limits['bandwidth_gbs']:.1f} GB/s (copy), float32 matmul {limits['matmul_gflops']:.0f} GFLOP/s; "
        f"threads: {threads()}",
        f"{'technique':14s} {'size':18s} {'impl':10s} {'time':>10s} {'x ref':>7s} {'achieved':>16s} {'of limit':>8s}",
    ]
    for r in rows:
        t = r["seconds"]
        ts = f"{t * 1e3:.3f} ms" if t >= 1e-4 else f"{t * 1e6:.1f} us"
        ach = f"{r['achieved']:.2f} {r['unit']}" if r["achieved"] is not None else "-"
        frac = f"{r['achieved'] / r['limit']:.0%}" if r["achieved"] is not None else "-"
        out.append(f"{r['id']:14s} {r['size']:18s} {r['impl']:10s} {ts:>10s} {r['ratio_to_reference']:7.2f} {ach:>16s} {frac:>8s}")
    return "\n".join(out)
