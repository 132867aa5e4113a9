"""StreamingLLM: the kept set (sinks + recent window, exactly the budget), positions inside the cache, re-rotated
keys against keys rotated at the new positions directly, and the plug on the tiny VLM."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mllm_ref.kvcache.streaming import (
    EvictedCache,
    StreamingPolicy,
    cache_positions,
    streaming,
    streaming_keep,
)
from mllm_ref.nn.rope import rope
from mllm_ref.oracle import registry
from mllm_ref.tinyvlm import tokenizer, world
from mllm_ref.tinyvlm.model import generate
from mllm_ref.tinyvlm.plugs import Plugs, PromptInfo

TECH = registry.get("kvcache.streaming")
CASES = TECH.strategy()


@given(CASES)
def test_keeps_exactly_the_budget_the_sinks_and_the_recent_window(kw):
    keep, new = streaming(**kw)
    t, s, r = kw["positions"].size, kw["start_size"], kw["recent_size"]
    assert keep.dtype == np.int64 and new.dtype == np.int64
    assert keep.size == min(t, s + r) and new.size == keep.size
    assert np.all(np.diff(keep) > 0)
    assert set(range(min(s, t))) <= set(keep.tolist()), "the sinks are kept"
    assert set(range(max(t - r, 0), t)) <= set(keep.tolist()), "the recent window is kept"


@given(CASES)
def test_positions_inside_the_cache_are_dense_ranks(kw):
    keep, new = streaming(**kw)
    kept = kw["positions"][keep]
    if keep.size:
        assert new[0] == 0 and np.all(np.diff(new) >= 0) and np.all(np.diff(new) <= 1)
        # equal ids stay equal, different ids differ: the renumbering is order-preserving and one-to-one
        assert np.array_equal(np.diff(new) == 0, np.diff(kept) == 0)
    if np.unique(kept).size == kept.size:
        assert np.array_equal(new, np.arange(keep.size)), "distinct ids: StreamingLLM's 0 .. K-1"


def test_hand_computed_cases():
    keep, new = streaming(np.arange(10), 2, 3)
    assert keep.tolist() == [0, 1, 7, 8, 9] and new.tolist() == [0, 1, 2, 3, 4]
    keep, new = streaming(np.array([0, 0, 0, 0, 0, 1, 2, 3]), 2, 3)
    assert keep.tolist() == [0, 1, 5, 6, 7] and new.tolist() == [0, 0, 1, 2, 3]
    assert streaming_keep(4, 2, 3).tolist() == [0, 1, 2, 3]
    assert streaming_keep(6, 0, 2).tolist() == [4, 5]
    assert streaming_keep(6, 2, 0).tolist() == [0, 1]
    assert cache_positions(np.array([[3, 3, 7], [0, 5, 6]])).tolist() == [[0, 0, 1], [0, 1, 2]]


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="positions"):
        streaming(np.array([3, 1, 2]), 1, 1)
    with pytest.raises(ValueError, match="start_size"):
        streaming(np.arange(3), -1, 1)
    with pytest.raises(TypeError, match="recent_size"):
        streaming(np.arange(3), 1, 1.5)
    with pytest.raises(ValueError, match="start_size"):
        StreamingPolicy(0, 0)
    with pytest.raises(TypeError, match="rerotate"):
        StreamingPolicy(1, 1, rerotate=1)
    with pytest.raises(ValueError, match="theta"):
        StreamingPolicy(1, 1, theta=0.0)


# ---------------------------------------------------------------------------------------------- the policy
def _info(n_visual: int, n_text: int) -> PromptInfo:
    return PromptInfo(n_visual, (12, 12), np.arange(n_visual), np.zeros(n_text, dtype=np.int64))


def _run(policy, raw_k, v, positions, steps, theta):
    """Store a prefill of keys ``raw_k`` rotated at ``positions`` and extend ``steps`` more tokens; return the
    cache after each call and the position of each token (prefill then steps)."""
    hkv, t, d = raw_k.shape
    nv = int(np.sum(positions == 0)) if positions.size > 1 and positions[1] == 0 else 0
    cache = policy.store(0, rope(raw_k[:, : len(positions)], positions, theta), v[:, : len(positions)], None,
                         _info(nv, len(positions) - nv), positions=positions, n_visual=nv)  # fmt: skip
    caches = [cache]
    all_pos = list(positions)
    nxt = int(positions.max()) + 1
    for i in range(steps):
        j = len(positions) + i
        k1 = rope(raw_k[:, j : j + 1], np.array([nxt]), theta)
        cache = policy.extend(0, cache, k1, v[:, j : j + 1], None, position=nxt)
        caches.append(cache)
        all_pos.append(nxt)
        nxt += 1
    return caches, np.array(all_pos)


@given(st.integers(0, 2**32 - 1), st.integers(0, 6), st.integers(1, 20), st.integers(0, 30), st.booleans())
def test_policy_keeps_the_budget_and_rerotated_keys_equal_keys_rotated_at_the_new_positions(seed, s, r, steps, vlm):
    rng = np.random.default_rng(seed)
    theta = 10000.0
    n_prompt = int(rng.integers(1, 40))
    nv = int(rng.integers(0, n_prompt)) if vlm else 0
    positions = np.concatenate([np.zeros(nv, np.int64), np.arange(1 if nv else 0, n_prompt - nv + (1 if nv else 0))])
    total = n_prompt + steps
    raw_k = rng.standard_normal((2, total, 8)).astype(np.float32)
    v = rng.standard_normal((2, total, 8)).astype(np.float32)
    policy = StreamingPolicy(s, r, theta=theta)
    caches, all_pos = _run(policy, raw_k, v, positions, steps, theta)
    for n_seen, cache in zip(range(n_prompt, total + 1), caches):
        assert isinstance(cache, EvictedCache)
        expect = streaming_keep(n_seen, s, r)
        assert policy.length(0, cache) == min(n_seen, s + r), "exactly the budget once full"
        assert np.array_equal(cache.positions[0], all_pos[expect]) and np.array_equal(cache.v[0], v[0, expect])
        # the keys read are the raw keys rotated directly at the positions inside the cache, shifted to end just
        # before the next query
        k_read, v_read = policy.read(0, cache)
        ranks = cache_positions(all_pos[expect])
        new = ranks + cache.next_position - (ranks[-1] + 1)
        assert cache.next_position == all_pos[n_seen - 1] + 1
        direct = rope(raw_k[:, expect], new, theta)
        np.testing.assert_allclose(k_read, direct, atol=2e-5 * np.abs(raw_k).max(), rtol=0)
        assert k_read.dtype == np.float32 and np.array_equal(v_read, v[:, expect])


def test_without_rerotation_keys_keep_their_rotation():
    rng = np.random.default_rng(0)
    raw = rng.standard_normal((2, 30, 8)).astype(np.float32)
    pol = StreamingPolicy(2, 5, rerotate=False)
    caches, all_pos = _run(pol, raw, raw, np.arange(20), 10, 10000.0)
    keep = streaming_keep(30, 2, 5)
    np.testing.assert_array_equal(pol.read(0, caches[-1])[0], rope(raw[:, keep], all_pos[keep], 10000.0))


# ------------------------------------------------------------------------------------------- the tiny VLM
def test_a_budget_larger_than_the_context_is_the_plain_model(model):
    ex = world.vqa_set(world.EVAL_SEED, 1)[0]
    ids = tokenizer.prompt_ids(tokenizer.CAPTION_PROMPT)
    plain = generate(model, ex.image, ids, max_new_tokens=12)
    got = generate(model, ex.image, ids, max_new_tokens=12, plugs=Plugs(kv_policy=StreamingPolicy(4, 1000)))
    assert got.tokens == plain.tokens


def test_the_plug_bounds_the_cache_on_the_tiny_vlm(model):
    ex = world.vqa_set(world.EVAL_SEED, 1)[0]
    ids = tokenizer.prompt_ids(tokenizer.CAPTION_PROMPT)
    plain = generate(model, ex.image, ids, max_new_tokens=12)
    plugs = TECH.extra["plugs"](model)
    got = generate(model, ex.image, ids, max_new_tokens=12, plugs=plugs)
    assert got.trace.decode_context and max(got.trace.decode_context) == plugs.kv_policy.budget
    assert got.trace.kv_bytes < plain.trace.kv_bytes
    assert got.tokens[0] == plain.tokens[0], "the first token comes from the prefill logits"
