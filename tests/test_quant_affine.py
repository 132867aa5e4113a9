"""The affine quantizer (quant.affine): the error bound, packing, rounding, granularity and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mllm_ref.quant.affine import code_range, dequantize, pack, packed_length, quantize, unpack

GRANULARITIES = [(None, None), (1, None), (1, 4), (0, 3)]  # per tensor, per channel, per group, groups on axis 0


@given(st.integers(0, 2**32 - 1), st.integers(2, 8), st.sampled_from(GRANULARITIES), st.booleans(),
       st.sampled_from(["integer", "float"]), st.integers(-20, 20), st.sampled_from([np.float32, np.float64]))
def test_every_number_inside_the_range_is_within_half_a_step(seed, bits, gran, symmetric, zp, e, dtype):
    if symmetric and zp == "float":
        zp = "integer"
    axis, g = gran
    rng = np.random.default_rng(seed)
    x = ((rng.standard_normal((6, 8)) + rng.normal(0, 2, 8)) * 2.0**e).astype(dtype)
    codes, scale, zero = quantize(x, bits, symmetric=symmetric, axis=axis, group_size=g, zero_point=zp)
    xh = dequantize(codes, scale, zero, axis=axis, group_size=g)
    assert xh.dtype == x.dtype and codes.shape == x.shape
    qmin, qmax = code_range(bits, symmetric)
    assert codes.min() >= qmin and codes.max() <= qmax
    if axis is None:
        step = np.broadcast_to(scale, x.shape)
    else:
        step = np.repeat(scale, x.shape[axis] if g is None else g, axis=axis)
    err = np.abs(xh.astype(np.float64) - x.astype(np.float64))
    ulp = np.finfo(dtype).eps * 4 * np.maximum(np.abs(x.astype(np.float64)), step)
    if zp == "integer" and not symmetric:  # the docstring's exception: the far end may round one step past qmax
        zg = zero.astype(np.float64) if axis is None else np.repeat(zero, x.shape[axis] if g is None else g, axis=axis)
        inside = x.astype(np.float64) <= step * (qmax - zg)
        assert np.all(err[inside] <= step[inside] / 2 + ulp[inside])
        assert np.all(err <= step + ulp)
    else:
        assert np.all(err <= step / 2 + ulp)


@given(st.integers(0, 2**32 - 1), st.sampled_from([2, 3, 4, 8]), st.integers(0, 67))
def test_pack_and_unpack_are_inverse(seed, bits, n):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2**bits, (3, n)).astype(np.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (3, packed_length(n, bits)) and packed.dtype == np.uint8
    np.testing.assert_array_equal(unpack(packed, bits, n), codes)
    if n * bits % 8 == 0:  # every byte is used: unpack then pack gives back any bytes
        raw = rng.integers(0, 256, (2, packed_length(n, bits))).astype(np.uint8)
        np.testing.assert_array_equal(pack(unpack(raw, bits, n), bits), raw)


def test_packing_bit_order_is_a_little_endian_stream():
    assert pack(np.array([1, 2, 3, 0], np.uint8), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    assert pack(np.array([5, 7, 1], np.uint8), 3).tolist() == [5 | 7 << 3 | (1 << 6) & 0xFF, 0]


def test_rounding_is_half_to_even_and_an_empty_range_is_exact():
    codes, scale, zero = quantize(np.array([0.0, 0.25, 0.75, 1.25, 3.0]), 3, axis=0)
    assert float(scale[0]) == 3.0 / 7 and int(zero[0]) == 0
    # symmetric 8 bits with max |x| = 127: step 1, so the halves land on even codes
    half = np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 127.0])
    c, s, z = quantize(half, 8, symmetric=True, axis=0)
    assert float(s[0]) == 1.0 and c.tolist() == [-2, -2, 0, 0, 2, 2, 127]
    const = np.full((2, 4), 3.25, np.float32)
    c, s, z = quantize(const, 2, axis=1, zero_point="float")
    np.testing.assert_array_equal(dequantize(c, s, z, axis=1), const)
    zeros = np.zeros((2, 4), np.float32)
    c, s, z = quantize(zeros, 4, axis=1)
    np.testing.assert_array_equal(dequantize(c, s, z, axis=1), zeros)


def test_parameter_shapes_follow_the_granularity():
    x = np.random.default_rng(0).standard_normal((4, 6, 8)).astype(np.float32)
    assert quantize(x, 4)[1].shape == (1, 1, 1)
    assert quantize(x, 4, axis=-1)[1].shape == (4, 6, 1)
    assert quantize(x, 4, axis=-1, group_size=2)[1].shape == (4, 6, 4)
    assert quantize(x, 4, axis=1, group_size=3)[1].shape == (4, 2, 8)
    c, s, z = quantize(x, 4, symmetric=True, axis=2)
    assert c.dtype == np.int8 and z.dtype == np.int8 and not z.any()


@pytest.mark.parametrize("kwargs, match", [
    ({"bits": 1}, "bits"), ({"bits": 9}, "bits"), ({"axis": 1, "group_size": 5}, "group_size"),
    ({"axis": 3}, "axis"), ({"group_size": 2}, "group_size"), ({"symmetric": True, "zero_point": "float"}, "zero_point"),
    ({"zero_point": "half"}, "zero_point"),
])  # fmt: skip
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize(np.ones((2, 4), np.float32), **({"bits": 4} | kwargs))


def test_bad_arrays_are_named():
    with pytest.raises(ValueError, match="x"):
        quantize(np.array([1.0, np.nan]), 4)
    with pytest.raises(TypeError, match="x"):
        quantize(np.array([1, 2]), 4)
    with pytest.raises(ValueError, match="codes"):
        pack(np.array([4], np.uint8), 2)
    with pytest.raises(TypeError, match="codes"):
        pack(np.array([1], np.int8), 2)
    with pytest.raises(ValueError, match="packed"):
        unpack(np.zeros(3, np.uint8), 4, 4)
