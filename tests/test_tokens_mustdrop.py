"""MustDrop's three stages: spatial merging of similar adjacent tokens, the dual-attention filter, the output-aware
cache, and their plugs on the tiny VLM."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mllm_ref.tinyvlm.plugs import Plugs, PromptInfo
from mllm_ref.tokens._common import keep_count
from mllm_ref.tokens.mustdrop import (
    MustDropPolicy,
    OutputAwareKV,
    _case,
    dual_attention_filter,
    dual_attention_scores,
    key_set,
    make_plugs,
    make_policy,
    output_aware_keep,
    spatial_merge,
    window_scores,
    windows,
)

seeds = st.integers(0, 2**32 - 1)


# ------------------------------------------------------------------------------------------ (a) spatial merging
def test_windows_cover_the_grid_and_are_cut_at_the_border():
    ws = windows(4, 5, 3)
    assert [w.size for w in ws] == [9, 6, 3, 2]
    assert sorted(np.concatenate(ws).tolist()) == list(range(20))
    assert ws[0].tolist() == [0, 1, 2, 5, 6, 7, 10, 11, 12]


def test_window_score_is_the_mean_off_diagonal_cosine():
    x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]])
    # one 2 x 2 window: cosines 0 (0,1), 1/sqrt2 (0,2), 1 (0,3), 1/sqrt2 (1,2), 0 (1,3), 1/sqrt2 (2,3)
    want = (0 + 3 / np.sqrt(2) + 1 + 0) / 6
    np.testing.assert_allclose(window_scores(x, 2, 2, 2), [want])
    assert window_scores(x, 4, 1, 1).tolist() == [-np.inf] * 4  # one-token windows never merge


def test_hand_computed_merge():
    # 2 x 4 grid, 2 x 2 windows: the left window holds near-copies, the right one orthogonal tokens.
    x = np.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [1.0, 0.0], [0.9, 0.0], [1.0, 0.05], [0.0, -1.0], [-1.0, 0.0]])
    size = np.ones(8)
    size[1] = 3.0
    y, s, dst = spatial_merge(x, size, 2, 4, window=2, threshold=0.8)
    # left window = tokens 0, 1, 4, 5 -> one token at token 0's place; 2, 3, 6, 7 stay
    assert dst.tolist() == [0, 0, 1, 2, 0, 0, 3, 4]
    np.testing.assert_allclose(y[0], (x[0] + 3 * x[1] + x[4] + x[5]) / 6)
    assert s.tolist() == [6.0, 1.0, 1.0, 1.0, 1.0]
    np.testing.assert_array_equal(y[1:], x[[2, 3, 6, 7]])


@st.composite
def grids(draw):
    rows, cols = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    rng = np.random.default_rng(draw(seeds))
    base = rng.standard_normal((rows * cols, 4))
    base[rng.random(rows * cols) < 0.5] = [1.0, 0.5, 0.0, 0.2]  # many identical tokens: merges happen
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    size = rng.integers(1, 4, rows * cols).astype(dtype)
    return base.astype(dtype), size, rows, cols, draw(st.integers(1, 4)), draw(st.sampled_from([0.5, 0.8, 0.95]))


@given(grids())
def test_merge_preserves_the_size_weighted_sum_and_the_order(args):
    x, size, rows, cols, w, tau = args
    y, s, dst = spatial_merge(x, size, rows, cols, window=w, threshold=tau)
    assert y.dtype == x.dtype and s.dtype == size.dtype
    tol = 1e-4 if x.dtype == np.float32 else 1e-10
    np.testing.assert_allclose((s[:, None] * y).sum(0), (size[:, None] * x).sum(0), rtol=tol, atol=tol)
    np.testing.assert_allclose(s.sum(), size.sum(), rtol=tol)
    firsts = np.array([np.flatnonzero(dst == j).min() for j in range(y.shape[0])])
    assert np.all(np.diff(firsts) > 0), "outputs keep the order of their first token"
    for members, score in zip(windows(rows, cols, w), window_scores(x, rows, cols, w)):
        merged = np.unique(dst[members]).size == 1 and members.size > 1
        assert merged == (score >= tau)


@given(grids())
def test_threshold_above_one_is_the_identity(args):
    x, size, rows, cols, w, _ = args
    y, s, dst = spatial_merge(x, size, rows, cols, window=w, threshold=1.5)
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(s, size)
    assert dst.tolist() == list(range(rows * cols))


def test_merge_checks_its_arguments():
    x, size = np.ones((6, 2)), np.ones(6)
    with pytest.raises(ValueError, match="rows"):
        spatial_merge(x, size, 2, 2)
    with pytest.raises(ValueError, match="size"):
        spatial_merge(x, -size, 2, 3)
    with pytest.raises(TypeError, match="size"):
        spatial_merge(x, size.astype(np.float32), 2, 3)


def test_key_set_is_the_top_ceil_share():
    scores = np.array([0.1, 0.5, 0.2, 0.5, 0.05])
    assert key_set(scores, 0.5).tolist() == [1, 2, 3]  # ceil(2.5) = 3 tokens, in increasing order
    assert key_set(scores, 0.08).tolist() == [1]  # ceil(0.4) = 1, the tie goes to the lower index
    assert key_set(np.ones(576), 0.08).size == 47  # the code: ceil(0.08 * 576) = ceil(46.08)


# ---------------------------------------------------------------------------------------- (b) dual attention
def test_hand_computed_dual_attention_filter():
    # one head, two text tokens, four visual tokens
    a = np.array([[[0.30, 0.05, 0.02, 0.01], [0.20, 0.04, 0.20, 0.02]]])
    g, m = dual_attention_scores(a)
    np.testing.assert_allclose(g, [0.5, 0.09, 0.22, 0.03])
    np.testing.assert_allclose(m, [0.3, 0.05, 0.2, 0.02])
    # global threshold 0.2 * 0.84 = 0.168: tokens 1 and 3 are low; individual 0.1: tokens 1, 3 low -> both dropped
    assert dual_attention_filter(a, global_thr=0.2, individual_thr=0.1).tolist() == [0, 2]
    # a token is dropped only if BOTH scores are low: with individual 0.04 token 1 (max 0.05) survives
    assert dual_attention_filter(a, global_thr=0.2, individual_thr=0.04).tolist() == [0, 1, 2]
    prot = np.array([False, False, False, True])
    assert dual_attention_filter(a, global_thr=0.2, individual_thr=0.1, protected=prot).tolist() == [0, 2, 3]


cases = st.builds(lambda size, seed: _case(size, np.random.default_rng(seed)),
                  st.sampled_from(["tiny", "small", "forced"]), seeds)  # fmt: skip


@given(cases)
def test_protected_tokens_are_never_dropped_and_order_is_stable(kw):
    keep = dual_attention_filter(**kw)
    assert np.all(np.diff(keep) > 0)
    if kw.get("protected") is not None and (kw["n_keep"] is None or kw["n_keep"] >= kw["protected"].sum()):
        assert set(np.flatnonzero(kw["protected"])) <= set(keep)
    if kw["n_keep"] is not None:
        assert keep.size == kw["n_keep"]


@given(cases)
def test_the_rule_is_the_papers(kw):
    kw = {**kw, "n_keep": None}
    keep = dual_attention_filter(**kw)
    g, m = dual_attention_scores(kw["attn"])
    prot = kw.get("protected")
    prot = np.zeros(g.size, bool) if prot is None else prot
    dropped = (g < kw["global_thr"] * g.sum()) & (m < kw["individual_thr"]) & ~prot
    assert keep.tolist() == np.flatnonzero(~dropped).tolist()


@given(cases)
def test_forced_count_agrees_with_the_thresholds(kw):
    kw = {**kw, "protected": None, "n_keep": None}
    keep = dual_attention_filter(**kw)
    forced = dual_attention_filter(**{**kw, "n_keep": max(1, keep.size)})
    if keep.size:
        assert forced.tolist() == keep.tolist()


@given(cases)
def test_zero_thresholds_keep_everything(kw):
    keep = dual_attention_filter(kw["attn"], global_thr=0.0, individual_thr=0.0)
    assert keep.tolist() == list(range(kw["attn"].shape[2]))


@given(cases, seeds)
def test_equivariant_in_visual_tokens_invariant_in_text_tokens_and_heads(kw, seed):
    rng = np.random.default_rng(seed)
    kw = {**kw, "n_keep": None}
    attn = kw["attn"]
    keep = dual_attention_filter(**kw)
    perm = rng.permutation(attn.shape[2])
    pkw = {**kw, "attn": attn[:, :, perm]}
    if kw.get("protected") is not None:
        pkw["protected"] = kw["protected"][perm]
    assert sorted(perm[dual_attention_filter(**pkw)].tolist()) == keep.tolist()
    shuffled = attn[rng.permutation(attn.shape[0])][:, rng.permutation(attn.shape[1])]
    assert dual_attention_filter(**{**kw, "attn": shuffled}).tolist() == keep.tolist()


# ---------------------------------------------------------------------------------------------- (c) decoding
def test_output_aware_keep_hand_example():
    attn = np.array([[[0.5, 0.001, 0.2, 0.299]], [[0.3, 0.003, 0.0, 0.697]]])  # H=2, Q=1, T=4, visual 0..2
    # head means: 0.4, 0.002, 0.1 (visual), 0.498 (text)
    assert output_aware_keep(attn, 3, 0.05).tolist() == [0, 2, 3]
    assert output_aware_keep(attn, 3, 0.0).tolist() == [0, 1, 2, 3]
    assert output_aware_keep(attn, 3, 0.9).tolist() == [3]  # text is never evicted
    assert output_aware_keep(attn, 0, 0.9).tolist() == [0, 1, 2, 3]


def test_output_aware_cache_evicts_and_tracks_the_visual_count():
    rng = np.random.default_rng(0)
    policy = OutputAwareKV(0.05)
    k, v = rng.standard_normal((2, 2, 7, 4)).astype(np.float32)
    info = PromptInfo(5, (12, 12), np.arange(5), np.array([3, 4]))
    cache = policy.store(0, k, v, None, info, positions=np.array([0, 0, 0, 0, 0, 1, 2]), n_visual=5)
    assert cache.n_visual == 5 and policy.nbytes(cache) == k.nbytes + v.nbytes
    attn = np.full((4, 1, 8), 0.01, dtype=np.float32)
    attn[:, 0, [1, 3]] = 0.3  # the new token attends to visual tokens 1 and 3 only
    k1, v1 = rng.standard_normal((2, 2, 1, 4)).astype(np.float32)
    new = policy.extend(0, cache, k1, v1, attn, position=3)
    rk, rv = policy.read(0, new)
    assert new.n_visual == 2 and rk.shape == (2, 2 + 2 + 1, 4)
    np.testing.assert_array_equal(rk[:, :2], k[:, [1, 3]])
    np.testing.assert_array_equal(rv[:, 2:4], v[:, 5:7])
    np.testing.assert_array_equal(rk[:, -1:], k1)
    assert policy.extend(0, cache, k1, v1, None, position=3).k.shape[1] == 8  # no attention (an exited layer): no eviction


# ------------------------------------------------------------------------------------------------- the tiny VLM
@pytest.mark.parametrize("keep_ratio", [16 / 144, 0.5, None])
def test_plugs_on_the_tiny_vlm(model, keep_ratio):
    from mllm_ref.tinyvlm import tokenizer, world
    from mllm_ref.tinyvlm.model import Trace, decode_step, encode_tokens, prefill

    ex = world.vqa_set(world.EVAL_SEED, 1)[1]
    ids = np.asarray(tokenizer.prompt_ids(ex.qa.question), dtype=np.int64)
    plugs = make_plugs(keep_ratio)
    policy = plugs.token_policy
    tokens, view, counts = encode_tokens(model, ex.image, plugs, ids, want_attention=True)
    assert counts[0][1] == tokens.n < 144, "stage (a) merged inside encoder block 0"
    assert np.all(tokens.source >= 0) and tokens.size.sum() == 144
    trace = Trace()
    logits, state = prefill(model, ex.image, ids, plugs, trace)
    after = policy.layer + 1  # the first layer that runs on the filtered tokens
    n_after = trace.layer_tokens[after] - ids.size
    if keep_ratio is not None:
        assert n_after == min(round(keep_ratio * 144), tokens.n)
    assert trace.layer_tokens[:after] == [tokens.n + ids.size] * after  # nothing dropped before the filter
    # the key set (protected after the connector) survives the prefill filter
    marked = policy.after_connector(tokens, ids, view)
    key_patches = np.flatnonzero(marked.protected[tokens.source])
    assert key_patches.size > 0 and np.all(trace.source[key_patches] >= 0)
    # stage (c): a decode step shrinks or keeps every layer's cache, never the text part
    before = [c.k.shape[1] for c in state.caches]
    _, state2 = decode_step(model, state, int(np.argmax(logits)), plugs)
    for c0, c1, b in zip(state.caches, state2.caches, before):
        assert c1.k.shape[1] <= b + 1 and c1.k.shape[1] - c1.n_visual == c0.k.shape[1] - c0.n_visual + 1


def test_make_policy_maps_the_ratio():
    assert make_policy(0.25).keep_ratio == 0.25 and make_policy(None).keep_ratio is None


@pytest.mark.parametrize("keep_ratio", [0.0, 0.02])
def test_a_tiny_keep_ratio_keeps_the_key_set(model, keep_ratio):
    """A forced count below the key set's size keeps the key set (no stage may drop it) instead of failing."""
    from mllm_ref.tinyvlm import tokenizer, world
    from mllm_ref.tinyvlm.model import Trace, prefill

    ex = world.vqa_set(world.EVAL_SEED, 1)[1]
    ids = tokenizer.prompt_ids(ex.qa.question)
    trace = Trace()
    plugs = make_plugs(keep_ratio)
    logits, _ = prefill(model, ex.image, ids, plugs, trace)
    assert np.isfinite(logits).all()
    layer = plugs.token_policy.layer
    assert 1 <= trace.layer_tokens[layer + 1] - len(ids) <= trace.layer_tokens[layer] - len(ids)


def test_text_rows_and_positions_pass_the_filter_unchanged(model):
    """The prefill filter keeps every text token, with its position id (the model refuses a policy
    whose kept indices miss a text token, see tests/test_tinyvlm_token_plug.py)."""
    from mllm_ref.tinyvlm import tokenizer, world
    from mllm_ref.tinyvlm.model import prefill

    seen = {}

    class Recorder(MustDropPolicy):
        def in_decoder(self, layer, view):
            seen[layer] = (view.hidden.copy(), view.positions.copy(), view.n_visual)
            return super().in_decoder(layer, view)

    ex = world.vqa_set(world.EVAL_SEED, 1)[1]
    ids = tokenizer.prompt_ids(ex.qa.question)
    recorder = Recorder(keep_ratio=0.25)
    prefill(model, ex.image, ids, Plugs(token_policy=recorder))
    _, pos1, nv1 = seen[recorder.layer]
    _, pos2, nv2 = seen[recorder.layer + 1]
    assert nv2 == keep_count(144, 0.25) < nv1
    assert pos2[nv2:].tolist() == pos1[nv1:].tolist() == list(range(1, len(ids) + 1))
    assert np.all(pos2[:nv2] == 0)
