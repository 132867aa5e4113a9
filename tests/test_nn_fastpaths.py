"""Direct checks of the Numba and torch fast paths of mllm_ref.nn on hand-picked cases.

The generic registry-driven comparison lives with the oracle; these cases target the kernels' own edge paths:
block boundaries, the parallel variants, non-contiguous inputs, GQA packing, decode, fully masked rows, and
bad input raising the reference's errors.
"""

import importlib

import numpy as np
import pytest

import mllm_ref.nn as ref

BACKENDS = ["numba", "torch"]
PACKAGE = {"numba": "kernels_numba", "torch": "kernels_torch"}


def fast(backend: str, name: str):
    pytest.importorskip(backend)
    return getattr(importlib.import_module(f"{PACKAGE[backend]}.nn.{name}"), name)


def _to64(kw):
    """The same arguments with every float array in float64."""
    return {k: v.astype(np.float64) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v for k, v in kw.items()}


def check(backend, name, kw, rtol=2e-5, atol=2e-6):
    """The fast path on float32 ``kw`` is close to the float64 reference, keeps dtype and shape; float64 too."""
    f = fast(backend, name)
    reference = getattr(ref, name)
    gold = reference(**_to64(kw))
    got = f(**kw)
    got64 = f(**_to64(kw))
    golds = gold if isinstance(gold, tuple) else (gold,)
    gots = got if isinstance(got, tuple) else (got,)
    gots64 = got64 if isinstance(got64, tuple) else (got64,)
    assert len(gots) == len(golds)
    for g, a, a64 in zip(golds, gots, gots64):
        assert isinstance(a, np.ndarray) and a.dtype == np.float32 and a.shape == g.shape
        assert a64.dtype == np.float64
        np.testing.assert_allclose(a, g, rtol=rtol, atol=atol)
        np.testing.assert_allclose(a64, g, rtol=1e-12, atol=1e-13)
    return got


def _rng(seed=0):
    return np.random.default_rng(seed)


# ------------------------------------------------------------------------------------------------------- softmax
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "shape,axis", [((1,), -1), ((3, 7), -1), ((5, 13, 31), 1), ((2, 1025), -1), ((300, 600), -1), ((4, 5000), 1)]
)
def test_softmax(backend, shape, axis):
    x = (_rng().standard_normal(shape) * 4).astype(np.float32)
    check(backend, "softmax", {"x": x, "axis": axis})


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_huge_logits(backend):
    f = fast(backend, "softmax")
    np.testing.assert_array_equal(f(np.array([1e4, 0, -1e4], np.float32)), [1, 0, 0])
    np.testing.assert_array_equal(f(np.array([3e38, -3e38, 3e38], np.float32)), [0.5, 0, 0.5])


# --------------------------------------------------------------------------------------------------------- norms
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1,), (3, 7), (2, 5, 1031), (300, 513)])
def test_norms(backend, shape):
    rng = _rng(1)
    x = (rng.standard_normal(shape) * 3 + 0.5).astype(np.float32)
    w = (1 + 0.1 * rng.standard_normal(shape[-1])).astype(np.float32)
    b = (0.1 * rng.standard_normal(shape[-1])).astype(np.float32)
    check(backend, "rmsnorm", {"x": x, "weight": w, "eps": 1e-6})
    check(backend, "layernorm", {"x": x, "weight": w, "bias": b, "eps": 1e-5})


@pytest.mark.parametrize("backend", BACKENDS)
def test_norms_non_contiguous_and_zero_rows(backend):
    x = _rng(2).standard_normal((6, 20)).astype(np.float32)[:, ::2]
    x[1] = 0
    w = np.ones(10, np.float32)
    y = check(backend, "rmsnorm", {"x": x, "weight": w, "eps": 1e-6})
    assert np.all(y[1] == 0)
    check(backend, "layernorm", {"x": x, "weight": w, "bias": w * 0, "eps": 1e-5})


