import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mllm_ref.kvcache.quant_token import QuantTokenKV, dequant_token, quant_token
from mllm_ref.quant import affine


@given(st.integers(0, 2**32 - 1), st.sampled_from([2, 3, 4, 8]), st.sampled_from([1, 2, 4, 8]))
def test_error_within_half_step(seed, bits, g):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 5, 16)).astype(np.float32) * 3
    codes, scale, zero = quant_token(x, bits, g)
    assert codes.shape == (2, 5, affine.packed_length(16, bits)) and scale.shape == (2, 5, 16 // g)
    xh = dequant_token(codes, scale, zero, bits, 16)
    bound = np.repeat(scale, g, axis=-1) / 2
    assert np.all(np.abs(x - xh) <= bound * (1 + 1e-5) + 1e-6)


def test_groups_are_per_token():
    x = np.zeros((1, 2, 4), np.float32)
    x[0, 0] = [0, 1, 2, 3]
    x[0, 1] = [0, 100, 200, 300]
    _, scale, zero = quant_token(x, 2, 4)
    np.testing.assert_allclose(scale[0, :, 0], [1.0, 100.0])
    np.testing.assert_array_equal(zero[0, :, 0], [0.0, 0.0])


def test_bad_input():
    with pytest.raises(ValueError, match="group_size"):
        quant_token(np.zeros((1, 2, 6), np.float32), 2, 4)
    with pytest.raises(ValueError, match="bits"):
        quant_token(np.zeros((1, 2, 4), np.float32), 5, 4)
    with pytest.raises(TypeError, match="x"):
        quant_token(np.zeros((1, 2, 4), np.int32), 2, 4)


def test_policy_bytes_and_roundtrip():
    rng = np.random.default_rng(0)
    k, v = rng.standard_normal((2, 2, 10, 32)).astype(np.float32)
    pol = QuantTokenKV(4, 32)
    c = pol.store(0, k, v, None, None, positions=np.arange(10), n_visual=4)
    c = pol.extend(0, c, k[:, :1], v[:, :1], None, position=10)
    assert pol.length(0, c) == 11
    kr, vr = pol.read(0, c)
    assert kr.shape == (2, 11, 32) and np.abs(kr[:, :10] - k).max() < 0.5
    # 16 bytes of codes + 2 float32 per token per head, keys and values
    assert pol.nbytes(c) == 2 * 2 * 11 * (16 + 8)
