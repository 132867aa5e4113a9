"""Tests of mllm_ref.nn.attention: the formula, GQA, causal decoding with a KV cache, masks, validation."""

import numpy as np
import pytest
from hypothesis import given, settings

from mllm_ref.nn import KVCache, append, attention, empty_cache
from mllm_ref.oracle import registry


def _qkv(b=2, hq=4, hkv=2, tq=5, tk=5, d=8, dv=6, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((b, hq, tq, d)).astype(dtype),
        rng.standard_normal((b, hkv, tk, d)).astype(dtype),
        rng.standard_normal((b, hkv, tk, dv)).astype(dtype),
    )


def _loop_attention(q, k, v, causal=False, key_mask=None, scale=None):
    """The definition, one (batch, head, query) at a time, in float64."""
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    scale = 1 / np.sqrt(d) if scale is None else scale
    out = np.zeros((b, hq, tq, v.shape[-1]))
    weights = np.zeros((b, hq, tq, tk))
    for bi in range(b):
        for h in range(hq):
            kv = h // (hq // hkv)
            for i in range(tq):
                ok = [
                    j
                    for j in range(tk)
                    if (not causal or j <= tk - tq + i) and (key_mask is None or key_mask[bi, j])
                ]
                if not ok:
                    continue
                s = np.array([q[bi, h, i] @ k[bi, kv, j] * scale for j in ok])
                w = np.exp(s - s.max())
                w /= w.sum()
                weights[bi, h, i, ok] = w
                out[bi, h, i] = w @ v[bi, kv, ok]
    return out, weights


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("shape", [(2, 4, 2, 5, 5), (1, 3, 1, 1, 9), (2, 6, 3, 4, 11), (1, 2, 2, 7, 3)])
def test_matches_definition(shape, causal, masked):
    b, hq, hkv, tq, tk = shape
    q, k, v = _qkv(b, hq, hkv, tq, tk)
    key_mask = None
    if masked:
        key_mask = np.random.default_rng(1).random((b, tk)) > 0.3
    out, w = attention(q, k, v, causal=causal, key_mask=key_mask, return_weights=True)
    ref_out, ref_w = _loop_attention(q, k, v, causal, key_mask)
    np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(w, ref_w, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(attention(q, k, v, causal=causal, key_mask=key_mask), out, rtol=0, atol=0)


def test_scale_argument():
    q, k, v = _qkv()
    np.testing.assert_allclose(attention(q, k, v, scale=0.7), _loop_attention(q, k, v, scale=0.7)[0], rtol=1e-12)
    np.testing.assert_allclose(attention(q, k, v, scale=1 / np.sqrt(8)), attention(q, k, v), rtol=1e-15)


def test_gqa_equals_repeated_kv_heads():
    q, k, v = _qkv(b=2, hq=6, hkv=2, tq=4, tk=7)
    rep = 3
    mha = attention(q, np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1), causal=True)
    np.testing.assert_allclose(attention(q, k, v, causal=True), mha, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_decode_with_kv_cache_equals_causal_prefill(dtype):
    b, hq, hkv, t, d = 2, 4, 2, 9, 8
    q, k, v = _qkv(b, hq, hkv, t, t, d, d, seed=3, dtype=dtype)
    full = attention(q, k, v, causal=True)
    cache = empty_cache(b, hkv, d, dtype=dtype)
    for i in range(t):
        cache = append(cache, k[:, :, i : i + 1], v[:, :, i : i + 1])
        assert len(cache) == i + 1
        step = attention(q[:, :, i : i + 1], cache.k, cache.v, causal=True)
        assert step.dtype == dtype
        tol = 1e-6 if dtype == np.float32 else 1e-13
        np.testing.assert_allclose(step[:, :, 0], full[:, :, i], rtol=tol, atol=tol)


def test_chunked_prefill_equals_full_prefill():
    q, k, v = _qkv(1, 2, 2, 12, 12)
    full = attention(q, k, v, causal=True)
    np.testing.assert_allclose(attention(q[:, :, 7:], k, v, causal=True), full[:, :, 7:], rtol=1e-12)


def test_fully_masked_rows_are_zero():
    q, k, v = _qkv(2, 2, 1, 4, 4)
    key_mask = np.array([[False] * 4, [False, True, True, True]])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        out, w = attention(q, k, v, causal=True, key_mask=key_mask, return_weights=True)
    assert np.all(out[0] == 0) and np.all(w[0] == 0)
    assert np.all(out[1, :, 0] == 0) and np.all(w[1, :, 0] == 0)  # query 0 only sees key 0, which is padding
    assert np.all(np.isfinite(out)) and np.all(out[1, :, 1:] != 0)
    # More queries than keys under the causal mask: the first Tq - Tk queries see nothing.
    q2, k2, v2 = _qkv(1, 1, 1, 5, 3)
    out2 = attention(q2, k2, v2, causal=True)
    assert np.all(out2[0, 0, :2] == 0) and np.all(out2[0, 0, 2:] != 0)


def test_weights_rows_sum_to_one_and_give_the_output():
    q, k, v = _qkv(2, 4, 2, 6, 10, dtype=np.float32)
    key_mask = np.ones((2, 10), bool)
    key_mask[1, :3] = False
    out, w = attention(q, k, v, causal=True, key_mask=key_mask, return_weights=True)
    assert out.dtype == w.dtype == np.float32 and w.shape == (2, 4, 6, 10)
    np.testing.assert_allclose(w.sum(-1), 1, atol=1e-6)
    assert np.all(w[1, ..., :3] == 0) and np.all(np.triu(w[0, 0], k=10 - 6 + 1) == 0)
    vr = np.repeat(v, 2, axis=1)
    np.testing.assert_allclose(out, w @ vr, rtol=1e-5, atol=1e-6)


def test_stable_on_huge_scores():
    q, k, v = _qkv(1, 1, 1, 2, 3)
    out = attention(q * 1e3, k * 1e3, v)
    assert np.all(np.isfinite(out))


def _bad(**over):
    q, k, v = _qkv(2, 4, 2, 3, 5, d=8, dv=6, dtype=np.float32)
    kw = {"q": q, "k": k, "v": v}
    kw.update(over)
    return kw


@pytest.mark.parametrize(
    "kw,exc,name",
    [
        (_bad(q=np.ones((4, 3, 8), np.float32)), ValueError, "q"),
        (_bad(k=np.ones((2, 2, 5, 7), np.float32)), ValueError, "k"),
        (_bad(k=np.ones((1, 2, 5, 8), np.float32)), ValueError, "k"),
        (_bad(v=np.ones((2, 2, 4, 6), np.float32)), ValueError, "v"),
        (_bad(v=np.ones((2, 1, 5, 6), np.float32)), ValueError, "v"),
        (_bad(k=np.ones((2, 3, 5, 8), np.float32), v=np.ones((2, 3, 5, 6), np.float32)), ValueError, "multiple"),
        (_bad(q=np.ones((2, 4, 3, 8), np.int32)), TypeError, "q"),
        (_bad(k=np.ones((2, 2, 5, 8), np.float64)), TypeError, "k"),
        (_bad(q=np.full((2, 4, 3, 8), np.nan, np.float32)), ValueError, "q"),
        (_bad(v=np.full((2, 2, 5, 6), np.inf, np.float32)), ValueError, "v"),
        (_bad(key_mask=np.ones((2, 4), bool)), ValueError, "key_mask"),
        (_bad(key_mask=np.ones((2, 5), np.int64)), TypeError, "key_mask"),
        (_bad(causal=1), TypeError, "causal"),
        (_bad(return_weights="yes"), TypeError, "return_weights"),
        (_bad(scale=0.0), ValueError, "scale"),
        (_bad(scale=float("nan")), ValueError, "scale"),
    ],
)
def test_bad_input(kw, exc, name):
    with pytest.raises(exc, match=name):
        attention(**kw)


def test_registered_cases():
    t = registry.get("nn.attention")
    assert t.chapter == "book/01-tiny-vlm.md"
    for _, kw in t.cases("test"):
        res = t.reference(**kw)
        out = res[0] if kw["return_weights"] else res
        assert out.dtype == np.float32 and np.all(np.isfinite(out))
    for _, kw in t.cases("bench"):
        c = t.cost(kw)
        assert c["flops"] > 0 and c["bytes"] > 0


@settings(max_examples=40, deadline=None)
@given(registry.get("nn.attention").strategy())
def test_property_weights_are_distributions(kw):
    res = attention(**kw)
    out = res[0] if kw["return_weights"] else res
    assert out.dtype == kw["q"].dtype and np.all(np.isfinite(out))
    if kw["return_weights"]:
        sums = res[1].sum(-1)
        assert np.all((np.abs(sums - 1) < 1e-4) | (sums == 0))


def test_kvcache_is_functional():
    cache = empty_cache(1, 2, 4, value_dim=3, dtype=np.float64)
    assert isinstance(cache, KVCache) and len(cache) == 0
    new = append(cache, np.ones((1, 2, 2, 4)), np.ones((1, 2, 2, 3)))
    assert len(cache) == 0 and len(new) == 2 and new.v.shape == (1, 2, 2, 3)
