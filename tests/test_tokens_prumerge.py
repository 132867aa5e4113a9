"""LLaVA-PruMerge / PruMerge+: the outlier rule, the stride samples, the merge rule of the authors' code, and the
policy on the tiny VLM."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mllm_ref.tokens._common import keep_count
from mllm_ref.tokens.prumerge import (
    PruMergePolicy,
    _case,
    make_policy,
    neighbours,
    outlier_threshold,
    prumerge,
    select_tokens,
)

SIZES = ["tiny", "small", "plus", "forced", "forced-plus"]
cases = st.builds(lambda size, seed: _case(size, np.random.default_rng(seed)), st.sampled_from(SIZES),
                  st.integers(0, 2**32 - 1))  # fmt: skip


def test_hand_computed_example():
    # Q1 = 0.0475, Q3 = 0.0625 (linear interpolation) -> threshold 0.085: token 2 is the only outlier.
    a = np.array([0.03, 0.05, 0.6, 0.04, 0.05, 0.06, 0.05, 0.07], dtype=np.float64)
    keys = np.zeros((8, 2))
    keys[2] = [1.0, 0.0]
    keys[7] = [1.0, 0.01]
    keys[[3, 4, 5, 6]] = [[0.0, 1.0]] * 4
    keys[0] = [0.9, 0.1]
    keys[1] = [0.8, 0.6]
    x = np.arange(16, dtype=np.float64).reshape(8, 2)
    keep, merged = prumerge(a, keys, x, k_neighbors=2)
    assert outlier_threshold(a) == pytest.approx(0.085)
    assert keep.tolist() == [2]
    # neighbours of 2 by cosine: 7 (0.99995), 0 (0.9939), then 1 (0.8)
    want = x[2] + 0.07 * x[7] + 0.03 * x[0]
    np.testing.assert_allclose(merged[0], want)
    pruned = [0, 1, 3, 4, 5, 6, 7]
    np.testing.assert_allclose(merged[1], a[pruned] @ x[pruned])
    assert merged.shape == (2, 2)
    _, no_extra = prumerge(a, keys, x, k_neighbors=2, extra_token=False)
    assert no_extra.shape == (1, 2)


@given(cases)
def test_kept_set_is_the_iqr_outliers(kw):
    keep, merged = prumerge(**kw)
    a = kw["cls_attn"].astype(np.float64)
    assert np.all(np.diff(keep) > 0), "kept indices increase"
    if kw["keep_ratio"] is not None:
        assert keep.size == keep_count(a.size, kw["keep_ratio"])
    else:
        outliers = np.flatnonzero(a > outlier_threshold(a))
        if kw["plus"]:
            assert set(outliers) <= set(keep)
        else:
            assert keep.tolist() == outliers.tolist()
    extra = kw["extra_token"] and keep.size < a.size
    assert merged.shape == (keep.size + extra, kw["features"].shape[1])
    assert merged.dtype == kw["features"].dtype


def test_percentiles_follow_numpy_linear_interpolation():
    a = np.array([1.0, 2.0, 3.0, 4.0, 100.0])
    q1, q3 = 2.0, 4.0
    assert outlier_threshold(a) == q3 + 1.5 * (q3 - q1)
    assert select_tokens(a).tolist() == [4]


def test_plus_adds_the_codes_stride_samples():
    n = 576
    a = np.ones(n)
    a[np.arange(5, n, 18)] = 50.0  # 32 outliers: r = 32/576, step = int(1/r) = 18, stride = 6
    keep = select_tokens(a, plus=True)
    outliers = np.arange(5, n, 18)
    assert set(outliers) <= set(keep)
    assert set(range(0, 575, 6)) <= set(keep)
    assert keep.size == len(set(outliers) | set(range(0, 575, 6)))
    assert select_tokens(a).tolist() == outliers.tolist()


def test_flat_attention_keeps_the_first_maximum():
    assert select_tokens(np.full(10, 0.1)).tolist() == [0]
    a = np.full(10, 0.1)
    a[[3, 7]] = 0.1  # all equal: still no outlier
    assert select_tokens(a).tolist() == [0]


@pytest.mark.parametrize("plus", [False, True])
@pytest.mark.parametrize("ratio", [0.05, 0.25, 0.5, 1.0])
def test_forced_ratio_keeps_exactly_the_asked_count(plus, ratio):
    rng = np.random.default_rng(1)
    a = rng.random(144)
    keep = select_tokens(a, plus=plus, keep_ratio=ratio)
    assert keep.size == keep_count(144, ratio) and np.all(np.diff(keep) > 0)
    if not plus:
        assert set(np.argsort(-a)[: keep.size]) == set(keep)


@given(cases)
def test_no_neighbours_and_no_extra_token_keeps_the_rows(kw):
    kw = {**kw, "k_neighbors": 0, "extra_token": False}
    keep, merged = prumerge(**kw)
    np.testing.assert_array_equal(merged, kw["features"][keep])


def test_ratio_one_without_merging_is_the_identity():
    kw = _case("small", np.random.default_rng(3))
    keep, merged = prumerge(**{**kw, "keep_ratio": 1.0, "k_neighbors": 0})
    assert keep.tolist() == list(range(40))
    np.testing.assert_array_equal(merged, kw["features"])


@given(cases)
def test_merge_rule_is_the_codes(kw):
    keep, merged = prumerge(**kw)
    x = kw["features"].astype(np.float64)
    a = kw["cls_attn"].astype(np.float64)
    nbr, _ = neighbours(kw["keys"].astype(np.float64), keep, kw["k_neighbors"])
    for i, p in enumerate(keep):
        assert p not in nbr[i]
        np.testing.assert_allclose(merged[i], x[p] + a[nbr[i]] @ x[nbr[i]], rtol=1e-5, atol=1e-5)
    if merged.shape[0] > keep.size:
        pruned = np.setdiff1d(np.arange(a.size), keep)
        np.testing.assert_allclose(merged[-1], a[pruned] @ x[pruned], rtol=1e-5, atol=1e-5)


@given(st.sampled_from(["tiny", "small", "forced"]), st.integers(0, 2**32 - 1))
def test_permutation_equivariant_without_samples(size, seed):
    kw = _case(size, np.random.default_rng(seed))
    perm = np.random.default_rng(seed + 1).permutation(kw["cls_attn"].size)
    keep, merged = prumerge(**kw)
    pkw = {**kw, "cls_attn": kw["cls_attn"][perm], "keys": kw["keys"][perm], "features": kw["features"][perm]}
    pkeep, pmerged = prumerge(**pkw)
    assert sorted(perm[pkeep].tolist()) == keep.tolist()
    order = np.argsort(perm[pkeep])
    k = keep.size
    np.testing.assert_allclose(pmerged[:k][order], merged[:k], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pmerged[k:], merged[k:], rtol=1e-5, atol=1e-6)


def test_float64_in_float64_out():
    kw = _case("small", np.random.default_rng(0))
    kw64 = {k: v.astype(np.float64) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
    assert prumerge(**kw64)[1].dtype == np.float64


def test_bad_arguments_name_themselves():
    kw = _case("tiny", np.random.default_rng(0))
    with pytest.raises(ValueError, match="cls_attn"):
        prumerge(**{**kw, "cls_attn": -kw["cls_attn"]})
    with pytest.raises(ValueError, match="keys"):
        prumerge(**{**kw, "keys": kw["keys"][:-1]})
    with pytest.raises(TypeError, match="plus"):
        prumerge(**{**kw, "plus": 1})
    with pytest.raises(ValueError, match="keep_ratio"):
        prumerge(**{**kw, "keep_ratio": 0.0})


# ------------------------------------------------------------------------------------------------- the tiny VLM
@pytest.mark.parametrize("policy", [PruMergePolicy(plus=True), make_policy(0.25), make_policy(0.1, plus=True)])
def test_policy_on_the_tiny_vlm(model, policy):
    from mllm_ref.tinyvlm import tokenizer, world
    from mllm_ref.tinyvlm.model import Trace, encode_tokens, prefill
    from mllm_ref.tinyvlm.plugs import Plugs, VisualTokens

    ex = world.vqa_set(world.EVAL_SEED, 1)[0]
    ids = np.asarray(tokenizer.prompt_ids(ex.qa.question), dtype=np.int64)
    plugs = Plugs(token_policy=policy)
    _, view, _ = encode_tokens(model, ex.image, Plugs(), ids, want_attention=True)  # the plain encoder's view
    out = policy.after_encoder(VisualTokens.from_patches(view.features, (12, 12)), ids, view)
    score = view.attn.mean(axis=(0, 1))
    keys = view.keys.transpose(1, 0, 2).reshape(144, -1)
    keep, merged = prumerge(score, keys, view.features, k_neighbors=8, plus=policy.plus,
                            keep_ratio=policy.keep_ratio)  # fmt: skip
    np.testing.assert_array_equal(out.x, merged)
    assert np.array_equal(out.source[keep], np.arange(keep.size)), "a kept patch maps to its own token"
    assert out.source.min() >= 0 and out.source.max() < out.n  # with the extra token every patch has a home
    assert out.size.sum() >= 144 - 1e-3
    if policy.keep_ratio is not None:
        assert keep.size == keep_count(144, policy.keep_ratio)
    trace = Trace()
    logits, _ = prefill(model, ex.image, ids, plugs, trace)
    assert np.isfinite(logits).all() and trace.n_visual == out.n
    assert trace.layer_tokens[0] == out.n + ids.size  # the text tokens all reach the decoder, untouched


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_fast_paths_break_neighbour_ties_like_the_reference(backend):
    from mllm_ref.oracle import registry

    fast = registry.get("tokens.prumerge").fast_path(backend)
    if fast is None:
        pytest.skip(f"no {backend}")
    a = np.array([0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 2.0])  # token 9 is the outlier
    keys = np.ones((10, 3))  # every similarity ties: the neighbours are the lowest indices 0, 1, 2
    x = np.random.default_rng(0).standard_normal((10, 4))
    keep, merged = prumerge(a, keys, x, k_neighbors=3)
    np.testing.assert_allclose(merged[0], x[9] + a[:3] @ x[:3])
    fkeep, fmerged = fast(a, keys, x, k_neighbors=3)
    assert fkeep.tolist() == keep.tolist()
    np.testing.assert_allclose(fmerged, merged, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "numba", "torch"])
@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_key_scale_does_not_matter(backend, scale):
    from mllm_ref.oracle import registry

    t = registry.get("tokens.prumerge")
    fn = t.reference if backend == "reference" else t.fast_path(backend)
    if fn is None:
        pytest.skip(f"no {backend}")
    kw = _case("small", np.random.default_rng(0))
    keep, merged = prumerge(**kw)
    skeep, smerged = fn(**{**kw, "keys": kw["keys"] * np.float32(scale)})
    assert skeep.tolist() == keep.tolist()
    np.testing.assert_allclose(smerged, merged, rtol=1e-5, atol=1e-6)
