"""Latency (``system.latency``): TTFT + (N - 1) TPOT, throughput, prefill share, roofline estimates."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mllm_ref.system import specs
from mllm_ref.system.complexity import Cost, decode_step_cost, forward_cost
from mllm_ref.system.latency import (
    estimate_request,
    estimate_stage_time,
    latency,
    prefill_share,
    tokens_per_second,
)


def test_latency_by_hand():
    assert latency(0.5, 0.1, 11) == pytest.approx(1.5)
    assert latency(0.5, 0.1, 11, convention="n") == pytest.approx(1.6)
    assert latency(0.5, 0.1, 1) == 0.5  # the prefill yields the only token
    out = latency(np.array([0.5, 1.0]), np.array([0.1, 0.2]), np.array([11, 3]))
    np.testing.assert_allclose(out, [1.5, 1.4])
    assert out.dtype == np.float64
    f32 = latency(np.array([0.5], np.float32), np.array([0.25], np.float32), np.array([3]))
    assert f32.dtype == np.float32 and f32[0] == 1.0


def test_latency_broadcasts():
    out = latency(0.2, np.array([0.01, 0.02]), np.array([[1], [101]]))
    np.testing.assert_allclose(out, [[0.2, 0.2], [1.2, 2.2]])
    assert latency(np.array([0.5], np.float32), 0.25, 3).dtype == np.float32  # a Python float takes the array's dtype


def test_throughput_and_share():
    assert tokens_per_second(0.05) == pytest.approx(20)
    np.testing.assert_allclose(tokens_per_second(np.array([0.5, 0.25])), [2, 4])
    assert prefill_share(0.5, 0.1, 11) == pytest.approx(0.5 / 1.5)
    assert prefill_share(0.5, 0.1, 11, convention="n") == pytest.approx(0.5 / 1.6)
    assert prefill_share(0.0, 0.0, 5) == 0.0  # nothing took any time
    np.testing.assert_allclose(prefill_share(np.array([1.0, 0.0]), np.array([0.0, 1.0]), np.array([4, 4])), [1, 0])


def test_stage_time_is_the_roofline():
    c = Cost(flops=1e12, bytes_weights=1e9)
    assert estimate_stage_time(c, peak_flops=1e14, bandwidth=1e10) == pytest.approx(0.1)  # memory-bound
    assert estimate_stage_time(c, peak_flops=1e12, bandwidth=1e12) == pytest.approx(1.0)  # compute-bound
    many = estimate_stage_time(c, np.array([1e12, 1e14]), 1e10)
    np.testing.assert_allclose(many, [1.0, 0.1])


def test_estimate_request_times_every_step():
    spec = specs.LLAVA_15_7B
    peak, bw = 400e12, 2e12
    est = estimate_request(spec, None, 32, 9, peak_flops=peak, bandwidth=bw)
    costs = forward_cost(spec, None, 32, 9)
    ttft = sum(estimate_stage_time(costs[k], peak, bw) for k in ("encoder", "connector", "prefill"))
    assert est.ttft == pytest.approx(ttft, rel=1e-12)
    steps = [float(estimate_stage_time(decode_step_cost(spec, 608 + j), peak, bw)) for j in range(8)]
    assert est.tpot == pytest.approx(np.mean(steps), rel=1e-12)
    assert est.latency == pytest.approx(est.ttft + 8 * est.tpot, rel=1e-12)
    assert est.latency == pytest.approx(latency(est.ttft, est.tpot, 9), rel=1e-12)
    assert est.tokens_per_second == pytest.approx(1 / est.tpot) and 0 < est.prefill_share < 1
    # decode is memory-bound: TPOT is about the weights over the bandwidth; the prefill is compute-bound
    assert est.tpot == pytest.approx(decode_step_cost(spec, 612).bytes / bw, rel=1e-3)
    assert est.times["prefill"] == pytest.approx(costs["prefill"].flops / peak)
    one = estimate_request(spec, None, 32, 1, peak_flops=peak, bandwidth=bw)
    assert one.tpot == 0 and one.latency == one.ttft and one.tokens_per_second == float("inf")


def test_estimate_request_where_the_bound_changes():
    """A machine whose decode steps turn from memory- to compute-bound as the cache grows: the split sum still
    matches timing every step on its own."""
    spec = specs.QWEN2_VL_2B
    step0 = decode_step_cost(spec, 288)
    peak = 1e9
    bw = step0.bytes / (step0.flops / peak) * 0.9995  # step 0 just memory-bound, later steps compute-bound
    est = estimate_request(spec, None, 32, 200, peak_flops=peak, bandwidth=bw)
    steps = [float(estimate_stage_time(decode_step_cost(spec, 288 + j), peak, bw)) for j in range(199)]
    kinds = {decode_step_cost(spec, 288 + j).flops / peak >= decode_step_cost(spec, 288 + j).bytes / bw
             for j in range(199)}  # fmt: skip
    assert kinds == {True, False}
    assert est.times["decode"] == pytest.approx(sum(steps), rel=1e-12)


def test_bad_input_names_the_argument():
    cases = [
        (ValueError, "convention", lambda: latency(1.0, 1.0, 1, convention="n+1")),
        (TypeError, "convention", lambda: latency(1.0, 1.0, 1, convention=None)),
        (ValueError, "ttft", lambda: latency(np.array([-1.0]), np.array([1.0]), np.array([1]))),
        (ValueError, "tpot", lambda: latency(1.0, float("nan"), 1)),
        (TypeError, "ttft", lambda: latency(np.array([1]), np.array([1.0]), np.array([1]))),
        (TypeError, "ttft", lambda: latency("1", 1.0, 1)),
        (TypeError, "tpot", lambda: latency(np.array([1.0]), np.array([1.0], np.float32), np.array([1]))),
        (ValueError, "n_tokens", lambda: latency(1.0, 1.0, 0)),
        (TypeError, "n_tokens", lambda: latency(1.0, 1.0, 2.0)),
        (TypeError, "n_tokens", lambda: latency(1.0, 1.0, np.array([2.0]))),
        (ValueError, "n_tokens", lambda: latency(np.ones(3), np.ones(3), np.ones(4, int))),
        (ValueError, "n_tokens", lambda: latency(np.ones(1, np.float16), np.ones(1, np.float16), 10**6)),
        (ValueError, "tpot", lambda: tokens_per_second(0.0)),
        (TypeError, "cost", lambda: estimate_stage_time(1e9, 1e12, 1e9)),
        (ValueError, "peak_flops", lambda: estimate_stage_time(Cost(1.0), 0.0, 1e9)),
        (ValueError, "bandwidth", lambda: estimate_stage_time(Cost(1.0), 1e9, np.array([1e9, -1.0]))),
        (ValueError, "bandwidth", lambda: estimate_request(specs.LLAVA_15_7B, None, 1, 2, peak_flops=1e12,
                                                           bandwidth=0.0)),  # fmt: skip
        (ValueError, "n_generated", lambda: estimate_request(specs.LLAVA_15_7B, None, 1, 0, peak_flops=1e12,
                                                             bandwidth=1e9)),  # fmt: skip
    ]
    for exc, name, call in cases:
        with pytest.raises(exc, match=rf"(?<!\w){name}(?!\w)"):
            call()


@given(st.floats(0, 10), st.floats(0, 1), st.integers(1, 10**6))
def test_latency_monotone_in_tokens(ttft, tpot, n):
    a, b = latency(ttft, tpot, n), latency(ttft, tpot, n + 1)
    assert b >= a and b - a == pytest.approx(tpot, abs=1e-9 * max(1.0, b))
    assert latency(ttft, tpot, n, "n") - a == pytest.approx(tpot, abs=1e-9 * max(1.0, b))
    assert 0 <= prefill_share(ttft, tpot, n) <= 1
