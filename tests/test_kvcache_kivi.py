import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mllm_ref.kvcache.kivi import KIVIKV, kivi_append, kivi_dequantize, kivi_nbytes, kivi_quantize
from mllm_ref.nn.attention import attention


def _kv(rng, h, t, d, dt=np.float32):
    return rng.standard_normal((h, t, d)).astype(dt), rng.standard_normal((h, t, d)).astype(dt)


@given(st.integers(0, 2**32 - 1), st.integers(0, 40), st.sampled_from([2, 4]), st.sampled_from([1, 2, 3]),
       st.integers(0, 20), st.sampled_from([2, 4]))  # fmt: skip
def test_layout_invariants_and_error_bound(seed, t, g, rmul, steps, bits):
    rng = np.random.default_rng(seed)
    r, d = g * rmul, 8
    k, v = _kv(rng, 2, t, d)
    c = kivi_quantize(k, v, bits, g, r)
    assert c.k_codes.shape[1] == t - t % r and c.k_full.shape[1] == t % r
    assert c.v_full.shape[1] == min(t, r) and c.v_codes.shape[1] == max(t - r, 0)
    for _ in range(steps):
        k1, v1 = _kv(rng, 2, 1, d)
        c = kivi_append(c, k1, v1)
        k, v = np.concatenate([k, k1], 1), np.concatenate([v, v1], 1)
        assert c.k_full.shape[1] < r and c.v_full.shape[1] <= r and c.k_codes.shape[1] % r == 0
    kh, vh = kivi_dequantize(c)
    assert kh.shape == k.shape == vh.shape
    tk = c.k_codes.shape[1]
    kb = np.repeat(c.k_scale, g, axis=1) / 2
    vb = np.repeat(c.v_scale, g, axis=2) / 2
    assert np.all(np.abs(k[:, :tk] - kh[:, :tk]) <= kb * (1 + 1e-5) + 1e-6)
    np.testing.assert_array_equal(kh[:, tk:], k[:, tk:])
    tv = c.v_codes.shape[1]
    assert np.all(np.abs(v[:, :tv] - vh[:, :tv]) <= vb * (1 + 1e-5) + 1e-6)
    np.testing.assert_array_equal(vh[:, tv:], v[:, tv:])


def test_append_matches_prefill_at_flush_boundaries():
    """Keys flushed in blocks of R by decode equal the prefill's quantization of the same tokens."""
    rng = np.random.default_rng(1)
    k, v = _kv(rng, 1, 24, 8)
    c = kivi_quantize(k[:, :8], v[:, :8], 2, 4, 8)
    for i in range(8, 24):
        c = kivi_append(c, k[:, i : i + 1], v[:, i : i + 1])
    full = kivi_quantize(k, v, 2, 4, 8)
    np.testing.assert_array_equal(c.k_codes, full.k_codes[:, :24])
    np.testing.assert_array_equal(c.k_scale, full.k_scale)
    np.testing.assert_array_equal(c.v_codes, full.v_codes)  # values are per token: same codes either way


def test_keys_per_channel_values_per_token():
    k = np.zeros((1, 4, 2), np.float32)
    k[0, :, 0] = [0, 1, 2, 3]
    k[0, :, 1] = [0, 30, 60, 90]  # an outlier channel gets its own scale
    c = kivi_quantize(k, k.copy(), 2, 2, 4)
    np.testing.assert_allclose(c.k_scale[0, 0], [1 / 3, 10.0], rtol=1e-6)
    assert c.k_codes.shape[1] == 4 and c.v_codes.shape[1] == 0


def test_bad_input():
    k = np.zeros((1, 4, 8), np.float32)
    with pytest.raises(ValueError, match="residual"):
        kivi_quantize(k, k, 2, 4, 6)
    with pytest.raises(ValueError, match="group_size"):
        kivi_quantize(np.zeros((1, 4, 6), np.float32), np.zeros((1, 4, 6), np.float32), 2, 4, 8)
    with pytest.raises(TypeError, match="cache"):
        kivi_append("x", k[:, :1], k[:, :1])


def test_policy_attend_equals_read_then_attention_and_cuts_bytes():
    rng = np.random.default_rng(2)
    k, v = _kv(rng, 2, 150, 32)
    pol = KIVIKV(2, 16, 16)
    c = pol.store(0, k, v, None, None, positions=np.arange(150), n_visual=144)
    q = rng.standard_normal((4, 1, 32)).astype(np.float32)
    k1, v1 = _kv(rng, 2, 1, 32)
    out, w = pol.attend(0, c, q, k1, v1, want_weights=False)
    kr, vr = pol.read(0, c)
    ref = attention(q[None], np.concatenate([kr, k1], 1)[None], np.concatenate([vr, v1], 1)[None], causal=True)[0]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert w is None and pol.attend(0, c, q, k1, v1, want_weights=True) is None
    assert pol.length(0, c) == 150
    np.testing.assert_array_equal(pol.kept_tokens(0, c), np.tile(np.arange(150), (2, 1)))
    assert k.nbytes + v.nbytes >= 4 * kivi_nbytes(c)


def test_make_policy_and_registration():
    from mllm_ref.kvcache.kivi import make_policy
    from mllm_ref.oracle.registry import get

    p = make_policy(4)
    assert isinstance(p, KIVIKV) and p.bits == 4
    with pytest.raises(ValueError, match="bits"):
        make_policy(5)
    t = get("kvcache.kivi")
    assert t.extra["question_after_image"] is True and t.model_level
    assert isinstance(t.extra["plugs"](None).kv_policy, KIVIKV)


def test_policy_decode_steps_keep_attend_equal_to_read():
    """Through flushes of the key residual and the value window, attend() stays read() + attention."""
    rng = np.random.default_rng(3)
    pol = KIVIKV(4, 4, 8, 8)
    k, v = _kv(rng, 2, 13, 8)
    c = pol.store(0, k, v, None, None, positions=np.arange(13), n_visual=10)
    for step in range(12):
        q = rng.standard_normal((4, 1, 8)).astype(np.float32)
        k1, v1 = _kv(rng, 2, 1, 8)
        out, _ = pol.attend(0, c, q, k1, v1, want_weights=False)
        kr, vr = pol.read(0, c)
        ref = attention(q[None], np.concatenate([kr, k1], 1)[None], np.concatenate([vr, v1], 1)[None], causal=True)[0]
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
        c = pol.extend(0, c, k1, v1, None, position=14 + step)
        assert pol.length(0, c) == 14 + step == kr.shape[1] + 1


@given(st.integers(0, 2**32 - 1), st.integers(0, 30), st.sampled_from([2, 3, 4, 8]), st.sampled_from([1, 2, 4]),
       st.integers(1, 3), st.booleans())  # fmt: skip
def test_torch_quantize_is_bit_exact(seed, t, bits, g, rmul, constant):
    tk = pytest.importorskip("kernels_torch.kvcache.kivi")
    rng = np.random.default_rng(seed)
    k, v = _kv(rng, 2, t, 2 * g)
    if constant:
        k[:, : t // 2] = 0.5  # constant groups take the scale-1 branch
    a, b = kivi_quantize(k, v, bits, g, g * rmul), tk.kivi_quantize(k, v, bits, g, g * rmul)
    for f in ("k_codes", "k_scale", "k_zero", "k_full", "v_codes", "v_scale", "v_zero", "v_full"):
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y, err_msg=f)