# ---------------------------------------------------------------------------------------------------------- rope
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "x_shape,positions",
    [
        ((1, 2), np.array([7])),
        ((3, 11, 8), np.arange(11) + 5),
        ((2, 2, 15, 12), np.stack(np.meshgrid(np.arange(3), np.arange(5), indexing="ij"), -1).reshape(-1, 2)),
        ((1, 2, 13, 18), np.arange(39).reshape(13, 3) % 7),
        ((2, 4, 300, 64), np.arange(300) + 4000),
    ],
)
def test_rope(backend, x_shape, positions):
    x = _rng(3).standard_normal(x_shape).astype(np.float32)
    check(backend, "rope", {"x": x, "positions": positions, "theta": 10000.0})


@pytest.mark.parametrize("backend", BACKENDS)
def test_rope_non_contiguous(backend):
    x = _rng(4).standard_normal((4, 9, 16)).astype(np.float32)[::2]
    check(backend, "rope", {"x": x, "positions": np.arange(9), "theta": 500.0})


# ----------------------------------------------------------------------------------------------------- attention
# (B, Hq, Hkv, Tq, Tk, d, dv, causal, padding)
ATTENTION_CASES = [
    (1, 1, 1, 1, 1, 1, 1, True, False),  # every length 1
    (2, 3, 3, 7, 7, 5, 6, False, False),  # odd sizes, dv != d
    (1, 6, 2, 130, 130, 8, 8, True, False),  # prefill past BQ = 64 and BK = 128, GQA
    (1, 2, 2, 130, 130, 8, 8, False, False),  # the same, not causal
    (2, 4, 2, 70, 70, 13, 7, True, True),  # d not a multiple of 8, padding
    (2, 8, 2, 1, 257, 16, 16, True, True),  # decode across two key-block boundaries, GQA packing, padding
    (1, 4, 4, 5, 37, 16, 16, True, False),  # chunked prefill continuing a cache
    (1, 2, 1, 9, 4, 4, 4, True, False),  # more queries than keys: the first rows see nothing
    (3, 4, 1, 11, 11, 8, 8, True, True),  # MQA, left padding: some rows fully masked
    (1, 16, 2, 3, 200, 8, 8, False, True),  # g*Tq = 24 rows per item: transposed-key path for short queries
]


def _attention_kw(case, seed=0):
    b, hq, hkv, tq, tk, d, dv, causal, padding = case
    rng = _rng(seed)
    kw = {
        "q": rng.standard_normal((b, hq, tq, d)).astype(np.float32),
        "k": rng.standard_normal((b, hkv, tk, d)).astype(np.float32),
        "v": rng.standard_normal((b, hkv, tk, dv)).astype(np.float32),
        "causal": causal,
        "key_mask": None,
    }
    if padding:
        mask = np.ones((b, tk), bool)
        for i in range(1, b):
            mask[i, : 1 + (i * tk) // 3] = False
        kw["key_mask"] = mask
    return kw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ATTENTION_CASES)
