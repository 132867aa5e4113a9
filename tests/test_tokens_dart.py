"""DART (tokens.dart): the paper's rules on hand-made cases, its invariants on drawn ones, the tiny-VLM policy.
The fast paths are checked against the reference by tests/test_registry_properties.py."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mllm_ref.oracle import registry
from mllm_ref.tinyvlm import tokenizer, world
from mllm_ref.tinyvlm.model import Trace, prefill
from mllm_ref.tinyvlm.plugs import Plugs
from mllm_ref.tokens.dart import DEFAULT_LAYER, DartPolicy, dart, key_norms, make_policy, pivots, quotas

TECH = registry.get("tokens.dart")


def _keys(norms: list[float]) -> np.ndarray:
    """Keys ``[1, T, 1]`` whose L1 (and L2) norms are ``norms``."""
    return np.asarray(norms, dtype=np.float64)[None, :, None]


def test_pivots_are_the_largest_key_norms():
    keys = _keys([1.0, 5.0, 2.0, 4.0, 3.0, 0.5, 9.0])  # 5 visual, 2 text
    pv, pt = pivots(keys, 5, 3, 2, 1)
    assert pv.tolist() == [1, 3] and pt.tolist() == [6]
    # L1 and L2 can disagree: (3, 0) has L1 3 < L1 of (2, 2) = 4, but L2 3 > 2.83
    k = np.array([[[3.0, 0.0], [2.0, 2.0], [0.0, 0.1]]]).astype(np.float64)
    assert pivots(k, 3, 1, 1, 0, norm_ord=1)[0].tolist() == [1]
    assert pivots(k, 3, 1, 1, 0, norm_ord=2)[0].tolist() == [0]
    np.testing.assert_allclose(key_norms(k, 1), [3.0, 4.0, 0.1])


def test_one_pivot_keeps_the_least_similar_tokens():
    # unit vectors at angles 0, 30, 60, ..., 150 degrees; the pivot (largest key norm) is token 0 at 0 degrees
    ang = np.deg2rad(np.arange(6) * 30.0)
    hidden = np.stack([np.cos(ang), np.sin(ang)], axis=1)
    hidden = np.concatenate([hidden, [[1.0, 1.0]]])  # one text token
    keys = _keys([9, 1, 1, 1, 1, 1, 1])
    keep, piv = dart(keys, hidden, 6, 3, n_pivot_visual=1, n_pivot_text=0)
    assert piv.tolist() == [0]
    assert keep.tolist() == [0, 4, 5]  # cos 0 deg pivot vs 120 and 150 degrees: the two least similar


def test_text_pivots_also_choose_and_the_budget_is_split():
    ang = np.deg2rad(np.arange(8) * 22.5)
    hidden = np.concatenate([np.stack([np.cos(ang), np.sin(ang)], 1), [[-1.0, 0.0]]])  # text token at 180 degrees
    keys = _keys([9, 1, 1, 1, 1, 1, 1, 1, 5])
    keep, piv = dart(keys, hidden, 8, 5, n_pivot_visual=1, n_pivot_text=1)
    assert piv.tolist() == [0, 8]
    # budget 4 over 2 pivots: the visual pivot (0 deg) takes 157.5 and 135 deg (tokens 7, 6); the text pivot
    # (180 deg) then takes the least similar of the rest: 0 deg is taken, so 22.5 and 45 deg (tokens 1, 2)
    assert keep.tolist() == [0, 1, 2, 6, 7]
    assert quotas(7, 3).tolist() == [3, 2, 2] and quotas(0, 2).tolist() == [0, 0]


@given(TECH.strategy())
def test_count_order_and_pivots_kept(kw):
    keep, piv = dart(**kw)
    n = kw["n_visual"]
    assert keep.size == kw["n_keep"] and np.all(np.diff(keep) > 0)
    assert keep.size == 0 or (keep.min() >= 0 and keep.max() < n)
    visual_piv = piv[piv < n]
    assert set(visual_piv.tolist()) <= set(keep.tolist())
    assert np.all(piv[visual_piv.size:] >= n)  # text pivots come after the visual ones
    assert visual_piv.size == min(kw["n_pivot_visual"], kw["n_keep"])


@given(TECH.strategy())
def test_keeping_everything_is_the_identity(kw):
    keep, _ = dart(**{**kw, "n_keep": kw["n_visual"]})
    assert keep.tolist() == list(range(kw["n_visual"]))


@given(TECH.strategy(), st.integers(0, 2**32 - 1))
def test_permuting_the_visual_tokens_permutes_the_choice(kw, seed):
    """With at most one visual pivot the visiting order of the pivots does not depend on where the visual tokens
    lie, and the choice is permutation-equivariant."""
    kw = {**kw, "n_pivot_visual": min(kw["n_pivot_visual"], 1)}
    n, t = kw["n_visual"], kw["hidden"].shape[0]
    perm = np.random.default_rng(seed).permutation(n)
    full = np.concatenate([perm, np.arange(n, t)])
    keep, _ = dart(**kw)
    keep_p, _ = dart(**{**kw, "keys": kw["keys"][:, full], "hidden": kw["hidden"][full]})
    assert sorted(perm[keep_p].tolist()) == keep.tolist()


@pytest.fixture(scope="module")
def example():
    ex = world.vqa_set(world.EVAL_SEED, 1)[0]
    return ex.image, np.asarray(tokenizer.prompt_ids(ex.qa.question))


def test_policy_keeps_the_budget_and_the_text(model, example):
    image, ids = example
    trace = Trace()
    logits, _ = prefill(model, image, ids, Plugs(token_policy=make_policy(model=model)), trace)
    p = ids.size
    after = DEFAULT_LAYER + 1  # layers 0 .. DEFAULT_LAYER see every token, the rest 32 of 144 (128 of 576)
    assert trace.layer_tokens == [144 + p] * after + [32 + p] * (model.config.layers - after)
    assert np.count_nonzero(trace.source >= 0) == 32 and trace.source.max() == 31
    assert np.isfinite(logits).all()


def test_policy_text_tokens_are_untouched(model, example):
    """At keep ratio 1 the policy is the plain model, and on any layer view it keeps every text token, in
    order, after the kept visual tokens."""
    image, ids = example
    base, _ = prefill(model, image, ids, Plugs())
    same, _ = prefill(model, image, ids, Plugs(token_policy=make_policy(1.0, model)))
    np.testing.assert_array_equal(base, same)
    from mllm_ref.tinyvlm.plugs import LayerView, PromptInfo

    rng = np.random.default_rng(2)
    kw = TECH.make_case("small", rng)
    n, t = kw["n_visual"], kw["hidden"].shape[0]
    view = LayerView(kw["hidden"], None, kw["keys"], np.zeros(t, np.int64), n, np.arange(144) % n,
                     PromptInfo(n, (12, 12), np.arange(n), np.arange(t - n)))  # fmt: skip
    out = DartPolicy(0, 0.25).in_decoder(0, view)
    assert np.array_equal(out[-(t - n):], np.arange(n, t)) and out.size == (t - n) + 6
