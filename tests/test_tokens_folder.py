"""FOLDER (tokens.folder): the invariants of folded bipartite merging, hand-computed examples of a single round
and of a fold, agreement with ToMe when one round suffices, and the tiny-VLM policy. Fast paths are checked by
the generic registry tests; here they also run the tie and hand cases."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mllm_ref.oracle import registry
from mllm_ref.tinyvlm import world
from mllm_ref.tinyvlm.model import Trace, encode_tokens, load, prefill
from mllm_ref.tinyvlm.plugs import Plugs, TokenPolicy
from mllm_ref.tinyvlm.tokenizer import prompt_ids
from mllm_ref.tokens._common import merge_into
from mllm_ref.tokens.folder import (
    DEFAULT_KEEP,
    FolderPolicy,
    fold_schedule,
    folder_merge,
    make_policy,
    max_reduction,
    unmerge,
    well_separated_case,
)
from mllm_ref.tokens.tome import tome_merge

TECH = registry.get("tokens.folder")
IMPLS = {"reference": folder_merge} | {b: TECH.fast_path(b) for b in registry.BACKENDS if TECH.fast_path(b)}


@st.composite
def folds(draw, one_round: bool = False):
    n = draw(st.integers(1, 30))
    h, d, c = draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 5))
    r = draw(st.integers(0, max(0, (n - 1) // 2) if one_round else max_reduction(n)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    keys = rng.standard_normal((h, n, d)).astype(np.float32)
    x = rng.standard_normal((n, c)).astype(np.float32)
    return x, keys, r, rng.integers(1, 6, n).astype(np.float32)


# ---------------------------------------------------------------------------------------------- invariants
@given(folds())
def test_r0_is_the_identity(case):
    x, keys, _, size = case
    merged, s, umap = folder_merge(x, keys, 0, size)
    assert np.array_equal(merged, x) and np.array_equal(s, size) and np.array_equal(umap, np.arange(len(x)))


@given(folds())
def test_exactly_n_minus_r_tokens_and_sums_preserved(case):
    x, keys, r, size = case
    merged, s, umap = folder_merge(x, keys, r, size)
    n = len(x)
    assert merged.shape == (n - r, x.shape[1]) and s.shape == (n - r,) and umap.dtype == np.int64
    assert np.array_equal(np.unique(umap), np.arange(n - r))
    np.testing.assert_allclose(s, np.bincount(umap, weights=size, minlength=n - r), rtol=1e-6)
    np.testing.assert_allclose((s[:, None] * merged).sum(0), (size[:, None] * x).sum(0), rtol=1e-4, atol=1e-4)
    # every output is the size-weighted mean of the inputs it carries (merging twice = merging once)
    want, _ = merge_into(x, size, umap, n - r)
    np.testing.assert_allclose(merged, want, rtol=1e-4, atol=1e-5)


@given(folds())
def test_unmerge_of_merge_reproduces_the_merged_values(case):
    x, keys, r, size = case
    merged, _, umap = folder_merge(x, keys, r, size)
    assert np.array_equal(unmerge(merged, umap), merged[umap])


@given(folds(one_round=True))
def test_one_round_keeps_the_spatial_order(case):
    """Survivors (every B token, and the A tokens that did not merge) appear in their input order."""
    x, keys, r, size = case
    _, _, umap = folder_merge(x, keys, r, size)
    n = len(x)
    b_outputs = set(umap[1::2].tolist())
    survivors = [i for i in range(n) if i % 2 == 1 or umap[i] not in b_outputs]
    assert umap[survivors].tolist() == list(range(n - r))


@given(st.integers(0, 2**32 - 1), st.integers(2, 30))
def test_one_round_is_tome_up_to_the_order(seed, n):
    """With r <= (N-1)//2, FOLDER is one ToMe matching: the same groups and merged values, in spatial order."""
    r = (n - 1) // 2
    case = well_separated_case(n, 2, 8, 3, r, np.random.default_rng(seed))
    fm, fs, fu = folder_merge(**case)
    tm, ts, tu = tome_merge(**case)
    perm = np.empty(n - r, dtype=np.int64)
    perm[fu] = tu  # FOLDER output j is ToMe output perm[j]
    assert np.array_equal(perm[fu], tu), "the two partitions of the inputs are the same"
    np.testing.assert_allclose(fm, tm[perm], rtol=1e-6)
    np.testing.assert_allclose(fs, ts[perm])


@given(st.integers(0, 400), st.data())
def test_fold_schedule(n, data):
    r = data.draw(st.integers(0, max_reduction(n)))
    sched = fold_schedule(n, r)
    assert sum(sched) == r
    m = n
    for r_t in sched:
        assert 1 <= r_t <= (m - 1) // 2
        m -= r_t
    assert max_reduction(n) == max(n - 2, 0)


