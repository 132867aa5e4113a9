"""ToMe (tokens.tome): the invariants of bipartite soft matching and size-weighted merging, hand-computed examples
that pin the paper's rule and order, and the tiny-VLM policy. Fast paths are checked by the generic registry
tests (tests/test_registry_properties.py); here they are run on the tie and hand cases too."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from mllm_ref.oracle import registry
from mllm_ref.tinyvlm import world
from mllm_ref.tinyvlm.model import Trace, _proportional_attention, encode_tokens, load, prefill
from mllm_ref.tinyvlm.plugs import Plugs, TokenPolicy
from mllm_ref.tinyvlm.tokenizer import prompt_ids
from mllm_ref.tokens._common import keep_count, l2_normalize, merge_into
from mllm_ref.tokens.tome import (
    DEFAULT_R,
    ToMePolicy,
    compose_source,
    make_policy,
    schedule_for,
    separated_keys,
    tome_merge,
    unmerge,
)

TECH = registry.get("tokens.tome")
IMPLS = {"reference": tome_merge} | {b: TECH.fast_path(b) for b in registry.BACKENDS if TECH.fast_path(b)}


@st.composite
def merges(draw, separated: bool = False):
    """Random tokens, keys (any, or with well-separated scores), sizes and r."""
    n = draw(st.integers(1, 24))
    h = draw(st.integers(1, 3))
    d = draw(st.integers(n // 2 + 1, n // 2 + 4)) if separated else draw(st.integers(1, 6))
    c = draw(st.integers(1, 5))
    r = draw(st.integers(0, n // 2))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    keys = separated_keys(n, h, d, rng) if separated else rng.standard_normal((h, n, d)).astype(np.float32)
    x = rng.standard_normal((n, c)).astype(np.float32)
    size = rng.integers(1, 6, n).astype(np.float32)
    return x, keys, r, size


# ---------------------------------------------------------------------------------------------- invariants
@given(merges())
def test_r0_is_the_identity(case):
    x, keys, _, size = case
    merged, s, umap = tome_merge(x, keys, 0, size)
    assert np.array_equal(merged, x) and np.array_equal(s, size) and np.array_equal(umap, np.arange(len(x)))


@given(merges())
def test_exactly_n_minus_r_tokens_and_sums_preserved(case):
    x, keys, r, size = case
    merged, s, umap = tome_merge(x, keys, r, size)
    n = len(x)
    assert merged.shape == (n - r, x.shape[1]) and s.shape == (n - r,) and umap.shape == (n,)
    assert merged.dtype == x.dtype and s.dtype == size.dtype and umap.dtype == np.int64
    assert np.array_equal(np.unique(umap), np.arange(n - r)), "every output token carries at least one input"
    np.testing.assert_allclose(s, np.bincount(umap, weights=size, minlength=n - r), rtol=1e-6)
    np.testing.assert_allclose(s.sum(), size.sum(), rtol=1e-6)
    np.testing.assert_allclose((s[:, None] * merged).sum(0), (size[:, None] * x).sum(0), rtol=1e-4, atol=1e-4)


@given(merges())
def test_unmerge_of_merge_reproduces_the_merged_values(case):
    x, keys, r, size = case
    merged, s, umap = tome_merge(x, keys, r, size)
    back = unmerge(merged, umap)
    assert np.array_equal(back, merged[umap])
    again, s2 = merge_into(back, size, umap, len(merged))  # every member of a group equals the group's mean
    np.testing.assert_allclose(again, merged, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s2, s, rtol=1e-6)


@given(merges(separated=True))
def test_the_r_best_edges_merge_and_the_order_is_tomes(case):
    """Merged A tokens are the r with the highest best-match score; outputs are [unmerged A by decreasing score,
    then every B in order]; a B token never merges away. (r = 0 is the identity, in the input order.)"""
    x, keys, r, size = case
    assume(r > 0)
    n = len(x)
    n_a, n_b = (n + 1) // 2, n // 2
    _, _, umap = tome_merge(x, keys, r, size)
    m = l2_normalize(keys.astype(np.float64).mean(0))
    scores = m[0::2] @ m[1::2].T
    best = scores.max(1) if n_b else np.zeros(n_a)
    assert np.array_equal(umap[1::2], n_a - r + np.arange(n_b))
    merged_a = np.flatnonzero(umap[0::2] >= n_a - r)
    assert np.array_equal(np.sort(merged_a), np.sort(np.argsort(-best, kind="stable")[:r]))
    assert np.array_equal(umap[2 * merged_a], n_a - r + scores[merged_a].argmax(1))
    kept_a = np.flatnonzero(umap[0::2] < n_a - r)
    by_output = kept_a[np.argsort(umap[2 * kept_a])]
    assert np.all(np.diff(best[by_output]) <= 0), "unmerged A tokens come in decreasing score order"


# ------------------------------------------------------------------------------------------ hand-computed rule
# A = {0, 2, 4}, B = {1, 3}. Best matches: 0 -> 1 (cos .995), 2 -> 3 (.981), 4 -> 3 (.832).
HAND_METRIC = np.array([[1, 0], [1, 0.1], [0, 1], [0.2, 1], [1, 1]], dtype=np.float32)
HAND_X = np.arange(10, dtype=np.float32).reshape(5, 2)
HAND_SIZE = np.array([1, 3, 2, 2, 1], dtype=np.float32)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_hand_example_r1_and_r2(impl):
    fn = IMPLS[impl]
    merged, s, umap = fn(HAND_X, HAND_METRIC, 1, HAND_SIZE)
    assert umap.tolist() == [2, 2, 0, 3, 1]  # [x2, x4 | (x0+3 x1)/4, x3]
    np.testing.assert_allclose(merged, [HAND_X[2], HAND_X[4], (HAND_X[0] + 3 * HAND_X[1]) / 4, HAND_X[3]], rtol=1e-6)
    assert s.tolist() == [2, 1, 4, 2]
    merged, s, umap = fn(HAND_X, HAND_METRIC, 2, HAND_SIZE)
    assert umap.tolist() == [1, 1, 2, 2, 0]  # [x4 | (x0+3 x1)/4, (2 x2+2 x3)/4]
    np.testing.assert_allclose(merged, [HAND_X[4], (HAND_X[0] + 3 * HAND_X[1]) / 4, (HAND_X[2] + HAND_X[3]) / 2],
                               rtol=1e-6)  # fmt: skip
    assert s.tolist() == [1, 4, 4]


@pytest.mark.parametrize("impl", list(IMPLS))
def test_ties_go_to_the_lower_index(impl):
    """All scores equal: every A matches the first B; the first r A tokens (by index) merge."""
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    for keys in (np.ones((2, 6, 3), np.float32), np.zeros((6, 3), np.float32)):
        merged, s, umap = IMPLS[impl](x, keys, 2, None)
        assert umap.tolist() == [1, 1, 1, 2, 0, 3]
        np.testing.assert_allclose(merged[1], x[:3].mean(0))
        assert s.tolist() == [1, 3, 1, 1]


def test_keys_are_averaged_over_heads():
    rng = np.random.default_rng(1)
    keys = separated_keys(11, 3, 9, rng)
    x, size = rng.standard_normal((11, 4)).astype(np.float32), np.ones(11, np.float32)
    a, b = tome_merge(x, keys, 4, size), tome_merge(x, keys.mean(0), 4, size)
    assert np.array_equal(a[2], b[2])


def test_bad_arguments_are_named():
    x, keys = np.ones((6, 2), np.float32), np.ones((6, 3), np.float32)
    with pytest.raises(ValueError, match="r must be <= 3"):
        tome_merge(x, keys, 4)
    with pytest.raises(ValueError, match="size must be > 0"):
        tome_merge(x, keys, 1, np.zeros(6, np.float32))
    with pytest.raises(ValueError, match="token count"):
        tome_merge(x, keys[:5], 1)
    with pytest.raises(TypeError, match="keys must have the same dtype"):
        tome_merge(x, keys.astype(np.float64), 1)
    with pytest.raises(ValueError, match="unmerge_map"):
        unmerge(x, np.array([0, 6]))


def test_proportional_attention_counts_a_merged_token_as_its_size():
    """softmax(q k^T / sqrt(d) + log s) over merged tokens equals plain attention over the unmerged tokens when
    each group's keys and values are identical (ToMe, section 3): the model's hook applies it."""
    rng = np.random.default_rng(2)
    q = rng.standard_normal((2, 3, 4)).astype(np.float32)
    k = rng.standard_normal((2, 3, 4)).astype(np.float32)
    v = rng.standard_normal((2, 3, 4)).astype(np.float32)
    size = np.array([1.0, 3.0, 2.0], np.float32)
    got, _ = _proportional_attention(q, k, v, size)
    rep = np.repeat(np.arange(3), size.astype(int))
    want, _ = _proportional_attention(q, k[:, rep], v[:, rep], np.ones(rep.size, np.float32))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------------------------- tiny-VLM policy
@given(st.integers(1, 300), st.integers(1, 5), st.data())
def test_schedule_removes_what_is_asked_within_toms_half_limit(n, blocks, data):
    keep = data.draw(st.integers(1, n))
    sched = schedule_for(n, keep, blocks)
    m = n
    for r in sched:
        assert 0 <= r <= m // 2
        m -= r
    floor = n
    for _ in range(blocks):
        floor -= floor // 2
    assert m == max(keep, floor)


@functools.lru_cache(maxsize=1)
def _model():
    return load()


def _example():
    return world.vqa_set(7, 1)[0]


def test_policy_merges_in_the_encoder_and_keeps_the_patch_map_consistent():
    model, ex = _model(), _example()
    tokens, _, counts = encode_tokens(model, ex.image, Plugs(token_policy=ToMePolicy(DEFAULT_R)))
    assert [b for _, b in counts] == [120, 96, 72] and tokens.n == 72
    assert (tokens.source >= 0).all(), "merging never drops a patch"
    np.testing.assert_array_equal(np.bincount(tokens.source, minlength=tokens.n), tokens.size)


@pytest.mark.parametrize("keep, expected", [(1.0, 144), (0.5, 72), (0.3, 43), (0.15, 22), (0.05, 18)])
def test_make_policy_reaches_the_kept_count(keep, expected):
    policy = make_policy(keep)
    assert isinstance(policy, ToMePolicy)
    tokens, _, _ = encode_tokens(_model(), _example().image, Plugs(token_policy=policy))
    assert tokens.n == expected == max(keep_count(144, keep), 18)


def test_text_tokens_are_never_altered():
    """The policy acts in the encoder only: every decoder layer sees all the prompt tokens, at their positions."""
    model, ex = _model(), _example()
    ids = prompt_ids(ex.qa.question)
    trace = Trace()
    prefill(model, ex.image, ids, Plugs(token_policy=make_policy(0.3)), trace)
    assert trace.n_visual == 43 and trace.layer_tokens == [43 + len(ids)] * model.config.layers
    assert ToMePolicy.in_decoder is TokenPolicy.in_decoder and ToMePolicy.after_connector is TokenPolicy.after_connector
    assert (trace.source >= 0).all()


def test_compose_source_keeps_dropped_patches_dropped():
    assert compose_source(np.array([0, -1, 1, 1]), np.array([1, 0])).tolist() == [1, -1, 0, 0]