@pytest.mark.parametrize("return_weights", [False, True])
def test_attention(backend, case, return_weights):
    check(backend, "attention", dict(_attention_kw(case), return_weights=return_weights))


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_scale_and_fully_masked_batch(backend):
    kw = _attention_kw((2, 4, 2, 6, 6, 8, 8, True, False), seed=1)
    kw["key_mask"] = np.array([[False] * 6, [True] * 6])
    kw["scale"] = 0.3
    out = check(backend, "attention", kw)
    assert np.all(out[0] == 0)
    out, w = check(backend, "attention", dict(kw, return_weights=True))
    assert np.all(out[0] == 0) and np.all(w[0] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("which", ["k", "v"])
def test_attention_rejects_nonfinite_kv_anywhere(backend, causal, which):
    f = fast(backend, "attention")
    kw = _attention_kw((1, 2, 1, 3, 300, 8, 8, causal, True))
    kw["key_mask"][0, 290:] = False
    for where in (0, 150, 299):  # first key, middle block, a padded last key
        bad = dict(kw)
        bad[which] = kw[which].copy()
        bad[which][0, 0, where, 3] = np.nan
        with pytest.raises(ValueError, match=which):
            ref.attention(**bad)
        with pytest.raises(ValueError, match=which):
            f(**bad)


BAD_INPUTS = [
    ("softmax", {"x": np.arange(4)}),
    ("softmax", {"x": np.array([1.0, np.nan], np.float32)}),
    ("softmax", {"x": np.ones((2, 3), np.float32), "axis": 2}),
    ("rmsnorm", {"x": np.ones((2, 4), np.float32), "weight": np.ones(3, np.float32)}),
    ("rmsnorm", {"x": np.ones((2, 4), np.float32), "weight": np.ones(4)}),
    ("layernorm", {"x": np.ones((2, 4), np.float32), "weight": np.ones(4, np.float32), "bias": np.ones(5, np.float32)}),
    ("rope", {"x": np.ones((3, 5), np.float32), "positions": np.arange(3)}),
    ("rope", {"x": np.ones((3, 4), np.float32), "positions": np.arange(4)}),
    ("attention", {"q": np.ones((1, 3, 2, 4), np.float32), "k": np.ones((1, 2, 5, 4), np.float32),
                   "v": np.ones((1, 2, 5, 4), np.float32)}),  # fmt: skip
    ("attention", {"q": np.ones((1, 2, 2, 4), np.float32), "k": np.ones((1, 2, 5, 4), np.float32),
                   "v": np.ones((1, 2, 5, 4), np.float32), "key_mask": np.ones((1, 5), np.int8)}),  # fmt: skip
    ("attention", {"q": np.ones((1, 2, 2, 4), np.float32), "k": np.ones((1, 2, 5, 3), np.float32),
                   "v": np.ones((1, 2, 5, 4), np.float32)}),  # fmt: skip
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,kw", BAD_INPUTS)
def test_bad_input_raises_like_the_reference(backend, name, kw):
    f = fast(backend, name)
    with pytest.raises((TypeError, ValueError)) as want:
        getattr(ref, name)(**kw)
    with pytest.raises(want.type) as got:
        f(**kw)
    assert str(got.value) == str(want.value)


# -------------------------------------------------------------------------------------------------------- helpers
def test_fast_exp_accuracy():
    pytest.importorskip("numba")
    from kernels_numba.nn._fastexp import exp_array

    x = np.linspace(-100, 88, 100001).astype(np.float32)
    y = exp_array(x)
    gold = np.exp(x.astype(np.float64))
    live = x > -87.3
    rel = np.abs(y[live] - gold[live]) / gold[live]
    assert rel.max() < 2.5 * np.finfo(np.float32).eps  # within about 2 ulps
    assert np.all(y[~live] == 0)
    assert exp_array(np.array([0.0], np.float32))[0] == 1
    np.testing.assert_allclose(exp_array(x.astype(np.float64)), gold, rtol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_stays_float16(backend):
    rng = _rng(5)
    x = rng.standard_normal((3, 8)).astype(np.float16)
    w = np.ones(8, np.float16)
    q = rng.standard_normal((1, 2, 3, 8)).astype(np.float16)
    calls = [
        ("softmax", {"x": x}),
        ("rmsnorm", {"x": x, "weight": w}),
        ("layernorm", {"x": x, "weight": w, "bias": w}),
        ("rope", {"x": x, "positions": np.arange(3)}),
        ("attention", {"q": q, "k": q, "v": q, "causal": True}),
    ]
    for name, kw in calls:
        got = fast(backend, name)(**kw)
        assert got.dtype == np.float16, name
        np.testing.assert_allclose(got.astype(np.float64), getattr(ref, name)(**_to64(kw)), atol=5e-3, err_msg=name)
