"""VecInfer-style VQ: Hadamard, smoothing, k-means codebooks, nearest-codeword codes, fused attention, the plug."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mllm_ref.kvcache import vq
from mllm_ref.nn.attention import attention


@pytest.mark.parametrize("n", [1, 2, 4, 8, 32])
def test_hadamard_is_orthonormal_and_sylvester(n):
    h = vq.hadamard(n)
    np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-12)
    assert np.allclose(np.abs(h), 1 / np.sqrt(n))


@given(st.integers(0, 2**31))
def test_rotation_then_inverse_is_identity_and_preserves_scores(seed):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((2, 9, 16))
    q = rng.standard_normal((4, 1, 16))
    lam = vq.smooth_factors(k)
    kt = vq.transform_keys(k, lam)
    np.testing.assert_allclose(vq.inverse_transform_keys(kt, lam), k, atol=1e-12)
    qt = vq.transform_queries(q, lam)
    ref = np.einsum("kjd,ktd->kjt", q.reshape(2, 2, 16), k)
    np.testing.assert_allclose(np.einsum("kjd,ktd->kjt", qt.reshape(2, 2, 16), kt), ref, atol=1e-10)


def test_smoothing_flattens_outlier_channels():
    rng = np.random.default_rng(0)
    k = rng.standard_normal((1, 200, 16))
    k[..., 3] *= 50
    kt = vq.transform_keys(k, vq.smooth_factors(k))
    spread = lambda x: np.abs(x).max(axis=1).max() / np.abs(x).max(axis=1).min()  # noqa: E731
    assert spread(kt) < spread(k) / 5


def test_kmeans_is_deterministic_and_nearest_breaks_ties_low():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 2))
    a = vq.kmeans(x, 8, np.random.default_rng(5), 5)
    b = vq.kmeans(x, 8, np.random.default_rng(5), 5)
    np.testing.assert_array_equal(a, b)
    cb = np.array([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0]])
    np.testing.assert_array_equal(vq.nearest_codeword(np.array([[0.0, 0.0], [1.0, 0.0]]), cb), [0, 0])
    with pytest.raises(TypeError, match="rng"):
        vq.kmeans(x, 8, 5)


def test_error_decreases_with_codebook_size():
    rng = np.random.default_rng(1)
    k = rng.standard_normal((2, 256, 16))
    v = rng.standard_normal((2, 256, 16))
    errs = []
    for bits in (1, 2, 3):
        b = vq.calibrate(k, v, bits, 2, seed=0)
        kc, vc = vq.vq_quantize(k, v, b.k_codebook, b.v_codebook, b.smooth)
        kd, vd = vq.vq_dequantize(kc, vc, b.k_codebook, b.v_codebook, b.smooth)
        errs.append((np.linalg.norm(kd - k) / np.linalg.norm(k), np.linalg.norm(vd - v) / np.linalg.norm(v)))
    assert all(a[0] > b[0] and a[1] > b[1] for a, b in zip(errs, errs[1:])), errs
    assert errs[-1][1] < 0.25


def test_codes_are_nearest_codewords():
    rng = np.random.default_rng(2)
    k, v = rng.standard_normal((1, 20, 8)), rng.standard_normal((1, 20, 8))
    b = vq.calibrate(k, v, 2, 2, seed=0)
    kc, vc = vq.vq_quantize(k, v, b.k_codebook, b.v_codebook, b.smooth)
    sub = v[0].reshape(20, 4, 2)
    d2 = ((sub[:, :, None, :] - b.v_codebook[0][None, None]) ** 2).sum(-1)
    assert (d2[np.arange(20)[:, None], np.arange(4)[None], vc[0]] <= d2.min(-1) + 0).all()


@given(st.integers(0, 2**31))
def test_fused_attention_matches_dequantized_attention(seed):
    rng = np.random.default_rng(seed)
    k, v = rng.standard_normal((2, 40, 16)), rng.standard_normal((2, 40, 16))
    b = vq.calibrate(k, v, 2, 2, seed=seed % 100, iters=3)
    kc, vc = vq.vq_quantize(k, v, b.k_codebook, b.v_codebook, b.smooth)
    kd, vd = vq.vq_dequantize(kc, vc, b.k_codebook, b.v_codebook, b.smooth)
    q, kn, vn = rng.standard_normal((4, 1, 16)), rng.standard_normal((2, 1, 16)), rng.standard_normal((2, 1, 16))
    ref = attention(q[None], np.concatenate([kd, kn], 1)[None], np.concatenate([vd, vn], 1)[None])[0]
    np.testing.assert_allclose(vq.vq_attention(q, kc, vc, b.k_codebook, b.v_codebook, b.smooth, kn, vn), ref,
                               atol=1e-10)


def test_bad_input():
    rng = np.random.default_rng(0)
    k, v = rng.standard_normal((1, 8, 8)), rng.standard_normal((1, 8, 8))
    b = vq.calibrate(k, v, 1, 2, seed=0)
    with pytest.raises(ValueError, match="smooth"):
        vq.vq_quantize(k, v, b.k_codebook, b.v_codebook, -b.smooth)
    with pytest.raises(ValueError, match="k_codebook"):
        vq.vq_quantize(k, v, b.k_codebook[..., :1].repeat(3, -1), b.v_codebook, b.smooth)
    with pytest.raises(ValueError, match="power of two"):
        vq.hadamard(12)
    with pytest.raises(ValueError, match="n_clusters"):
        vq.kmeans(k[0], 100, np.random.default_rng(0))
    with pytest.raises(ValueError, match="bits"):
        vq.make_policy(8)


def test_policy_on_the_tiny_vlm(model):
    from mllm_ref.tinyvlm import tokenizer, world
    from mllm_ref.tinyvlm.model import generate
    from mllm_ref.tinyvlm.plugs import Plugs

    pol = vq.calibrated_policy(model, n_images=1, iters=2)
    ex = world.vqa_set(world.EVAL_SEED, 1)[0]
    ids = tokenizer.prompt_ids(ex.qa.question)
    gen = generate(model, ex.image, ids, max_new_tokens=3, plugs=Plugs(kv_policy=pol), prefill_tokens=1)
    plain = generate(model, ex.image, ids, max_new_tokens=3, prefill_tokens=1)
    assert gen.trace.kv_bytes < plain.trace.kv_bytes / 8
    rng = np.random.default_rng(1)
    k, v = rng.standard_normal((2, 20, 32)).astype(np.float32), rng.standard_normal((2, 20, 32)).astype(np.float32)
    cache = pol.store(0, k, v, None, None, positions=np.zeros(20, np.int64), n_visual=10)
    cache = pol.extend(0, cache, k[:, :1], v[:, :1], None, position=21)
    assert pol.length(0, cache) == 21
    q = rng.standard_normal((4, 1, 32)).astype(np.float32)
    out, _ = pol.attend(0, cache, q, k[:, :1], v[:, :1], want_weights=False)
    kr, vr = pol.read(0, cache)
    ref = attention(q[None], np.concatenate([kr, k[:, :1]], 1)[None], np.concatenate([vr, v[:, :1]], 1)[None])[0]
    np.testing.assert_allclose(out, ref, atol=1e-5)
