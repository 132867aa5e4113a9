"""Tests of mllm_ref.nn.rope: rotation invariants, relative positions, sections, validation."""

import numpy as np
import pytest
from hypothesis import given, settings

from mllm_ref.nn import rope, rope_angles
from mllm_ref.oracle import registry


def _rng(seed=0):
    return np.random.default_rng(seed)


def test_preserves_norms_of_every_pair():
    x = _rng().standard_normal((2, 3, 9, 16))
    y = rope(x, np.arange(9) * 37)
    half = 8
    np.testing.assert_allclose(
        x[..., :half] ** 2 + x[..., half:] ** 2, y[..., :half] ** 2 + y[..., half:] ** 2, rtol=1e-12
    )
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_position_zero_is_identity(dtype):
    x = _rng(1).standard_normal((4, 5, 6)).astype(dtype)
    y = rope(x, np.zeros(5, dtype=np.int64))
    assert y.dtype == dtype
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(rope(x, np.zeros((5, 3), dtype=np.int32)), x)


def test_relative_property():
    rng = _rng(2)
    q = rng.standard_normal((1, 32))
    k = rng.standard_normal((1, 32))
    for p, r, shift in [(5, 2, 100), (0, 17, 3), (1000, 999, 4096)]:
        a = rope(q, [p]) @ rope(k, [r]).T
        b = rope(q, [p + shift]) @ rope(k, [r + shift]).T
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_matches_complex_rotation():
    # Pair i = (x_i, x_{i+d/2}) as the complex number x_i + i x_{i+d/2}, multiplied by exp(i p theta^(-2i/d)).
    x = _rng(3).standard_normal((7, 10))
    pos = np.arange(7) * 3
    y = rope(x, pos, theta=500.0)
    z = (x[:, :5] + 1j * x[:, 5:]) * np.exp(1j * pos[:, None] * 500.0 ** (-2 * np.arange(5) / 10))
    np.testing.assert_allclose(y, np.concatenate([z.real, z.imag], axis=-1), rtol=1e-12, atol=1e-12)


def test_angles():
    ang = rope_angles(np.array([0, 1, 4]), 8, theta=10000.0)
    assert ang.shape == (3, 4) and ang.dtype == np.float64
    np.testing.assert_allclose(ang[1], 10000.0 ** (-np.arange(4) / 4))
    np.testing.assert_allclose(ang[2], 4 * ang[1])


def test_two_d_sections():
    rng = _rng(4)
    d, half = 12, 6  # two sections of 3 frequency pairs: pairs 0-2 follow the row, pairs 3-5 the column
    x = rng.standard_normal((2, 6, d))
    rows, cols = np.meshgrid(np.arange(2), np.arange(3), indexing="ij")
    pos = np.stack([rows.ravel(), cols.ravel()], axis=1)
    y = rope(x, pos)
    ang = rope_angles(pos, d)
    freqs = 10000.0 ** (-2 * np.arange(half) / d)
    np.testing.assert_allclose(ang[:, :3], pos[:, :1] * freqs[:3])
    np.testing.assert_allclose(ang[:, 3:], pos[:, 1:] * freqs[3:])
    # Changing the column leaves the row section untouched, and the other way round.
    pos2 = pos.copy()
    pos2[:, 1] += 5
    y2 = rope(x, pos2)
    row_dims = np.r_[0:3, 6:9]
    np.testing.assert_array_equal(y2[..., row_dims], y[..., row_dims])
    assert not np.allclose(y2[..., 3:6], y[..., 3:6])
    # Equal coordinates in every section give plain 1-D RoPE (a text token under M-RoPE).
    p1 = np.array([0, 3, 9, 2, 7, 1])
    for sections in (1, 2, 3):
        np.testing.assert_allclose(rope(x, np.repeat(p1[:, None], sections, axis=1)), rope(x, p1), rtol=1e-14)


def test_large_positions_are_accurate():
    x = np.ones((3, 64), np.float32)
    pos = np.array([4090, 100000, 2**20])
    y = rope(x, pos)
    gold = rope(x.astype(np.float64), pos)
    np.testing.assert_allclose(y, gold, atol=1e-6)


@pytest.mark.parametrize(
    "x,positions,exc,name",
    [
        (np.ones((3, 5)), np.arange(3), ValueError, "even"),
        (np.ones((3, 4)), np.arange(4), ValueError, "positions"),
        (np.ones((3, 4)), np.arange(3.0), TypeError, "positions"),
        (np.ones((3, 4)), np.array([0, -1, 2]), ValueError, "positions"),
        (np.ones((3, 8)), np.zeros((3, 3), np.int64), ValueError, "sections"),
        (np.ones((3, 4)), np.zeros((3, 1, 1), np.int64), ValueError, "positions"),
        (np.ones(4), np.arange(1), ValueError, "x"),
        (np.ones((3, 4), np.int64), np.arange(3), TypeError, "x"),
        (np.full((3, 4), np.nan), np.arange(3), ValueError, "x"),
    ],
)
def test_bad_input(x, positions, exc, name):
    with pytest.raises(exc, match=name):
        rope(x, positions)


def test_bad_theta():
    with pytest.raises(ValueError, match="theta"):
        rope(np.ones((2, 4)), np.arange(2), theta=0.0)


@settings(max_examples=40, deadline=None)
@given(registry.get("nn.rope").strategy())
def test_property_norms(kw):
    y = rope(**kw)
    x = kw["x"]
    assert y.dtype == x.dtype and y.shape == x.shape
    tol = 1e-5 if x.dtype == np.float32 else 1e-12
    n0 = np.linalg.norm(x.astype(np.float64), axis=-1)
    np.testing.assert_allclose(np.linalg.norm(y.astype(np.float64), axis=-1), n0, rtol=tol, atol=tol)
