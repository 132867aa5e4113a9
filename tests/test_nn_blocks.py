"""Tests of the unregistered building blocks: linear, activations (erf, GELU, SiLU), MLPs, patch embedding, KV cache."""

import dataclasses
import math

import numpy as np
import pytest

from mllm_ref.nn import (
    KVCache,
    append,
    empty_cache,
    erf,
    gelu,
    linear,
    mlp,
    patch_embed,
    patchify,
    silu,
    swiglu,
)


def _rng(seed=0):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------------------- linear
def test_linear_pytorch_layout():
    rng = _rng()
    x = rng.standard_normal((2, 3, 5)).astype(np.float32)
    w = rng.standard_normal((7, 5)).astype(np.float32)
    b = rng.standard_normal(7).astype(np.float32)
    y = linear(x, w, b)
    assert y.shape == (2, 3, 7) and y.dtype == np.float32
    gold = np.einsum("abi,oi->abo", x.astype(np.float64), w.astype(np.float64)) + b
    np.testing.assert_allclose(y, gold, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(linear(x, w), gold - b, rtol=1e-5, atol=1e-5)
    assert linear(np.ones(5), np.ones((2, 5))).shape == (2,)


@pytest.mark.parametrize(
    "args,exc,name",
    [
        ((np.ones((2, 5)), np.ones((7, 4))), ValueError, "weight"),
        ((np.ones((2, 5)), np.ones(5)), ValueError, "weight"),
        ((np.ones((2, 5)), np.ones((7, 5)), np.ones(6)), ValueError, "bias"),
        ((np.ones((2, 5), np.float32), np.ones((7, 5))), TypeError, "weight"),
        ((np.ones((2, 5), np.int64), np.ones((7, 5))), TypeError, "x"),
        ((np.ones((2, 5)), np.ones((7, 5)), np.ones(7, np.float32)), TypeError, "bias"),
        ((np.full((2, 5), np.nan), np.ones((7, 5))), ValueError, "x"),
    ],
)
def test_linear_bad_input(args, exc, name):
    with pytest.raises(exc, match=name):
        linear(*args)


# ----------------------------------------------------------------------------------------------------- activations
def test_erf_matches_math_erf_to_a_few_ulps():
    x = np.concatenate([np.linspace(-7, 7, 20001), [0.0, 0.46875, -0.46875, 4.0, -4.0, 1e-300, 26.0, 27.0, 40.0]])
    gold = np.array([math.erf(v) for v in x])
    got = erf(x)
    assert got.dtype == np.float64
    assert np.max(np.abs(got - gold) / np.maximum(np.abs(gold), 1e-300)) < 4 * np.finfo(np.float64).eps
    x32 = x.astype(np.float32)
    got32 = erf(x32)
    assert got32.dtype == np.float32
    np.testing.assert_allclose(got32, [math.erf(float(v)) for v in x32], rtol=4e-7, atol=1e-7)
    np.testing.assert_array_equal(erf(-x), -erf(x))


def test_gelu_tanh_and_exact():
    x = np.linspace(-8, 8, 1001)
    tanh_form = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    np.testing.assert_allclose(gelu(x), tanh_form, rtol=1e-14, atol=1e-15)
    exact = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x])
    np.testing.assert_allclose(gelu(x, approximate="none"), exact, rtol=1e-14, atol=1e-15)
    # The two forms differ by less than 1e-3 everywhere.
    assert np.max(np.abs(gelu(x) - gelu(x, approximate="none"))) < 1e-3
    x32 = x.astype(np.float32)
    assert gelu(x32).dtype == np.float32 and gelu(x32, "none").dtype == np.float32


