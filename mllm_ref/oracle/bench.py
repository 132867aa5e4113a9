"""Benchmarks: the reference against its fast paths, measured in one run, against this machine's limits.

First the machine's limits are measured (:func:`mllm_ref.oracle.machine.machine_limits`); then every registered
technique's ``bench`` cases are timed with the reference and each fast path that exists, one after the other in
this process. Method (``PERF-NOTES.md``):

- a warm-up call first (it also compiles a Numba kernel), then the median of ``repeats`` (5) batches of at least
  ``min_batch`` seconds (50 ms) each;
- inputs smaller than :data:`COLD_BYTES` are replicated and cycled through, so every call reads them from memory
  rather than from the cache, as a decode step over a large model's many layers does;
- ``ratio_to_reference`` is the reference's time over the implementation's, both measured here and now, the only
  comparison that survives a shared machine; ``achieved`` is GFLOP/s or GB/s from the technique's ``cost``, and
  ``limit`` the matching machine limit: GFLOP/s when the case does more FLOPs per byte than the machine's ridge
  point (matmul GFLOP/s over bandwidth), GB/s otherwise;
- ``other_cpu`` is how many cores other processes kept busy meanwhile: a row above about 0.05 shared the machine.

Speed is measured here, never asserted in a test: this machine is shared and two-thread timings swing by 2x.
Numba and torch are imported only by the fast paths themselves, so this module needs NumPy only.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Callable

import numpy as np

from mllm_ref.oracle import registry
from mllm_ref.oracle.machine import OtherLoad, machine_limits, threads

#: Inputs smaller than this are replicated and cycled through, so that each call reads them from memory and not
#: from the last-level cache (32 MB here).
COLD_BYTES = 96 * 2**20


def time_call(fn: Callable[[], object], *, repeats: int = 5, min_batch: float = 0.05) -> tuple[float, float | None]:
    """``(seconds, other_cpu)``: median seconds per call of ``fn`` over ``repeats`` batches of at least
    ``min_batch`` seconds each, after a warm-up call; and the cores other processes used meanwhile."""
    fn()  # warm-up (and JIT compilation)
    t0 = time.perf_counter()
    fn()
    calls = max(1, int(min_batch / max(time.perf_counter() - t0, 1e-7)))
    load = OtherLoad()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t0) / calls)
    return statistics.median(samples), load.cores()


def _arg_sets(kwargs: dict) -> list[dict]:
    """Enough copies of the arguments to exceed :data:`COLD_BYTES` together (at most 16)."""
    size = sum(v.nbytes for v in kwargs.values() if isinstance(v, np.ndarray))
    copies = 1 if size == 0 or size >= COLD_BYTES else min(16, -(-COLD_BYTES // size))
    return [copy.deepcopy(kwargs) for _ in range(copies)]


def _cycling(fn: Callable, sets: list[dict]) -> Callable[[], object]:
    """A zero-argument call of ``fn`` on the next argument set each time."""
    turn = [0]

    def call():
        turn[0] = (turn[0] + 1) % len(sets)
        return fn(**sets[turn[0]])

    return call


def _unit(cost: dict | None, limits: dict) -> tuple[str | None, float | None, float | None]:
    """``(unit, amount per call, limit)`` for a case's cost: FLOPs against matmul speed when compute-bound, bytes
    against bandwidth otherwise, nothing without a cost."""
    if not cost:
        return None, None, None
    ridge = limits["matmul_gflops"] / limits["bandwidth_gbs"]  # FLOPs per byte where the two limits meet
    if cost.get("flops", 0.0) >= ridge * cost.get("bytes", 0.0):
        return "GFLOP/s", cost["flops"], limits["matmul_gflops"]
    return "GB/s", cost["bytes"], limits["bandwidth_gbs"]


def bench(
    technique_id: str | None = None,
    *,
    quick: bool = False,
    limits: dict | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Time one technique (or all) on its bench cases: rows ``{id, impl, size, seconds, ratio_to_reference,
    achieved, limit, unit, other_cpu}``. ``quick`` takes 10 ms batches instead of 50 ms (a smoke run)."""
    limits = machine_limits(quick) if limits is None else limits
    techniques = [registry.get(technique_id)] if technique_id else registry.all_techniques()
    rows = []
    for tech in techniques:
        impls = [("reference", tech.reference)]
        impls += [(b, fn) for b in registry.BACKENDS if (fn := tech.fast_path(b)) is not None]
        for size, kwargs in tech.cases("bench"):
            unit, amount, limit = _unit(tech.cost(kwargs) if tech.cost else None, limits)
            sets = _arg_sets(kwargs)
            ref_seconds = None
            for name, fn in impls:
                if progress:
                    progress(f"{tech.id} [{size}] {name}")
                seconds, other = time_call(_cycling(fn, sets), min_batch=0.01 if quick else 0.05)
                ref_seconds = seconds if ref_seconds is None else ref_seconds
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
                        "other_cpu": other,
                    }
                )
    return rows


def format_rows(rows: list[dict], limits: dict) -> str:
    """A plain-text table of bench rows, headed by the machine's limits."""
    out = [
        f"machine: memory {limits['bandwidth_gbs']:.1f} GB/s (copy), float32 matmul {limits['matmul_gflops']:.0f} "
        f"GFLOP/s; threads: {threads()}",
        f"{'technique':14s} {'size':18s} {'impl':10s} {'time':>10s} {'x ref':>7s} {'achieved':>16s} {'of limit':>8s}"
        f" {'other cpu':>9s}",
    ]
    for r in rows:
        t = r["seconds"]
        ts = f"{t * 1e3:.3f} ms" if t >= 1e-4 else f"{t * 1e6:.1f} us"
        ach = f"{r['achieved']:.2f} {r['unit']}" if r["achieved"] is not None else "-"
        frac = f"{r['achieved'] / r['limit']:.0%}" if r["achieved"] is not None else "-"
        other = f"{r['other_cpu']:.2f}" if r["other_cpu"] is not None else "-"
        out.append(
            f"{r['id']:14s} {r['size']:18s} {r['impl']:10s} {ts:>10s} {r['ratio_to_reference']:7.2f} {ach:>16s} "
            f"{frac:>8s} {other:>9s}"
        )
    out.append("x ref: reference time / this time, same run. other cpu: cores used by other processes meanwhile.")
    return "\n".join(out)
