"""CalibQuant: 1-bit per-channel visual K/V, post-scaling exactness, calibration, the tiny-VLM plug."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mllm_ref.kvcache import calibquant as cq
from mllm_ref.nn.attention import attention


def _kv(seed, hkv=2, t=30, d=16, dt=np.float64):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((hkv, t, d)).astype(dt), rng.standard_normal((hkv, t, d)).astype(dt),
            rng.standard_normal((2 * hkv, 1, d)).astype(dt))


@given(st.integers(0, 2**31), st.integers(0, 30), st.sampled_from(cq.BITS))
def test_post_scaling_equals_attention_over_dequantized_cache(seed, n, bits):
    k, v, q = _kv(seed)
    c = cq.calibquant_quantize(k, v, n, bits)
    kd, vd = cq.calibquant_dequantize(c)
    ref = attention(q[None], kd[None], vd[None])[0]
    got = cq.calibquant_attention(q, c.k_codes, c.k_scale, c.k_zero, c.v_codes, c.v_scale, c.v_zero, c.k_full,
                                  c.v_full, bits=bits, calibrate=False)
    np.testing.assert_allclose(got, ref, atol=1e-12)


@given(st.integers(0, 2**31))
def test_one_bit_values_sit_on_the_clipped_range_ends(seed):
    k, v, _ = _kv(seed)
    c = cq.calibquant_quantize(k, v, 20, 1)
    kd, _ = cq.calibquant_dequantize(c)
    lo, hi = 0.5 * k[:, :20].min(axis=1), 0.5 * k[:, :20].max(axis=1)
    ends = np.isclose(kd[:, :20], lo[:, None]) | np.isclose(kd[:, :20], hi[:, None])
    assert ends.all()
    np.testing.assert_array_equal(kd[:, 20:], k[:, 20:])  # text tokens untouched
    assert c.k_codes.shape == (2, 20, 2)  # 16 channels in 2 bytes


def test_error_shrinks_with_bits():
    k, v, _ = _kv(0, t=64)
    errs = [np.abs(cq.calibquant_dequantize(cq.calibquant_quantize(k, v, 64, b, 1.0, 1.0))[0] - k).max()
            for b in (1, 2, 4, 8)]
    assert all(a > b for a, b in zip(errs, errs[1:]))


def test_calibration_maps_the_visual_range():
    u = np.array([[[0.0, 2.0, 10.0]]])
    got = cq.calibrate_scores(u, 3.0)
    np.testing.assert_allclose(got[..., [0, 2]], [[[0.0, 7.0]]], atol=1e-6)
    assert got[0, 0, 1] < 2.0


def test_calibration_changes_only_visual_scores():
    k, v, q = _kv(3)
    c = cq.calibquant_quantize(k, v, 0, 1)  # nothing visual: calibration has nothing to touch
    a = cq.calibquant_attention(q, c.k_codes, c.k_scale, c.k_zero, c.v_codes, c.v_scale, c.v_zero, c.k_full,
                                c.v_full, calibrate=True)
    np.testing.assert_allclose(a, attention(q[None], k[None], v[None])[0], atol=1e-12)


def test_bad_input():
    k, v, q = _kv(0)
    with pytest.raises(ValueError, match="n_visual"):
        cq.calibquant_quantize(k, v, 31)
    with pytest.raises(ValueError, match="bits"):
        cq.calibquant_quantize(k, v, 3, bits=5)
    with pytest.raises(TypeError, match="v"):
        cq.calibquant_quantize(k, v.astype(np.float32), 3)
    c = cq.calibquant_quantize(k, v, 10)
    with pytest.raises(TypeError, match="k_codes"):
        cq.calibquant_attention(q, c.k_codes.astype(np.int32), c.k_scale, c.k_zero, c.v_codes, c.v_scale, c.v_zero,
                                c.k_full, c.v_full)
    with pytest.raises(ValueError, match="offset"):
        cq.calibquant_attention(q, c.k_codes, c.k_scale, c.k_zero, c.v_codes, c.v_scale, c.v_zero, c.k_full,
                                c.v_full, offset=np.inf)


def test_policy_on_the_tiny_vlm(model):
    from mllm_ref.tinyvlm import tokenizer, world
    from mllm_ref.tinyvlm.model import generate
    from mllm_ref.tinyvlm.plugs import Plugs

    ex = world.vqa_set(world.EVAL_SEED, 1)[0]
    pol = cq.make_policy(1)
    gen = generate(model, ex.image, tokenizer.prompt_ids(ex.qa.question), max_new_tokens=3,
                   plugs=Plugs(kv_policy=pol), prefill_tokens=1)
    plain = generate(model, ex.image, tokenizer.prompt_ids(ex.qa.question), max_new_tokens=3, prefill_tokens=1)
    assert gen.trace.kv_bytes < plain.trace.kv_bytes / 5
    # fused attend() agrees with read() + attention when calibration is off
    rng = np.random.default_rng(1)
    k, v = rng.standard_normal((2, 150, 32)).astype(np.float32), rng.standard_normal((2, 150, 32)).astype(np.float32)
    off = cq.CalibQuantKV(1, calibrate=False)
    cache = off.store(0, k, v, None, None, positions=np.zeros(150, np.int64), n_visual=144)
    q, kn, vn = (rng.standard_normal(s).astype(np.float32) for s in ((4, 1, 32), (2, 1, 32), (2, 1, 32)))
    out, _ = off.attend(0, cache, q, kn, vn, want_weights=False)
    kr, vr = off.read(0, cache)
    ref = attention(q[None], np.concatenate([kr, kn], 1)[None], np.concatenate([vr, vn], 1)[None])[0]
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert off.length(0, cache) == 150 and off.kept_tokens(0, cache).shape == (2, 150)
