"""The affine quantizer (quant.affine): the error bound, packing, rounding, granularity and bad input, and the numba
and torch fast paths bit for bit (codes, steps, zero points; packed bytes)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels_numba.quant import affine as nb
from kernels_torch.quant import affine as tc
from mllm_ref.oracle import registry
from mllm_ref.quant import affine as ref
from mllm_ref.quant.affine import code_range, dequantize, pack, packed_length, quantize, unpack

CASES = registry.get("quant.affine").strategy()  # its registered Hypothesis strategy
FAST = [nb, tc]
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


# ------------------------------------------------- drawn cases of the registered strategy; fast paths bit for bit


def _grouped_param(p, x_shape, axis, group_size):
    """A scale/zero array broadcast back to x's shape (each element gets its group's parameter)."""
    if axis is None:
        return np.broadcast_to(p, x_shape)
    g = x_shape[axis] if group_size is None else group_size
    return np.repeat(p, g, axis=axis)




@given(CASES)
def test_error_bound_half_a_step(kw):
    x = kw["x"]
    codes, scale, zero = quantize(**kw)
    xh = dequantize(codes, scale, zero, axis=kw["axis"], group_size=kw["group_size"])
    assert xh.shape == x.shape and xh.dtype == x.dtype
    s = _grouped_param(scale, x.shape, kw["axis"], kw["group_size"]).astype(np.float64)
    err = np.abs(x.astype(np.float64) - xh.astype(np.float64))
    eps = np.finfo(x.dtype).eps
    slack = 8 * eps * (np.abs(x).astype(np.float64) + s)  # the rounding of x / Δ and of Δ (q − z)
    if kw["zero_point"] == "integer" and not kw["symmetric"]:
        # Documented exception: rounding z may carry the range's far end one step past qmax; the clip costs at
        # most one step there. Everywhere inside [Δ (qmin − z), Δ (qmax − z)] the half-step bound holds.
        qmin, qmax = code_range(kw["bits"], False)
        z = _grouped_param(zero, x.shape, kw["axis"], kw["group_size"]).astype(np.float64)
        inside = (x >= s * (qmin - z)) & (x <= s * (qmax - z))
        assert np.all(err[inside] <= s[inside] / 2 + slack[inside])
        assert np.all(err <= s + slack)
    else:
        assert np.all(err <= s / 2 + slack)


@given(CASES)
def test_codes_in_range_and_shapes(kw):
    x, bits, axis, g = kw["x"], kw["bits"], kw["axis"], kw["group_size"]
    codes, scale, zero = quantize(**kw)
    qmin, qmax = code_range(bits, kw["symmetric"])
    assert codes.shape == x.shape
    assert codes.dtype == (np.int8 if kw["symmetric"] else np.uint8)
    assert codes.min() >= qmin and codes.max() <= qmax
    if axis is None:
        pshape = (1,) * x.ndim
    else:
        pshape = list(x.shape)
        pshape[axis] = x.shape[axis] // (x.shape[axis] if g is None else g)
        pshape = tuple(pshape)
    assert scale.shape == pshape and zero.shape == pshape
    assert scale.dtype == x.dtype and np.all(scale > 0)
    if kw["symmetric"]:
        assert zero.dtype == np.int8 and not zero.any()
    elif kw["zero_point"] == "integer":
        assert zero.dtype == np.uint8 and zero.max() <= qmax
    else:
        assert zero.dtype == x.dtype


@given(CASES)
def test_fast_paths_bit_exact(kw):
    want = quantize(**kw)
    for mod in FAST:
        got = mod.quantize(**kw)
        for w, g in zip(want, got):
            assert w.dtype == g.dtype and w.shape == g.shape
            assert np.array_equal(w, g), mod.__name__


def test_round_half_to_even_on_exact_halves_asymmetric_and_fast_paths():
    # Δ = 1 exactly: the range [-255, 0] over 255 steps; z = 255; x / Δ lands on exact halves.
    x = np.array([-255.0, -2.5, -1.5, -0.5, -254.5, 0.0], dtype=np.float32)
    codes, scale, zero = quantize(x, 8)
    assert scale.item() == 1.0 and zero.item() == 255
    # rint: -2.5 -> -2, -1.5 -> -2, -0.5 -> -0, -254.5 -> -254 (round half to even, not half away from zero)
    np.testing.assert_array_equal(codes, np.array([0, 253, 253, 255, 1, 255], dtype=np.uint8))
    half = np.array([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5], dtype=np.float64)
    for mod in FAST:
        np.testing.assert_array_equal(mod.quantize(x, 8)[0], codes)
        np.testing.assert_array_equal(mod.quantize(half, 8, symmetric=True)[0], [127, 0, 2, 2, 0, -2, -2])


@pytest.mark.parametrize("zero_point", ["integer", "float"])
@pytest.mark.parametrize("value", [0.0, 3.25, -7.0])
def test_constant_groups_are_exact(zero_point, value):
    x = np.full((3, 8), value, dtype=np.float32)
    x[1] = np.linspace(-1, 1, 8)  # one non-constant row
    for mod in [ref, *FAST]:
        codes, scale, zero = mod.quantize(x, 4, axis=1, zero_point=zero_point)
        xh = dequantize(codes, scale, zero, axis=1)
        assert np.all(np.isfinite(scale)) and np.all(scale > 0)
        if value == 0.0 or zero_point == "float":  # an empty range: Δ = 1, the value comes back exactly
            assert scale[0, 0] == 1.0 and scale[2, 0] == 1.0
            np.testing.assert_array_equal(xh[[0, 2]], x[[0, 2]])
        else:  # the integer form still spans [min(v, 0), max(v, 0)]: a proper step
            assert scale[0, 0] == np.float32(abs(value)) / np.float32(15)
    codes, scale, zero = quantize(np.zeros((2, 4), np.float64), 3, symmetric=True, axis=0)
    assert np.all(scale == 1.0) and not codes.any()


def test_symmetric_restricted_range():
    x = np.array([-4.0, -1.0, 0.0, 2.0, 4.0], dtype=np.float32)
    for bits in range(2, 9):
        codes, scale, _ = quantize(x, bits, symmetric=True)
        qmax = 2 ** (bits - 1) - 1
        assert codes.min() == -qmax and codes.max() == qmax  # never -2^(b-1)
        assert scale.item() == np.float32(4.0) / np.float32(qmax)


def test_granularities_give_the_documented_parameters():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 6, 8)).astype(np.float32)
    _, s, _ = quantize(x, 4)
    assert s.shape == (1, 1, 1)
    _, s, _ = quantize(x, 4, axis=1)
    assert s.shape == (4, 1, 8)
    _, s, z = quantize(x, 4, axis=-1, group_size=2)
    assert s.shape == (4, 6, 4) and z.shape == (4, 6, 4)
    # per group == per channel of the reshaped tensor
    c1, s1, z1 = quantize(x, 3, axis=2, group_size=2, zero_point="float")
    c2, s2, z2 = quantize(x.reshape(4, 6, 4, 2), 3, axis=3, zero_point="float")
    np.testing.assert_array_equal(c1, c2.reshape(c1.shape))
    np.testing.assert_array_equal(s1, s2[..., 0])
    np.testing.assert_array_equal(z1, z2[..., 0])
    # per tensor == per channel of the flattened tensor
    c3, s3, _ = quantize(x, 5)
    c4, s4, _ = quantize(x.reshape(-1), 5, axis=0)
    np.testing.assert_array_equal(c3.reshape(-1), c4)
    assert s3.item() == s4.item()


def test_zero_is_exactly_representable_with_the_integer_zero_point():
    rng = np.random.default_rng(1)
    x = np.abs(rng.standard_normal((5, 16))).astype(np.float32) + 1.0  # all positive: 0 still in the range
    x[:, 3] = 0.0
    codes, scale, zero = quantize(x, 3, axis=1)
    xh = dequantize(codes, scale, zero, axis=1)
    assert np.all(xh[:, 3] == 0.0)


def test_float16_follows_the_reference():
    x = np.random.default_rng(2).standard_normal((4, 8)).astype(np.float16)
    want = quantize(x, 4, axis=1, group_size=4)
    assert want[1].dtype == np.float16
    for mod in FAST:
        for w, g in zip(want, mod.quantize(x, 4, axis=1, group_size=4)):
            assert w.dtype == g.dtype and np.array_equal(w, g)


# ----------------------------------------------------------------------------------------------------- packing


@settings(max_examples=60)
@given(st.sampled_from([2, 3, 4, 8]), st.integers(0, 3), st.integers(0, 37), st.integers(0, 2**32 - 1))
def test_pack_unpack_identities(bits, rows, n, seed):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2**bits, (rows, n)).astype(np.uint8)
    p = pack(codes, bits)
    assert p.dtype == np.uint8 and p.shape == (rows, packed_length(n, bits)) == (rows, -(-n * bits // 8))
    np.testing.assert_array_equal(unpack(p, bits, n), codes)
    # unpack ∘ pack on whole bytes whose padding bits are zero
    np.testing.assert_array_equal(pack(unpack(p, bits, n), bits), p)
    for mod in FAST:
        np.testing.assert_array_equal(mod.pack(codes, bits), p)
        np.testing.assert_array_equal(mod.unpack(p, bits, n), codes)


@settings(max_examples=30)
@given(st.sampled_from([2, 4, 8]), st.integers(1, 8), st.integers(0, 2**32 - 1))
def test_unpack_pack_identity_on_any_bytes(bits, nbytes, seed):
    # when 8 is a multiple of bits every bit is used: any byte string round-trips
    p = np.random.default_rng(seed).integers(0, 256, (2, nbytes)).astype(np.uint8)
    n = nbytes * 8 // bits
    np.testing.assert_array_equal(pack(unpack(p, bits, n), bits), p)


def test_pack_bit_order_is_little_endian():
    np.testing.assert_array_equal(pack(np.array([1, 2, 3, 0], np.uint8), 2), np.array([0b00111001], np.uint8))
    np.testing.assert_array_equal(pack(np.array([0xA, 0x5], np.uint8), 4), np.array([0x5A], np.uint8))
    # 3 bits: codes 7, 0, 5 -> stream 111 000 101 -> byte 0 = 0b01000111, byte 1 = 0b1
    np.testing.assert_array_equal(pack(np.array([7, 0, 5], np.uint8), 3), np.array([0b01000111, 0b1], np.uint8))


def test_quantized_codes_pack_and_come_back():
    x = np.random.default_rng(3).standard_normal((3, 10)).astype(np.float32)
    for bits in (2, 3, 4):
        codes, scale, zero = quantize(x, bits, axis=1, group_size=5, zero_point="float")
        back = unpack(pack(codes, bits), bits, 10)
        np.testing.assert_array_equal(back, codes)
        sc, _, _ = quantize(x, bits, symmetric=True, axis=1)
        off = (sc.astype(np.int16) + 2 ** (bits - 1)).astype(np.uint8)  # signed codes packed after the offset
        np.testing.assert_array_equal(unpack(pack(off, bits), bits, 10), off)


# --------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("mod", [ref, nb, tc], ids=["ref", "numba", "torch"])
def test_bad_input_names_the_argument(mod):
    x = np.ones((4, 6), np.float32)
    for bits in (1, 9, 0):
        with pytest.raises(ValueError, match="bits"):
            mod.quantize(x, bits)
    with pytest.raises(TypeError, match="bits"):
        mod.quantize(x, 4.5)
    with pytest.raises(ValueError, match="group_size"):
        mod.quantize(x, 4, axis=1, group_size=4)
    with pytest.raises(ValueError, match="group_size"):
        mod.quantize(x, 4, group_size=2)  # no axis to group along
    with pytest.raises(ValueError, match="group_size"):
        mod.quantize(x, 4, axis=1, group_size=0)
    with pytest.raises(ValueError, match="axis"):
        mod.quantize(x, 4, axis=2)
    with pytest.raises(ValueError, match="axis"):
        mod.quantize(x, 4, axis=-3)
    with pytest.raises(TypeError, match="x"):
        mod.quantize(np.ones((4, 6), np.int32), 4)
    bad = x.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="x"):
        mod.quantize(bad, 4)
    bad[1, 2] = np.inf
    with pytest.raises(ValueError, match="x"):
        mod.quantize(bad, 4)
    with pytest.raises(ValueError, match="zero_point"):
        mod.quantize(x, 4, symmetric=True, zero_point="float")
    with pytest.raises(ValueError, match="zero_point"):
        mod.quantize(x, 4, zero_point="fp")
    with pytest.raises(TypeError, match="symmetric"):
        mod.quantize(x, 4, symmetric="yes")
    with pytest.raises(ValueError, match="x"):
        mod.quantize(np.ones((0, 3), np.float32), 4)
    with pytest.raises(ValueError, match="codes"):
        mod.pack(np.array([4, 1], np.uint8), 2)
    with pytest.raises(TypeError, match="codes"):
        mod.pack(np.array([1, 1], np.int8), 2)
    with pytest.raises(ValueError, match="bits"):
        mod.pack(np.array([1, 1], np.uint8), 5)
    with pytest.raises(ValueError, match="packed"):
        mod.unpack(np.zeros(3, np.uint8), 4, 3)
    with pytest.raises(TypeError, match="packed"):
        mod.unpack(np.zeros(2, np.int8), 4, 3)


def test_dequantize_bad_input():
    x = np.random.default_rng(4).standard_normal((4, 6)).astype(np.float32)
    codes, scale, zero = quantize(x, 4, axis=1, group_size=3)
    with pytest.raises(ValueError, match="scale"):
        dequantize(codes, scale, zero, axis=1)  # wrong group count
    with pytest.raises(ValueError, match="group_size"):
        dequantize(codes, scale, zero, axis=1, group_size=4)
    with pytest.raises(ValueError, match="zero"):
        dequantize(codes, scale, zero[:, :1], axis=1, group_size=3)
    with pytest.raises(TypeError, match="codes"):
        dequantize(codes.astype(np.int32), scale, zero, axis=1, group_size=3)
    with pytest.raises(ValueError, match="axis"):
        dequantize(codes, scale, zero, axis=5, group_size=3)
