"""SnapKV: the kept set (exactly the capacity, the observation window, the best pooled votes, ties to the lower
index), the pooling, GQA aggregation, and the plug on the tiny VLM."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mllm_ref.kvcache.snapkv import SnapKVPolicy, pool1d, snapkv, snapkv_votes
from mllm_ref.nn.rope import rope
from mllm_ref.oracle import registry
from mllm_ref.tinyvlm import tokenizer, world
from mllm_ref.tinyvlm.model import generate
from mllm_ref.tinyvlm.plugs import Plugs, PromptInfo

TECH = registry.get("kvcache.snapkv")
CASES = TECH.strategy()


@given(CASES)
def test_keeps_exactly_the_capacity_the_window_and_the_best_votes(kw):
    keep = snapkv(**kw)
    h, _, t = kw["attn"].shape
    hkv, w, c = kw["kv_heads"], kw["window_size"], kw["max_capacity_prompt"]
    assert keep.dtype == np.int64 and keep.shape == (hkv, t if t < c else c)
    if t < c:
        assert np.array_equal(keep, np.broadcast_to(np.arange(t), (hkv, t)))
        return
    votes = snapkv_votes(kw["attn"], hkv, w, kw["kernel_size"], kw["pooling"])
    for g in range(hkv):
        row = keep[g]
        assert np.all(np.diff(row) > 0)
        assert np.array_equal(row[-w:], np.arange(t - w, t)), "the observation window is kept"
        chosen = np.zeros(t - w, dtype=bool)
        chosen[row[:-w]] = True
        if chosen.any() and (~chosen).any():
            assert votes[g][chosen].min() >= votes[g][~chosen].max()


def test_pooling_by_hand():
    x = np.array([[1.0, 2.0, 6.0, 0.0, 3.0]])
    np.testing.assert_allclose(pool1d(x, 3, "avgpool"), [[1.0, 3.0, 8 / 3, 3.0, 1.0]])  # zero padding counted
    np.testing.assert_allclose(pool1d(x, 3, "maxpool"), [[2.0, 6.0, 6.0, 6.0, 3.0]])
    np.testing.assert_allclose(pool1d(x, 1, "avgpool"), x)
    np.testing.assert_allclose(pool1d(x, 5, "avgpool"), [[9 / 5, 9 / 5, 12 / 5, 11 / 5, 9 / 5]])


def test_hand_computed_selection():
    # one head, T = 6, window 2, capacity 4: votes over the prefix [0..3] are the window rows' column sums
    attn = np.zeros((1, 2, 6))
    attn[0, 0] = [0.1, 0.5, 0.0, 0.2, 0.2, 0.0]
    attn[0, 1] = [0.1, 0.0, 0.0, 0.5, 0.2, 0.2]  # votes: [0.2, 0.5, 0.0, 0.7]
    assert snapkv(attn, 1, 2, 4, 1).tolist() == [[1, 3, 4, 5]]
    # avgpool 3: [0.7, 0.7, 1.2, 0.7] / 3 -> token 2 then the tie 0/1/3 to the lower index
    assert snapkv(attn, 1, 2, 4, 3).tolist() == [[0, 2, 4, 5]]
    assert snapkv(attn, 1, 2, 7, 1).tolist() == [list(range(6))], "a prompt shorter than the capacity is kept"
    assert snapkv(attn, 1, 2, 6, 1).tolist() == [list(range(6))], "T = C keeps everything as well"


def test_gqa_averages_the_pooled_votes_of_the_group():
    rng = np.random.default_rng(1)
    attn = rng.random((4, 3, 20))
    for pooling in ("avgpool", "maxpool"):
        per_head = snapkv_votes(attn, 4, 3, 5, pooling)
        np.testing.assert_allclose(snapkv_votes(attn, 2, 3, 5, pooling), per_head.reshape(2, 2, -1).mean(axis=1))
        np.testing.assert_allclose(snapkv_votes(attn, 1, 3, 5, pooling), per_head.mean(axis=0, keepdims=True))
    # with kv_heads = H each head keeps its own tokens
    keep = snapkv(attn, 4, 3, 8)
    assert keep.shape == (4, 8) and len({tuple(r) for r in keep.tolist()}) > 1


def test_bad_input_names_the_argument():
    a = np.ones((2, 2, 10)) / 10
    with pytest.raises(ValueError, match="kernel_size"):
        snapkv(a, 1, 2, 5, 4)
    with pytest.raises(ValueError, match="max_capacity_prompt"):
        snapkv(a, 1, 2, 2)
    with pytest.raises(ValueError, match="kv_heads"):
        snapkv(a, 3, 2, 5)
    with pytest.raises(ValueError, match="pooling"):
        snapkv(a, 1, 2, 5, 3, "sumpool")
    with pytest.raises(ValueError, match="attn"):
        snapkv(a, 1, 3, 5)  # fewer rows than the window
    with pytest.raises(ValueError, match="attn"):
        snapkv(-a, 1, 2, 5)
    with pytest.raises(ValueError, match="kernel_size"):
        SnapKVPolicy(kernel_size=2)
    with pytest.raises(ValueError, match="max_capacity_prompt"):
        SnapKVPolicy(window_size=8, max_capacity_prompt=8)


# ---------------------------------------------------------------------------------------------- the policy
@given(st.integers(0, 2**32 - 1), st.integers(1, 40), st.integers(0, 6), st.booleans())
def test_policy_compresses_the_prompt_once_then_appends(seed, t, steps, rot):
    rng = np.random.default_rng(seed)
    hkv, h, d, w, c = 2, 4, 4, 3, 10
    raw = rng.standard_normal((hkv, t + steps, d)).astype(np.float32)
    logits = rng.standard_normal((h, t, t))
    logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn = (attn / attn.sum(-1, keepdims=True)).astype(np.float32)
    pol = SnapKVPolicy(w, c, 3, rerotate=rot)
    pos = np.arange(t + steps)
    cache = pol.store(0, rope(raw[:, :t], pos[:t], 1e4), raw[:, :t], attn,
                      PromptInfo(0, (1, 1), np.zeros(0), np.zeros(t)), positions=pos[:t], n_visual=0)  # fmt: skip
    keep = snapkv(attn, hkv, w, c, 3) if t >= c else np.broadcast_to(np.arange(t), (hkv, t))
    assert pol.length(0, cache) == (c if t >= c else t)
    for j in range(t, t + steps):
        a1 = np.full((h, 1, pol.length(0, cache) + 1), 1.0 / (pol.length(0, cache) + 1), np.float32)
        cache = pol.extend(0, cache, rope(raw[:, j : j + 1], pos[j : j + 1], 1e4), raw[:, j : j + 1], a1,
                           position=j)  # fmt: skip
    assert pol.length(0, cache) == keep.shape[1] + steps, "decode tokens are appended, never evicted"
    k_read, v_read = pol.read(0, cache)
    for g in range(hkv):
        kept = np.concatenate([keep[g], np.arange(t, t + steps)])
        at = pos[kept] if not rot else np.arange(t + steps - kept.size, t + steps)
        np.testing.assert_allclose(k_read[g], rope(raw[g, kept], at, 1e4), atol=2e-5 * np.abs(raw).max(), rtol=0)
        np.testing.assert_array_equal(v_read[g], raw[g, kept])


# ------------------------------------------------------------------------------------------- the tiny VLM
def test_the_plug_on_the_tiny_vlm(model):
    ex = world.vqa_set(world.EVAL_SEED, 1)[0]
    ids = tokenizer.prompt_ids(tokenizer.CAPTION_PROMPT)
    plain = generate(model, ex.image, ids, max_new_tokens=12)
    big = generate(model, ex.image, ids, max_new_tokens=12, plugs=Plugs(kv_policy=SnapKVPolicy(8, 1000)))
    assert big.tokens == plain.tokens, "a capacity larger than the prompt is the plain model"
    plugs = TECH.extra["plugs"](model)
    got = generate(model, ex.image, ids, max_new_tokens=12, plugs=plugs)
    ctx = got.trace.decode_context
    assert ctx[0] == plugs.kv_policy.capacity and ctx == list(range(ctx[0], ctx[0] + len(ctx)))
    assert got.trace.kv_bytes < plain.trace.kv_bytes
    assert got.tokens[0] == plain.tokens[0]
