"""Tests of mllm_ref.nn.rmsnorm and mllm_ref.nn.layernorm."""

import numpy as np
import pytest
from hypothesis import given, settings

from mllm_ref.nn import layernorm, rmsnorm
from mllm_ref.oracle import registry


def _rms_formula(x, w, eps):
    x = x.astype(np.float64)
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * w.astype(np.float64)


def _ln_formula(x, w, b, eps):
    x = x.astype(np.float64)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w.astype(np.float64) + b.astype(np.float64)


@pytest.mark.parametrize("dtype,tol", [(np.float32, 2e-6), (np.float64, 1e-13)])
@pytest.mark.parametrize("shape", [(1,), (3, 7), (2, 5, 31)])
def test_rmsnorm_matches_formula(shape, dtype, tol):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    w = rng.standard_normal(shape[-1]).astype(dtype)
    y = rmsnorm(x, w, eps=1e-6)
    assert y.dtype == dtype and y.shape == x.shape
    np.testing.assert_allclose(y, _rms_formula(x, w, 1e-6), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,tol", [(np.float32, 5e-6), (np.float64, 1e-12)])
@pytest.mark.parametrize("shape", [(1,), (3, 7), (2, 5, 31)])
def test_layernorm_matches_formula(shape, dtype, tol):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    w = rng.standard_normal(shape[-1]).astype(dtype)
    b = rng.standard_normal(shape[-1]).astype(dtype)
    y = layernorm(x, w, b, eps=1e-5)
    assert y.dtype == dtype and y.shape == x.shape
    np.testing.assert_allclose(y, _ln_formula(x, w, b, 1e-5), rtol=tol, atol=tol)


def test_layernorm_normalises_and_is_stable_under_offset():
    rng = np.random.default_rng(2)
    d = 64
    noise = rng.standard_normal((4, d))
    ones, zeros = np.ones(d, np.float32), np.zeros(d, np.float32)
    y = layernorm((noise + 1e4).astype(np.float32), ones, zeros, eps=1e-5)
    # float32 rounding of the mean of values near 1e4 (ulp 1e-3) limits the accuracy to about 1e-3; a one-pass
    # variance (mean(x^2) - mean(x)^2) would lose everything here (1e8 - 1e8 in float32).
    np.testing.assert_allclose(y.mean(-1), 0, atol=5e-3)
    np.testing.assert_allclose(y.var(-1), 1, atol=1e-2)
    gold = _ln_formula((noise + 1e4).astype(np.float32), ones, zeros, 1e-5)
    np.testing.assert_allclose(y, gold, atol=5e-3)


def test_zero_vectors_give_zero_not_nan():
    x = np.zeros((2, 8), np.float32)
    assert np.all(rmsnorm(x, np.ones(8, np.float32)) == 0)
    b = np.full(8, 0.5, np.float32)
    np.testing.assert_array_equal(layernorm(x, np.ones(8, np.float32), b), np.broadcast_to(b, x.shape))


def test_rmsnorm_scale_invariance():
    x = np.random.default_rng(3).standard_normal((3, 16))
    w = np.ones(16)
    np.testing.assert_allclose(rmsnorm(7.5 * x, w, eps=1e-12), rmsnorm(x, w, eps=1e-12), rtol=1e-10)


def _bad_cases(fn):
    x = np.ones((2, 4), np.float32)
    w = np.ones(4, np.float32)
    extra = (np.zeros(4, np.float32),) if fn is layernorm else ()
    yield (x, np.ones(5, np.float32), *extra), {}, ValueError, "weight"
    yield (x, w.astype(np.float64), *extra), {}, TypeError, "weight"
    yield (x.astype(np.int32), w, *extra), {}, TypeError, "x"
    yield (np.full((2, 4), np.nan, np.float32), w, *extra), {}, ValueError, "x"
    yield (x, w.reshape(2, 2), *extra), {}, ValueError, "weight"
    yield (x, w, *extra), {"eps": 0.0}, ValueError, "eps"
    yield (x, w, *extra), {"eps": -1.0}, ValueError, "eps"
    if fn is layernorm:
        yield (x, w, np.zeros(3, np.float32)), {}, ValueError, "bias"
        yield (x, w, np.zeros(4, np.float64)), {}, TypeError, "bias"


@pytest.mark.parametrize("fn", [rmsnorm, layernorm])
def test_bad_input(fn):
    for args, kwargs, exc, name in _bad_cases(fn):
        with pytest.raises(exc, match=name):
            fn(*args, **kwargs)


@settings(max_examples=30, deadline=None)
@given(registry.get("nn.rmsnorm").strategy())
def test_property_rmsnorm(kw):
    y = rmsnorm(**kw)
    assert y.dtype == kw["x"].dtype and np.all(np.isfinite(y))
    tol = 1e-4 if y.dtype == np.float32 else 1e-10
    gold = _rms_formula(kw["x"], kw["weight"], kw["eps"])
    np.testing.assert_allclose(y, gold, rtol=tol, atol=tol * (1 + np.abs(gold).max()))


@settings(max_examples=30, deadline=None)
@given(registry.get("nn.layernorm").strategy())
def test_property_layernorm(kw):
    y = layernorm(**kw)
    assert y.dtype == kw["x"].dtype and np.all(np.isfinite(y))