# ------------------------------------------------------------------------------------------ hand-computed rule
# A = {0, 2, 4}, B = {1, 3}. Best matches: 0 -> 1 (cos .995), 2 -> 3 (.981), 4 -> 3 (.832).
HAND_METRIC = np.array([[1, 0], [1, 0.1], [0, 1], [0.2, 1], [1, 1]], dtype=np.float32)
HAND_X = np.arange(10, dtype=np.float32).reshape(5, 2)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_hand_example_one_round_and_a_fold(impl):
    fn = IMPLS[impl]
    merged, s, umap = fn(HAND_X, HAND_METRIC, 2, None)  # one round: (5-1)//2 = 2
    assert umap.tolist() == [0, 0, 1, 1, 2]  # spatial order [x0+x1, x2+x3, x4] (ToMe would put x4 first)
    np.testing.assert_allclose(merged, [(HAND_X[0] + HAND_X[1]) / 2, (HAND_X[2] + HAND_X[3]) / 2, HAND_X[4]])
    assert s.tolist() == [2, 2, 1]
    # r = 3 folds: round 1 as above; round 2 on the averaged metric [(1, .05), (.1, 1), (1, 1)]: A = {0, 2},
    # B = {1}; cos((1,1), (.1,1)) = .774 beats cos((1,.05), (.1,1)) = .149, so x4 folds into the (x2, x3) group.
    merged, s, umap = fn(HAND_X, HAND_METRIC, 3, None)
    assert umap.tolist() == [0, 0, 1, 1, 1]
    np.testing.assert_allclose(merged, [(HAND_X[0] + HAND_X[1]) / 2, (HAND_X[2] + HAND_X[3] + HAND_X[4]) / 3],
                               rtol=1e-6)  # fmt: skip
    assert s.tolist() == [2, 3]


@pytest.mark.parametrize("impl", list(IMPLS))
def test_ties_go_to_the_lower_index(impl):
    x = np.arange(14, dtype=np.float32).reshape(7, 2)
    merged, s, umap = IMPLS[impl](x, np.zeros((7, 3), np.float32), 5, None)
    # rounds of 3, 1, 1: A 0, 2, 4 fold into 1; then that group takes 3, then 5; 6 is left (the fold stops at 2)
    assert umap.tolist() == [0, 0, 0, 0, 0, 0, 1]
    assert s.tolist() == [6, 1]


def test_bad_arguments_are_named():
    x, keys = np.ones((6, 2), np.float32), np.ones((6, 3), np.float32)
    with pytest.raises(ValueError, match="r must be <= 4"):
        folder_merge(x, keys, 5)
    with pytest.raises(ValueError, match="size must be > 0"):
        folder_merge(x, keys, 1, -np.ones(6, np.float32))
    with pytest.raises(TypeError, match="size must have the same dtype"):
        folder_merge(x, keys, 1, np.ones(6))


# -------------------------------------------------------------------------------------------- tiny-VLM policy
@functools.lru_cache(maxsize=1)
def _model():
    return load()


def _example():
    return world.vqa_set(7, 1)[0]


def test_policy_folds_only_in_the_last_block():
    tokens, _, counts = encode_tokens(_model(), _example().image, Plugs(token_policy=FolderPolicy(DEFAULT_KEEP)))
    assert counts == [(144, 144), (144, 144), (144, 43)]  # 70% fewer tokens, all in the last block
    assert (tokens.source >= 0).all()
    np.testing.assert_array_equal(np.bincount(tokens.source, minlength=tokens.n), tokens.size)


@pytest.mark.parametrize("keep, expected", [(1.0, 144), (0.5, 72), (0.3, 43), (0.1, 14), (0.0, 2)])
def test_make_policy_reaches_the_kept_count(keep, expected):
    tokens, _, _ = encode_tokens(_model(), _example().image, Plugs(token_policy=make_policy(keep)))
    assert tokens.n == expected


def test_text_tokens_are_never_altered_and_log_size_scale():
    model, ex = _model(), _example()
    ids = prompt_ids(ex.qa.question)
    trace = Trace()
    prefill(model, ex.image, ids, Plugs(token_policy=make_policy(0.3)), trace)
    assert trace.layer_tokens == [43 + len(ids)] * model.config.layers
    assert FolderPolicy.in_decoder is TokenPolicy.in_decoder
    plain, _, _ = encode_tokens(model, ex.image, Plugs(token_policy=FolderPolicy(0.3)))
    scaled = FolderPolicy(0.3, log_size_scale=True).after_connector(plain, ids, None)
    np.testing.assert_allclose(scaled.x, plain.x * (1 + np.log(plain.size))[:, None], rtol=1e-6)
    with pytest.raises(TypeError, match="log_size_scale"):
        FolderPolicy(0.3, log_size_scale=1)
