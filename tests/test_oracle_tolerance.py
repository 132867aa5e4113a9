"""The tolerance policy itself: what it accepts, what it must reject, and the messages it writes."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from strategies import float_arrays, nested
from mllm_ref.oracle.tolerance import C, K, Verdict, bound, compare_exact, compare_tolerance, flatten

F32 = np.finfo(np.float32)


def _cast(tree, dtype):
    """``tree`` (an output: leaf, tuple or dict) with every array cast to ``dtype``."""
    if isinstance(tree, tuple):
        return tuple(_cast(x, dtype) for x in tree)
    if isinstance(tree, dict):
        return {k: _cast(v, dtype) for k, v in tree.items()}
    return tree.astype(dtype)


# ---------------------------------------------------------------- properties


@given(nested(float_arrays(np.float64)))
def test_the_naive_baseline_itself_always_passes(gold):
    baseline = _cast(gold, np.float32)
    assert compare_tolerance(gold, baseline, baseline).passed


@given(float_arrays(np.float64, min_exponent=-100, max_exponent=100, nonzero=True))
def test_all_zeros_never_pass_whatever_the_magnitude(gold):
    """KernelBench #165: an absolute tolerance lets zeros pass on tiny outputs; a scaled floor does not.
    (Magnitudes stay within float32's normal range: below it the float32 baseline is itself zero.)"""
    v = compare_tolerance(gold, gold.astype(np.float32), np.zeros(gold.shape, np.float32))
    assert not v.passed
    assert v.max_rel_error == 1.0


@given(float_arrays(np.float64, nonzero=True), st.integers(1, 8))
def test_a_few_ulps_of_the_largest_output_pass_even_when_the_baseline_is_exact(gold, ulps):
    """flash-attention #1231: with an exact baseline, K x 0 must not demand bit-exactness."""
    gold = gold.astype(np.float32).astype(np.float64)  # representable: the baseline's error is exactly 0
    scale = np.abs(gold).max()
    got = (gold + ulps * F32.eps * scale).astype(np.float32)
    assert bound(gold, gold.astype(np.float32), np.float32).baseline_error == 0.0
    assert compare_tolerance(gold, gold.astype(np.float32), got).passed


@given(float_arrays(np.float64, nonzero=True), st.floats(1e-4, 1e-1))
def test_a_relative_error_of_float16_size_on_the_largest_element_fails(gold, rel):
    i = np.unravel_index(np.argmax(np.abs(gold)), gold.shape)
    got = gold.copy()
    got[i] *= 1 + rel
    v = compare_tolerance(gold, gold.astype(np.float32), got.astype(np.float32))
    assert not v.passed and v.mismatches >= 1


@given(float_arrays(np.float64, min_exponent=-40, max_exponent=40), st.integers(-40, 40), st.integers(0, 2**32 - 1))
def test_the_verdict_does_not_depend_on_the_units(gold, shift, seed):
    """Scaling gold, baseline and answer by a power of two (exact in floating point) changes nothing."""
    rng = np.random.default_rng(seed)
    baseline = gold.astype(np.float32)
    got = (gold * (1 + rng.normal(0, 4e-6, gold.shape))).astype(np.float32)  # near the bound: some pass, some fail
    s = 2.0**shift
    before = compare_tolerance(gold, baseline, got)
    after = compare_tolerance(gold * s, (baseline * s).astype(np.float32), (got * s).astype(np.float32))
    assert (before.passed, before.mismatches) == (after.passed, after.mismatches)


# ---------------------------------------------------------------- the constants and the bound


def test_the_bound_is_K_times_the_baseline_error_plus_a_scaled_floor():
    gold = np.array([1.0, -3.0, 0.5])
    baseline = np.array([1.0, -3.0, 0.5 + 2**-20], np.float32)
    perturbed = gold + [0.0, 2**-19, 0.0]
    b = bound(gold, baseline, np.float32, perturbed)
    assert (b.naive_error, b.perturbation_error, b.baseline_error) == (2**-20, 2**-19, 2**-19)
    assert b.floor == pytest.approx(C * F32.eps * 3.0 + F32.tiny)
    assert b.allowed == pytest.approx(K * 2**-19 + b.floor)
    # just inside passes, just outside fails
    inside, outside = (gold + 0.99 * b.allowed).astype(np.float32), np.float32(gold + 1.01 * b.allowed)
    assert compare_tolerance(gold, baseline, inside, perturbed=perturbed).passed is True
    assert compare_tolerance(gold, baseline, outside, perturbed=perturbed).passed is False


def test_a_float64_naive_error_is_estimated_from_the_float32_run():
    gold = np.array([1.0, 2.0])
    float32_run = np.array([1.0, 2.0 + 2**-20], np.float32)
    b = bound(gold, gold, np.float64, float32_run=float32_run)
    assert b.naive_error == pytest.approx(2**-20 * np.finfo(np.float64).eps / F32.eps)
    assert bound(gold, gold, np.float64).naive_error == 0.0


def test_float16_rounding_of_every_element_fails_at_float32():
    gold = np.random.default_rng(0).standard_normal((4, 33))
    v = compare_tolerance(gold, gold.astype(np.float32), gold.astype(np.float16).astype(np.float32))
    assert not v.passed and v.mismatches > gold.size // 2


def test_an_all_zero_gold_accepts_zeros_only():
    gold = np.zeros(5)
    assert compare_tolerance(gold, gold.astype(np.float32), np.zeros(5, np.float32)).passed
    assert not compare_tolerance(gold, gold.astype(np.float32), np.full(5, 1e-30, np.float32)).passed


def test_float64_answers_are_held_to_the_floor_alone():
    gold = np.linspace(-1, 1, 7)
    assert compare_tolerance(gold, gold, gold + 4 * np.finfo(np.float64).eps).passed
    assert not compare_tolerance(gold, gold, gold + 1e-12).passed


# ---------------------------------------------------------------- structure, dtypes, NaN and infinity


@dataclass
class _Pair:
    values: np.ndarray
    index: np.ndarray


def test_nested_outputs_are_judged_leaf_by_leaf_with_their_names():
    gold = {"a": (np.ones(3), np.arange(3)), "b": _Pair(np.full(2, 2.0), np.array([1, 0]))}
    base = {"a": (np.ones(3, np.float32), np.arange(3)), "b": _Pair(np.full(2, 2.0, np.float32), np.array([1, 0]))}
    assert [p for p, _ in flatten(gold)] == ["out['a'][0]", "out['a'][1]", "out['b'].values", "out['b'].index"]
    assert compare_tolerance(gold, base, base).passed
    wrong_index = {"a": base["a"], "b": _Pair(base["b"].values, np.array([0, 1]))}
    v = compare_tolerance(gold, base, wrong_index)
    assert not v.passed and "out['b'].index: 2 of 2 elements differ (exact comparison)" in v.message
    v = compare_tolerance(gold, base, {"a": base["a"]})
    assert not v.passed and "structure differs" in v.message


@pytest.mark.parametrize(
    "got, words",
    [
        (np.ones(4, np.float32), "shape (4,), expected (3,)"),
        (np.ones(3, np.float64), "dtype float64, expected float32"),
        (np.ones(3, np.int32), "dtype int32, expected float32"),
        ((np.ones(3, np.float32),), "structure differs"),
        (None, "shape (), expected (3,)"),
    ],
    ids=["shape", "precision", "kind", "structure", "none"],
)
def test_shape_dtype_and_structure_mismatches_fail_with_a_message(got, words):
    gold = np.ones(3)
    v = compare_tolerance(gold, gold.astype(np.float32), got)
    assert not v.passed and words in v.message


def test_nan_and_infinity_must_sit_where_the_reference_has_them():
    gold = np.array([1.0, np.inf, -np.inf, np.nan])
    base = gold.astype(np.float32)
    assert compare_tolerance(gold, base, base.copy()).passed
    for i, value in [(0, np.nan), (1, -np.inf), (3, 0.0), (0, np.inf)]:
        got = base.copy()
        got[i] = value
        v = compare_tolerance(gold, base, got)
        assert not v.passed and "NaN or infinity" in v.message and f"({i},)" in v.message


def test_the_message_shows_count_first_indices_both_values_and_the_bound():
    gold = np.arange(1.0, 11.0)
    got = gold.astype(np.float32)
    got[[2, 7]] = [0.0, 99.0]
    v = compare_tolerance(gold, gold.astype(np.float32), got)
    assert "2 of 10 elements exceed the allowed error" in v.message
    assert "max abs error 91 at (7,): got 99, expected 8" in v.message
    assert "(2,): got 0, expected 3; (7,): got 99, expected 8" in v.message
    assert "(= 4 x baseline error 0 + noise floor 1.91e-05; naive float32 run 0, one-ulp input change 0)" in v.message
    assert v.mismatches == 2 and v.max_abs_error == 91.0


# ---------------------------------------------------------------- exact mode and the verdict


def test_exact_mode_is_bit_exact_and_needs_the_same_dtype_kind():
    want = np.array([3, 1, 4])
    assert compare_exact(want, want.astype(np.int32)).passed  # same kind, other width
    assert not compare_exact(want, want.astype(np.float64)).passed
    v = compare_exact(want, np.array([3, 4, 1]))
    assert not v.passed and v.mismatches == 2 and "(1,): got 4, expected 1" in v.message
    assert compare_exact(np.array([np.nan, 1.0]), np.array([np.nan, 1.0])).passed
    assert not compare_exact(np.array([0.1]), np.array([np.nextafter(0.1, 1)])).passed


def test_verdicts_merge_and_serialise_without_infinities():
    ok = Verdict(True, 2, 1e-7, 1e-7, 0, "")
    bad = Verdict.failure("case 'x', the implementation raised RuntimeError: boom")
    merged = ok.merge(bad)
    assert (merged.passed, merged.cases, merged.max_abs_error) == (False, 3, math.inf)
    data = merged.to_json()
    assert data["max_abs_error"] is None and data["max_rel_error"] is None
    json.dumps(data, allow_nan=False)
