"""The bench's bookkeeping: timing method, cold-cache copies, units, ratios and the machine's limits.

Speed itself is never asserted (the machine is shared); only that the numbers are consistent with each other.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from mllm_ref.oracle import bench as bench_module
from mllm_ref.oracle.bench import _arg_sets, _unit, bench, format_rows, time_call
from mllm_ref.oracle.machine import OtherLoad, machine_limits
from mllm_ref.oracle.registry import Technique

LIMITS = {"bandwidth_gbs": 40.0, "matmul_gflops": 200.0}  # ridge point: 5 FLOPs per byte


def add_one(x):
    """``x + 1``."""
    return x + 1


def add_one_slowly(x):
    time.sleep(0.002)
    return x + 1


class WithFastPath(Technique):
    """A test technique whose "numba fast path" is given here instead of found by its module path."""

    def fast_path(self, backend):
        return add_one_slowly if backend == "numba" else None


@pytest.fixture
def adding(scratch_registry):
    scratch_registry(
        WithFastPath(
            "nn.test_add_one", add_one, lambda size, rng: {"x": rng.standard_normal(1000)}, "a test fixture",
            bench_sizes=("bench",), cost=lambda kw: {"flops": kw["x"].size, "bytes": 2 * kw["x"].nbytes},
        )
    )


def test_time_call_warms_up_then_takes_the_median_of_batches():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.001)

    seconds, other = time_call(fn, repeats=5, min_batch=0.01)
    assert 0.001 <= seconds < 0.02
    assert len(calls) >= 2 + 5  # warm-up, calibration, at least one call per batch
    assert other is None or other >= 0


def test_small_inputs_are_replicated_to_leave_the_cache():
    kwargs = {"x": np.arange(1000.0), "k": 3}
    sets = _arg_sets(kwargs)
    assert len(sets) == 16
    assert all(np.array_equal(s["x"], kwargs["x"]) and s["x"] is not kwargs["x"] and s["k"] == 3 for s in sets)
    assert len(_arg_sets({"k": 3})) == 1


@pytest.mark.parametrize(
    "cost, unit",
    [({"flops": 1e9, "bytes": 1e6}, "GFLOP/s"), ({"flops": 1e6, "bytes": 1e6}, "GB/s"), (None, None)],
)
def test_the_unit_follows_the_ridge_point(cost, unit):
    got_unit, amount, limit = _unit(cost, LIMITS)
    assert got_unit == unit
    if unit == "GFLOP/s":
        assert (amount, limit) == (1e9, 200.0)
    elif unit == "GB/s":
        assert (amount, limit) == (1e6, 40.0)


def test_rows_time_every_implementation_against_the_reference_of_the_same_run(adding, monkeypatch):
    times = iter([(2e-6, 0.0), (4e-6, 0.5)])  # (seconds, other_cpu) of the reference, then of the fast path

    def fake_time_call(fn, min_batch):
        fn()
        return next(times)

    monkeypatch.setattr(bench_module, "time_call", fake_time_call)
    progress = []
    rows = bench("nn.test_add_one", limits=LIMITS, progress=progress.append)
    assert [(r["impl"], r["size"]) for r in rows] == [("reference", "bench"), ("numba", "bench")]
    ref, fast = rows
    assert ref["ratio_to_reference"] == 1.0 and fast["ratio_to_reference"] == 0.5
    assert fast["unit"] == "GB/s" and fast["limit"] == 40.0
    assert fast["achieved"] == pytest.approx(16000 / 4e-6 / 1e9)
    assert fast["other_cpu"] == 0.5
    assert progress == ["nn.test_add_one [bench] reference", "nn.test_add_one [bench] numba"]
    table = format_rows(rows, LIMITS)
    assert "memory 40.0 GB/s" in table and "0.50" in table and "nn.test_add_one" in table



def test_a_real_run_is_self_consistent(adding):
    rows = bench("nn.test_add_one", quick=True, limits=LIMITS)
    ref, fast = rows
    assert fast["seconds"] > 0.002  # the sleeping version
    assert fast["ratio_to_reference"] == pytest.approx(ref["seconds"] / fast["seconds"])


def test_machine_limits_are_measured():
    limits = machine_limits(quick=True)
    assert 1 < limits["bandwidth_gbs"] < 2000
    assert 1 < limits["matmul_gflops"] < 100000
    load = OtherLoad()
    sum(range(100000))
    cores = load.cores()
    assert cores is None or cores >= 0
