"""H2O: the kept set (exactly the budget, the recent window, the heavy hitters by accumulated attention, ties to the
lower index), the accumulated scores with GQA, and the plug on the tiny VLM."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mllm_ref.kvcache.h2o import H2OPolicy, h2o, h2o_scores
from mllm_ref.kvcache.streaming import cache_positions
from mllm_ref.nn.rope import rope
from mllm_ref.oracle import registry
from mllm_ref.tinyvlm import tokenizer, world
from mllm_ref.tinyvlm.model import generate
from mllm_ref.tinyvlm.plugs import Plugs, PromptInfo

TECH = registry.get("kvcache.h2o")
CASES = TECH.strategy()


@given(CASES)
def test_keeps_exactly_the_budget_the_recent_window_and_the_heaviest(kw):
    keep = h2o(**kw)
    scores, h, r = kw["scores"], kw["heavy_budget"], kw["recent_budget"]
    hkv, s = scores.shape
    assert keep.dtype == np.int64 and keep.shape == (hkv, min(s, h + r))
    for head in range(hkv):
        row = keep[head]
        assert np.all(np.diff(row) > 0)
        assert set(range(max(s - r, 0), s)) <= set(row.tolist()), "the recent window is kept"
        if s > h + r:
            cand = np.zeros(s - r, dtype=bool)
            cand[row[row < s - r]] = True
            assert cand.sum() == h
            if 0 < h < s - r:
                kept, dropped = scores[head, : s - r][cand], scores[head, : s - r][~cand]
                assert kept.min() >= dropped.max(), "heavy hitters outscore the evicted"
                # ties at the boundary go to the lower index
                edge = kept.min()
                tied_kept = np.flatnonzero(cand & (scores[head, : s - r] == edge))
                tied_dropped = np.flatnonzero(~cand & (scores[head, : s - r] == edge))
                if tied_kept.size and tied_dropped.size:
                    assert tied_kept.max() < tied_dropped.min()


def test_hand_computed_case():
    scores = np.array([[5.0, 1.0, 4.0, 4.0, 0.0, 9.0, 0.0]])
    assert h2o(scores, 2, 2).tolist() == [[0, 2, 5, 6]]
    assert h2o(scores, 3, 1).tolist() == [[0, 2, 5, 6]]
    assert h2o(scores, 3, 2).tolist() == [[0, 2, 3, 5, 6]]  # the tie 4.0/4.0 both fit
    assert h2o(np.array([[1.0, 3.0, 3.0, 3.0, 0.0]]), 2, 1).tolist() == [[1, 2, 4]]  # ties to the lower index
    assert h2o(scores, 0, 3).tolist() == [[4, 5, 6]] and h2o(scores, 3, 0).tolist() == [[0, 2, 5]]
    assert h2o(scores, 10, 10).tolist() == [list(range(7))]


def test_scores_sum_over_queries_and_average_the_group():
    attn = np.zeros((4, 2, 3))
    attn[0] = [[1, 0, 0], [0.5, 0.5, 0]]
    attn[1] = [[1, 0, 0], [0, 1, 0]]
    attn[2] = [[0, 0, 1], [0, 0, 1]]
    attn[3] = [[0, 1, 0], [1, 0, 0]]
    got = h2o_scores(attn, 2)
    np.testing.assert_allclose(got, [[1.25, 0.75, 0.0], [0.5, 0.5, 1.0]])
    np.testing.assert_allclose(h2o_scores(attn, 4), attn.sum(axis=1))
    assert got.dtype == np.float64


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="scores"):
        h2o(np.array([[1.0, -1.0]]), 1, 1)
    with pytest.raises(ValueError, match="scores"):
        h2o(np.array([[1.0, np.nan]]), 1, 1)
    with pytest.raises(ValueError, match="heavy_budget"):
        h2o(np.ones((1, 3)), -1, 1)
    with pytest.raises(ValueError, match="kv_heads"):
        h2o_scores(np.ones((3, 1, 2)), 2)
    with pytest.raises(ValueError, match="attn"):
        h2o_scores(-np.ones((2, 1, 2)), 2)
    with pytest.raises(ValueError, match="heavy_budget"):
        H2OPolicy(0, 0)
    with pytest.raises(ValueError, match="attn"):
        H2OPolicy(2, 2).store(0, np.zeros((1, 5, 2), np.float32), np.zeros((1, 5, 2), np.float32), None,
                              PromptInfo(0, (1, 1), np.zeros(0), np.zeros(5)), positions=np.arange(5), n_visual=0)


# ---------------------------------------------------------------------------------------------- the policy
def _softmax_rows(rng, h, q, s):
    x = rng.standard_normal((h, q, s)) * 2
    e = np.exp(x - x.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


@given(st.integers(0, 2**32 - 1), st.integers(0, 8), st.integers(0, 8), st.integers(0, 12), st.booleans())
def test_policy_matches_a_replay_of_the_authors_cache(seed, heavy, recent, steps, rot):
    """The policy's cache after the prefill and each step equals a plain replay of the algorithm: accumulate the
    group-mean attention each token received while cached, evict with :func:`h2o` whenever over budget."""
    if heavy + recent == 0:
        heavy = 1
    rng = np.random.default_rng(seed)
    hkv, h, d, t = 2, 4, 4, int(rng.integers(1, 25))
    total = t + steps
    raw = rng.standard_normal((hkv, total, d)).astype(np.float32)
    pos = np.arange(total)
    pol = H2OPolicy(heavy, recent, rerotate=rot)
    attn = np.tril(_softmax_rows(rng, h, t, t))
    info = PromptInfo(0, (1, 1), np.zeros(0), np.zeros(t))
    cache = pol.store(0, rope(raw[:, :t], pos[:t], 1e4), raw[:, :t], attn, info, positions=pos[:t], n_visual=0)
    # the replay: per head, a list of (token, score)
    live = [list(range(t)) for _ in range(hkv)]
    score = [dict(enumerate(h2o_scores(attn, hkv)[g])) for g in range(hkv)]

    def evict():
        for g in range(hkv):
            if len(live[g]) > heavy + recent:
                keep = h2o(np.array([[score[g][j] for j in live[g]]]), heavy, recent)[0]
                live[g] = [live[g][i] for i in keep]

    evict()
    for step in range(steps + 1):
        assert pol.length(0, cache) == min(len(live[0]), heavy + recent) == len(live[0])
        assert cache.positions.tolist() == [[int(pos[j]) for j in live[g]] for g in range(hkv)]
        for g in range(hkv):
            np.testing.assert_allclose(cache.scores[g], [score[g][j] for j in live[g]], rtol=1e-12)
            np.testing.assert_array_equal(cache.v[g], raw[g, live[g]])
        k_read, _ = pol.read(0, cache)
        for g in range(hkv):
            kept = np.array(live[g])
            at = pos[kept] if not rot else cache_positions(pos[kept]) + cache.next_position - len(kept)
            np.testing.assert_allclose(k_read[g], rope(raw[g, kept], at, 1e4), atol=2e-5 * np.abs(raw).max(), rtol=0)
        if step == steps:
            break
        j = t + step
        s = pol.length(0, cache)
        a1 = _softmax_rows(rng, h, 1, s + 1)
        add = h2o_scores(a1, hkv)
        for g in range(hkv):
            for i, tok in enumerate(live[g]):
                score[g][tok] += add[g, i]
            score[g][j] = add[g, s]
            live[g].append(j)
        evict()
        cache = pol.extend(0, cache, rope(raw[:, j : j + 1], pos[j : j + 1], 1e4), raw[:, j : j + 1], a1,
                           position=int(pos[j]))  # fmt: skip


# ------------------------------------------------------------------------------------------- the tiny VLM
def test_the_plug_on_the_tiny_vlm(model):
    ex = world.vqa_set(world.EVAL_SEED, 1)[0]
    ids = tokenizer.prompt_ids(tokenizer.CAPTION_PROMPT)
    plain = generate(model, ex.image, ids, max_new_tokens=12)
    big = generate(model, ex.image, ids, max_new_tokens=12, plugs=Plugs(kv_policy=H2OPolicy(1000, 1000)))
    assert big.tokens == plain.tokens, "a budget larger than the context is the plain model"
    plugs = TECH.extra["plugs"](model)
    got = generate(model, ex.image, ids, max_new_tokens=12, plugs=plugs)
    assert max(got.trace.decode_context) == plugs.kv_policy.heavy + plugs.kv_policy.recent
    assert got.trace.kv_bytes < plain.trace.kv_bytes
    assert got.tokens[0] == plain.tokens[0]
