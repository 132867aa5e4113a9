"""FastV: the pruning step's invariants, a hand-computed case, and the plug on the tiny VLM."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mllm_ref.oracle import registry
from mllm_ref.tinyvlm import tokenizer, world
from mllm_ref.tinyvlm.model import Trace, generate, prefill
from mllm_ref.tinyvlm.plugs import Plugs
from mllm_ref.tokens.fastv import DEFAULT_K, FastVPolicy, fastv, fastv_scores, flops_ratio, make_policy, n_kept

TECH = registry.get("tokens.fastv")
CASES = TECH.strategy()


@given(CASES)
def test_count_order_and_untouched_tokens(kw):
    keep, kept = fastv(**kw)
    t = kw["hidden"].shape[0]
    s, n = kw["visual_start"], kw["n_visual"]
    assert keep.dtype == np.int64 and keep.size == t - n + n_kept(n, kw["ratio"])
    assert np.all(np.diff(keep) > 0), "kept tokens stay in their order"
    assert np.array_equal(keep[:s], np.arange(s)), "tokens before the image are kept"
    assert np.array_equal(keep[keep >= s + n], np.arange(s + n, t)), "text after the image is kept"
    assert np.array_equal(kept, kw["hidden"][keep]) and kept.dtype == kw["hidden"].dtype


@given(CASES)
def test_ratio_zero_is_the_identity(kw):
    kw["ratio"] = 0.0
    keep, kept = fastv(**kw)
    assert np.array_equal(keep, np.arange(kw["hidden"].shape[0]))
    assert np.array_equal(kept, kw["hidden"])


@given(CASES)
def test_kept_tokens_outscore_dropped_ones(kw):
    keep, _ = fastv(**kw)
    s, n = kw["visual_start"], kw["n_visual"]
    scores = fastv_scores(kw["attn"], s, n, kw["scoring"])
    img = np.zeros(n, dtype=bool)
    img[keep[(keep >= s) & (keep < s + n)] - s] = True
    if img.any() and (~img).any():
        assert scores[img].min() >= scores[~img].max()


@given(CASES, st.randoms(use_true_random=False))
def test_permutation_equivariant_over_image_tokens(kw, rnd):
    """Permuting the image tokens (their hidden rows and attention columns) permutes the kept set alike."""
    s, n = kw["visual_start"], kw["n_visual"]
    perm = list(range(n))
    rnd.shuffle(perm)
    perm = np.array(perm, dtype=np.int64)
    order = np.concatenate([np.arange(s), s + perm, np.arange(s + n, kw["hidden"].shape[0])])
    keep, _ = fastv(**kw)
    keep_p, kept_p = fastv(**{**kw, "hidden": kw["hidden"][order], "attn": kw["attn"][:, :, order]})
    assert set(order[keep_p].tolist()) == set(keep.tolist())
    assert np.array_equal(kept_p, kw["hidden"][order[keep_p]])


def test_hand_computed_case_and_ties_to_the_lower_index():
    # 1 system token, 4 image tokens, 1 text token; 2 heads. Last row summed over heads on the image columns
    # (exact binary fractions): [0.25, 0.75, 0.5, 0.75] -> R = 0.5 keeps image tokens 1 and 3; R = 0.75 keeps one,
    # and the tie between image tokens 1 and 3 goes to token 1.
    attn = np.zeros((2, 6, 6), dtype=np.float32)
    attn[0, -1] = [0.0, 0.125, 0.5, 0.125, 0.25, 0.0]
    attn[1, -1] = [0.0, 0.125, 0.25, 0.375, 0.5, -0.0]
    hidden = np.arange(12, dtype=np.float32).reshape(6, 2)
    keep, kept = fastv(hidden, attn, 1, 4, 0.5)
    assert keep.tolist() == [0, 2, 4, 5]
    assert np.array_equal(kept, hidden[[0, 2, 4, 5]])
    keep, _ = fastv(hidden, attn, 1, 4, 0.75)
    assert keep.tolist() == [0, 2, 5]
    keep, _ = fastv(hidden, attn, 1, 4, 1.0)
    assert keep.tolist() == [0, 5]


def test_mean_scoring_averages_every_query_row():
    attn = np.zeros((1, 4, 4), dtype=np.float64)
    attn[0, :, 1] = [0.0, 1.0, 0.5, 0.1]  # column sum 1.6
    attn[0, :, 2] = [0.0, 0.0, 0.5, 0.8]  # column sum 1.3, but the larger last-row entry
    hidden = np.eye(4)
    assert fastv(hidden, attn, 1, 2, 0.5, "mean")[0].tolist() == [0, 1, 3]
    assert fastv(hidden, attn, 1, 2, 0.5, "last")[0].tolist() == [0, 2, 3]
    np.testing.assert_allclose(fastv_scores(attn, 1, 2, "mean"), [1.6 / 4, 1.3 / 4])


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"ratio": 1.5}, "ratio"),
        ({"scoring": "max"}, "scoring"),
        ({"n_visual": 9}, "n_visual"),
        ({"attn": -np.ones((1, 4, 4), np.float32)}, "attn"),
        ({"attn": np.ones((1, 3, 4), np.float32)}, "attn"),
    ],
)
def test_bad_arguments_are_named(kw, match):
    args = {"hidden": np.ones((4, 2), np.float32), "attn": np.full((1, 4, 4), 0.25, np.float32),
            "visual_start": 1, "n_visual": 2, "ratio": 0.5, "scoring": "last"}  # fmt: skip
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        fastv(**args)


def test_flops_ratio_reproduces_the_papers_claim():
    """FastV reports about 45% fewer FLOPs for K=2, R=50% on LLaVA-1.5-13B (40 layers, d=5120, m=13824, 576 image
    tokens plus a prompt of some 64 tokens): the formula gives 43% (ratio 0.566)."""
    r = flops_ratio(576 + 64, 288, 40, 2, 5120, 13824)
    assert 0.54 < r < 0.58
    assert flops_ratio(100, 0, 4, 1, 8, 16) == 1.0
    assert flops_ratio(100, 50, 4, 4, 8, 16) == 1.0  # K = L: nothing runs pruned


# ------------------------------------------------------------------------------------------------- tiny VLM
@pytest.fixture(scope="module")
def example():
    return world.vqa_set(world.EVAL_SEED, 1)[0]


def test_policy_at_ratio_zero_is_the_plain_model(model, example):
    ids = tokenizer.prompt_ids(example.qa.question)
    plain, _ = prefill(model, example.image, ids)
    pruned, _ = prefill(model, example.image, ids, Plugs(token_policy=FastVPolicy(1, 0.0)))
    np.testing.assert_array_equal(plain, pruned)


@pytest.mark.parametrize("k, ratio", [(1, 0.5), (2, 0.75), (3, 0.25)])
def test_policy_drops_after_layer_k(model, example, k, ratio):
    ids = tokenizer.prompt_ids(example.qa.question)
    trace = Trace()
    prefill(model, example.image, ids, Plugs(token_policy=FastVPolicy(k, ratio)), trace)
    n, t = model.config.n_patches, model.config.n_patches + len(ids)
    kept = t - n + n_kept(n, ratio)
    assert trace.layer_tokens == [t] * k + [kept] * (model.config.layers - k)
    assert int((trace.source >= 0).sum()) == n_kept(n, ratio)
    assert sorted(set(trace.source[trace.source >= 0].tolist())) == list(range(n_kept(n, ratio)))


def test_policy_keeps_what_the_reference_keeps(model, example):
    """The plug calls the reference on layer K-1's output and attention: replay it by hand."""
    from mllm_ref.tinyvlm.model import _decoder_layer, encode_image, positions_for
    from mllm_ref.tinyvlm.plugs import NONE

    ids = tokenizer.prompt_ids(example.qa.question)
    x = np.concatenate([encode_image(model, example.image), model["embed.weight"][ids]])
    pos = positions_for(model.config.n_patches, len(ids))
    x, _, _, w = _decoder_layer(model, NONE, 0, x, pos, None, causal=True, want_weights=True)
    keep, _ = fastv(x, w, 0, model.config.n_patches, 0.5)
    trace = Trace()
    prefill(model, example.image, ids, Plugs(token_policy=FastVPolicy(1, 0.5)), trace)
    kept_patches = np.flatnonzero(trace.source >= 0)
    assert np.array_equal(kept_patches, keep[keep < model.config.n_patches])


