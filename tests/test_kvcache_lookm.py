"""LOOK-M (kvcache.lookm): the budget, the text prior, the recent window, and the three merges."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mllm_ref.kvcache.lookm import MERGES, LookMPolicy, lookm, make_policy
from mllm_ref.tinyvlm import tokenizer, world
from mllm_ref.tinyvlm.model import decode_step, prefill
from mllm_ref.tinyvlm.plugs import Plugs


def _inputs(seed, hkv=2, g=2, t=30, nt=5, d=8):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((hkv * g, t, t)) * 2
    logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    text = np.zeros(t, bool)
    text[rng.choice(t, nt, replace=False)] = True
    k = rng.standard_normal((hkv, t, d))
    v = rng.standard_normal((hkv, t, d))
    return k, v, w / w.sum(-1, keepdims=True), text


@given(st.integers(0, 2**32 - 1), st.integers(1, 30), st.integers(0, 6), st.sampled_from(MERGES))
def test_budget_text_prior_and_recent_window(seed, budget, recent, merge):
    k, v, attn, text = _inputs(seed)
    t = k.shape[1]
    keep, kk, vk = lookm(k, v, attn, text, budget, recent, merge)
    must = set(np.flatnonzero(text)) | set(range(max(t - recent, 0), t))
    assert keep.shape[1] == min(t, max(budget, len(must)))  # exactly the budget unless text + recent need more
    for row in keep:
        assert must <= set(row.tolist())  # text is never evicted, nor the recent window
        assert np.all(np.diff(row) > 0)
    assert kk.shape == (k.shape[0], keep.shape[1], k.shape[2])


def test_no_merge_keeps_the_entries_and_average_merges_every_evicted_one():
    k, v, attn, text = _inputs(3)
    keep, kk, vk = lookm(k, v, attn, text, 10, 2, "none")
    np.testing.assert_array_equal(kk, np.take_along_axis(k, keep[:, :, None], 1))
    keep2, ka, va = lookm(k, v, attn, text, 10, 2, "average")
    np.testing.assert_array_equal(keep, keep2)
    # the average merge keeps the total of the keys: sum(kept merged * (1 + n)) = sum of all keys, per head
    for h in range(k.shape[0]):
        gone = np.setdiff1d(np.arange(k.shape[1]), keep[h])
        unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
        match = np.argmax(unit(k[h, gone]) @ unit(k[h, keep[h]]).T, axis=1)
        n = np.bincount(match, minlength=keep.shape[1])
        np.testing.assert_allclose((ka[h] * (1 + n)[:, None]).sum(0), k[h].sum(0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose((va[h] * (1 + n)[:, None]).sum(0), v[h].sum(0), rtol=1e-12, atol=1e-12)


def test_a_budget_above_the_length_is_the_identity():
    k, v, attn, text = _inputs(5)
    for merge in MERGES:
        keep, kk, vk = lookm(k, v, attn, text, 100, 2, merge)
        assert keep.shape[1] == k.shape[1]
        np.testing.assert_array_equal(kk, k)
        np.testing.assert_array_equal(vk, v)


def test_bad_input_names_the_argument():
    k, v, attn, text = _inputs(1)
    with pytest.raises(ValueError, match="merge"):
        lookm(k, v, attn, text, 5, 1, "mean")
    with pytest.raises(ValueError, match="text"):
        lookm(k, v, attn, text[:-1], 5, 1)
    with pytest.raises(ValueError, match="attn"):
        lookm(k, v, -attn, text, 5, 1)
    with pytest.raises(ValueError, match="budget"):
        lookm(k, v, attn, text, 0, 1)


def test_the_policy_never_evicts_the_prompt_on_the_tiny_vlm(model):
    ex = world.vqa_set(world.EVAL_SEED, 1)[0]
    ids = tokenizer.prompt_ids(ex.qa.question)
    policy = make_policy(32)
    _, state = prefill(model, ex.image, ids, Plugs(kv_policy=policy))
    t = 144 + len(ids)
    for layer in range(model.config.layers):
        kept = policy.kept_tokens(layer, state.caches[layer])
        assert kept.shape == (model.config.kv_heads, 32)
        for row in kept:
            assert set(range(144, t)) <= set(row.tolist())  # every text token kept
    _, state = decode_step(model, state, 5, Plugs(kv_policy=policy))
    assert policy.length(0, state.caches[0]) == 33  # decode tokens are appended, nothing more evicted
    assert isinstance(LookMPolicy().merge, str)
