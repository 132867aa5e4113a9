"""VL-Cache (kvcache.vlcache): sparsity, the budget allocation, post-vision scores and the plug."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mllm_ref.kvcache.vlcache import allocate, calibrated_density, layer_sparsity, make_policy, vlcache, vlcache_scores
from mllm_ref.tinyvlm import tokenizer, world
from mllm_ref.tinyvlm.model import prefill
from mllm_ref.tinyvlm.plugs import Plugs


def _attn(seed, h=4, t=20):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((h, t, t)) * 3
    logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    return w / w.sum(-1, keepdims=True)


@given(st.integers(0, 2**32 - 1), st.integers(1, 25), st.integers(0, 19))
def test_keeps_exactly_the_budget_by_post_vision_scores(seed, budget, nv):
    attn = _attn(seed)
    keep = vlcache(attn, nv, 2, budget)
    assert keep.shape == (2, min(budget, 20)) and np.all(np.diff(keep, axis=1) > 0)
    s = vlcache_scores(attn, nv, 2)
    for h in range(2):  # every kept token scores at least as high as every dropped one
        dropped = np.setdiff1d(np.arange(20), keep[h])
        if dropped.size:
            assert s[h, keep[h]].min() >= s[h, dropped].max()


def test_sparsity_of_uniform_and_one_hot_attention():
    t = 10
    uniform = np.tril(np.ones((1, t, t))) / np.arange(1, t + 1)[None, :, None]
    assert layer_sparsity(uniform, 3) == 0.0
    one_hot = np.zeros((1, t, t))
    one_hot[0, np.arange(t), 0] = 1.0  # every row attends to the first token only
    causal = sum(i + 1 for i in range(3, t))
    assert layer_sparsity(one_hot, 3) == pytest.approx((causal - (t - 3)) / causal)


def test_allocation_follows_density_and_keeps_the_total():
    b = allocate([1.0, 1.0, 2.0, 4.0], 10)
    assert b.tolist() == [5, 5, 10, 20] and b.sum() == 40
    assert allocate([0.0, 1.0], 10, min_budget=3).tolist() == [3, 20]
    with pytest.raises(ValueError, match="density"):
        allocate([0.0, 0.0], 5)


def test_the_policy_on_the_tiny_vlm(model):
    dens = calibrated_density()
    assert len(dens) == model.config.layers and all(0 < d <= 1 for d in dens)
    policy = make_policy(48)
    assert abs(sum(policy.budgets) - 48 * model.config.layers) <= model.config.layers  # rounding only
    ex = world.vqa_set(world.EVAL_SEED, 1)[0]
    _, state = prefill(model, ex.image, tokenizer.prompt_ids(ex.qa.question)[:1], Plugs(kv_policy=policy))
    for layer in range(model.config.layers):
        assert policy.length(layer, state.caches[layer]) == min(policy.budgets[layer], 145)