def test_decoding_after_pruning_runs_and_make_policy_maps_the_fraction(model, example):
    ids = tokenizer.prompt_ids(tokenizer.CAPTION_PROMPT)
    out = generate(model, example.image, ids, plugs=Plugs(token_policy=make_policy(0.25)), max_new_tokens=8)
    assert 1 <= len(out.tokens) <= 8
    # layers 0 .. K-1 ran on every token and cache them all (the trace records layer 0); the L - K later layers
    # cache the 36 kept image tokens: KV bytes are (K (144 + P) + (L - K)(36 + P)) / (L (144 + P)) of the plain's
    n, p, k, n_layers = model.config.n_patches, len(ids), DEFAULT_K, model.config.layers
    assert out.trace.decode_context[0] == n + p
    steps = len(out.trace.decode_context)
    per_token = 2 * model.config.kv_heads * model.config.head_dim * 4  # float32 keys and values, one layer
    assert out.trace.kv_bytes == per_token * (k * (n + p + steps) + (n_layers - k) * (n_kept(n, 0.75) + p + steps))
    assert make_policy(0.25).ratio == pytest.approx(0.75) and make_policy(1.0).ratio == 0.0
    with pytest.raises(ValueError, match="keep_ratio"):
        make_policy(1.2)
    with pytest.raises(ValueError, match="k"):
        FastVPolicy(0, 0.5)