def test_activations_on_extreme_inputs():
    x = np.array([-1e30, -100.0, 0.0, 100.0, 1e30], np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow to 0 is fine
        g = gelu(x)
        s = silu(x)
        e = gelu(x, approximate="none")
    for y in (g, s, e):
        assert np.all(np.isfinite(y))
        assert y[0] == 0 and y[-1] == np.float32(1e30)


def test_silu():
    x = np.linspace(-30, 30, 601)
    np.testing.assert_allclose(silu(x), x / (1 + np.exp(-x)), rtol=1e-14, atol=1e-300)


def test_activation_bad_input():
    with pytest.raises(ValueError, match="approximate"):
        gelu(np.ones(3), approximate="erf")
    with pytest.raises(TypeError, match="x"):
        silu(np.ones(3, np.int32))
    with pytest.raises(ValueError, match="x"):
        gelu(np.array([np.nan]))


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu_matches_torch(approximate):
    torch = pytest.importorskip("torch")
    x = np.linspace(-10, 10, 2001).astype(np.float32)
    want = torch.nn.functional.gelu(torch.from_numpy(x), approximate=approximate).numpy()
    np.testing.assert_allclose(gelu(x, approximate=approximate), want, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(silu(x), torch.nn.functional.silu(torch.from_numpy(x)).numpy(), rtol=2e-6, atol=2e-6)


# ------------------------------------------------------------------------------------------------------------ MLPs
@pytest.mark.parametrize("activation", ["gelu", "gelu_exact", "silu", "relu"])
def test_mlp(activation):
    rng = _rng(1)
    x = rng.standard_normal((3, 4))
    w1, b1 = rng.standard_normal((9, 4)), rng.standard_normal(9)
    w2, b2 = rng.standard_normal((5, 9)), rng.standard_normal(5)
    h = x @ w1.T + b1
    act = {
        "gelu": gelu(h),
        "gelu_exact": gelu(h, approximate="none"),
        "silu": h / (1 + np.exp(-h)),
        "relu": np.maximum(h, 0),
    }[activation]
    np.testing.assert_allclose(mlp(x, w1, b1, w2, b2, activation=activation), act @ w2.T + b2, rtol=1e-12)
    np.testing.assert_allclose(mlp(x, w1, None, w2, None), gelu(x @ w1.T) @ w2.T, rtol=1e-12)


def test_mlp_bad_input():
    x = np.ones((2, 4))
    with pytest.raises(ValueError, match="activation"):
        mlp(x, np.ones((9, 4)), None, np.ones((5, 9)), None, activation="tanh")
    with pytest.raises(ValueError, match="w2"):
        mlp(x, np.ones((9, 4)), None, np.ones((5, 8)), None)


def test_swiglu():
    rng = _rng(2)
    x = rng.standard_normal((2, 3, 6)).astype(np.float32)
    wg, wu, wd = (rng.standard_normal(s).astype(np.float32) for s in ((10, 6), (10, 6), (6, 10)))
    g = x @ wg.T
    want = ((g / (1 + np.exp(-g))) * (x @ wu.T)) @ wd.T
    y = swiglu(x, wg, wu, wd)
    assert y.dtype == np.float32 and y.shape == (2, 3, 6)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="w_up"):
        swiglu(x, wg, wu[:9], wd)
    with pytest.raises(ValueError, match="w_down"):
        swiglu(x, wg, wu, wd[:, :9])


# ------------------------------------------------------------------------------------------------- patch embedding
def test_patchify_ordering():
    b, h, w, c, p = 2, 4, 6, 3, 2
    # Encode (batch, row, column, channel) in each value so that the layout can be read back.
    img = np.zeros((b, h, w, c))
    for idx in np.ndindex(img.shape):
        img[idx] = idx[0] * 1000 + idx[1] * 100 + idx[2] * 10 + idx[3]
    patches = patchify(img, p)
    assert patches.shape == (b, (h // p) * (w // p), p * p * c)
    grid_w = w // p
    for bi in range(b):
        for n in range(patches.shape[1]):
            r, col = divmod(n, grid_w)  # patches row-major over the grid
            for i in range(p):
                for j in range(p):
                    for ch in range(c):
                        want = bi * 1000 + (r * p + i) * 100 + (col * p + j) * 10 + ch
                        assert patches[bi, n, (i * p + j) * c + ch] == want
    np.testing.assert_array_equal(patchify(img[1], p), patches[1])  # a single [H, W, C] image


def test_patch_embed_equals_strided_convolution():
    rng = _rng(3)
    img = rng.standard_normal((1, 6, 9, 2)).astype(np.float32)
    p, dim = 3, 5
    kernel = rng.standard_normal((dim, p, p, 2)).astype(np.float32)  # channels-last conv kernel
    bias = rng.standard_normal(dim).astype(np.float32)
    tokens = patch_embed(img, kernel.reshape(dim, -1), bias, p)
    assert tokens.shape == (1, 6, dim) and tokens.dtype == np.float32
    for n in range(6):
        r, c = divmod(n, 3)
        window = img[0, r * p : (r + 1) * p, c * p : (c + 1) * p].astype(np.float64)
        want = np.einsum("ijc,dijc->d", window, kernel.astype(np.float64)) + bias
        np.testing.assert_allclose(tokens[0, n], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "img,patch,exc,name",
    [
        (np.ones((5, 4, 3)), 2, ValueError, "divisible"),
        (np.ones((4, 4)), 2, ValueError, "images"),
        (np.ones((4, 4, 3), np.uint8), 2, TypeError, "images"),
        (np.ones((4, 4, 3)), 0, ValueError, "patch"),
        (np.ones((4, 4, 3)), 2.0, TypeError, "patch"),
    ],
)
def test_patchify_bad_input(img, patch, exc, name):
    with pytest.raises(exc, match=name):
        patchify(img, patch)


def test_patch_embed_bad_weight():
    with pytest.raises(ValueError, match="weight"):
        patch_embed(np.ones((4, 4, 3)), np.ones((5, 11)), np.ones(5), 2)


# -------------------------------------------------------------------------------------------------------- KV cache
def test_kvcache_append_is_functional():
    cache = empty_cache(2, 3, 4)
    assert len(cache) == 0 and cache.dtype == np.float32 and cache.value_dim == 4
    k1 = np.ones((2, 3, 1, 4), np.float32)
    c1 = append(cache, k1, k1 * 2)
    c2 = append(c1, k1 * 3, k1 * 4)
    assert (len(cache), len(c1), len(c2)) == (0, 1, 2)
    np.testing.assert_array_equal(c2.k[:, :, 1], 3)
    np.testing.assert_array_equal(c2.v[:, :, 0], 2)
    assert c2.nbytes == 2 * 2 * 3 * 2 * 4 * 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        c2.k = k1  # type: ignore[misc]
    big = append(empty_cache(1, 1, 2, value_dim=5, dtype=np.float64), np.zeros((1, 1, 7, 2)), np.zeros((1, 1, 7, 5)))
    assert len(big) == 7 and big.head_dim == 2 and big.value_dim == 5 and big.kv_heads == 1 and big.batch == 1


def test_kvcache_bad_input():
    cache = empty_cache(1, 2, 4)
    ok = np.ones((1, 2, 1, 4), np.float32)
    with pytest.raises(ValueError, match="k_new"):
        append(cache, np.ones((1, 3, 1, 4), np.float32), ok)
    with pytest.raises(ValueError, match="k_new"):
        append(cache, np.ones((1, 2, 1, 5), np.float32), ok)
    with pytest.raises(ValueError, match="v_new"):
        append(cache, ok, np.ones((1, 2, 2, 4), np.float32))
    with pytest.raises(TypeError, match="k_new"):
        append(cache, ok.astype(np.float64), ok)
    with pytest.raises(TypeError, match="cache"):
        append((ok, ok), ok, ok)
    with pytest.raises(ValueError, match="v"):
        KVCache(np.ones((1, 2, 3, 4)), np.ones((1, 2, 2, 4)))
    with pytest.raises(TypeError, match="dtype"):
        empty_cache(1, 1, 4, dtype=np.int32)
    with pytest.raises(ValueError, match="batch"):
        empty_cache(0, 1, 4)
