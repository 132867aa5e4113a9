"""Tests of mllm_ref.nn.softmax: invariants, stability and input validation."""

import numpy as np
import pytest
from hypothesis import given, settings

from mllm_ref.nn import log_softmax, softmax
from mllm_ref.oracle import registry


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", [((1,), -1), ((3, 7), -1), ((5, 13, 31), 1), ((2, 257), 0)])
def test_sums_to_one_and_keeps_dtype(shape, axis, dtype):
    x = np.random.default_rng(0).standard_normal(shape).astype(dtype) * 5
    y = softmax(x, axis=axis)
    assert y.dtype == dtype and y.shape == x.shape
    assert np.all(y >= 0)
    np.testing.assert_allclose(y.sum(axis=axis), 1.0, rtol=0, atol=1e-6 if dtype == np.float32 else 1e-14)


def test_matches_float64_formula():
    x = np.random.default_rng(1).standard_normal((4, 9)) * 3
    e = np.exp(x)
    np.testing.assert_allclose(softmax(x), e / e.sum(-1, keepdims=True), rtol=1e-14)
    np.testing.assert_allclose(log_softmax(x), np.log(e / e.sum(-1, keepdims=True)), rtol=1e-13)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_stable_on_huge_logits(dtype):
    x = np.array([[1e4, 0.0, -1e4], [1e4, 1e4, -3.0]], dtype=dtype)
    y = softmax(x)
    np.testing.assert_array_equal(y, np.array([[1, 0, 0], [0.5, 0.5, 0]], dtype=dtype))
    big = np.array([3e38, -3e38, 3e38], dtype=np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        yb = softmax(big)
    np.testing.assert_array_equal(yb, [0.5, 0, 0.5])
    ls = log_softmax(x)
    assert np.all(np.isfinite(ls)) and ls[0, 0] == 0 and ls[0, 2] == -2e4


def test_shift_invariance():
    x = np.random.default_rng(2).standard_normal((3, 11))
    np.testing.assert_allclose(softmax(x + 123.0), softmax(x), rtol=1e-12)


def test_log_softmax_is_log_of_softmax():
    x = np.random.default_rng(3).standard_normal((2, 3, 5)).astype(np.float32)
    np.testing.assert_allclose(np.exp(log_softmax(x, axis=1)), softmax(x, axis=1), rtol=1e-6)
    assert log_softmax(x).dtype == np.float32


@pytest.mark.parametrize(
    "x,axis,exc,name",
    [
        (np.arange(6).reshape(2, 3), -1, TypeError, "x"),
        (np.array([1.0, np.nan]), -1, ValueError, "x"),
        (np.array([1.0, np.inf]), -1, ValueError, "x"),
        (np.ones((2, 3)), 2, ValueError, "axis"),
        (np.ones((2, 3)), 1.0, TypeError, "axis"),
        (np.float64(1.0), -1, ValueError, "x"),
        (np.ones((2, 0)), -1, ValueError, "x"),
    ],
)
def test_bad_input(x, axis, exc, name):
    with pytest.raises(exc, match=name):
        softmax(x, axis=axis)
    with pytest.raises(exc, match=name):
        log_softmax(x, axis=axis)


def test_registered_cases_are_finite_distributions():
    t = registry.get("nn.softmax")
    for _, kw in t.cases("test"):
        y = t.reference(**kw)
        assert np.all(np.isfinite(y))
        np.testing.assert_allclose(y.sum(axis=kw["axis"]), 1, atol=1e-5)
    assert t.cost(t.cases("bench")[0][1])["bytes"] > 0


@settings(max_examples=40, deadline=None)
@given(registry.get("nn.softmax").strategy())
def test_property_distribution(kw):
    y = softmax(**kw)
    assert y.dtype == kw["x"].dtype and np.all(y >= 0) and np.all(np.isfinite(y))
    np.testing.assert_allclose(y.sum(axis=kw["axis"]), 1, atol=1e-5)
