"""SparseVLM (tokens.sparsevlm): the paper's rules on hand-made cases, its invariants on drawn ones, the tiny-VLM
policy. The fast paths are checked against the reference by tests/test_registry_properties.py."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mllm_ref.oracle import registry
from mllm_ref.tinyvlm import tokenizer, world
from mllm_ref.tinyvlm.model import Trace, prefill
from mllm_ref.tinyvlm.plugs import Plugs
from mllm_ref.tokens.sparsevlm import (
    DEFAULT_LAYERS,
    SparseVLMPolicy,
    dpc_knn,
    make_policy,
    n_deleted,
    numerical_rank,
    rater_scores,
    raters,
    recycle_counts,
    scale_for,
    sparsevlm,
)

TECH = registry.get("tokens.sparsevlm")


def _attn_from_rows(rows: dict[int, list[float]], h: int, t: int) -> np.ndarray:
    """Attention ``[h, t, t]`` that is uniform-causal except for the given query rows (same in every head)."""
    a = np.tril(np.ones((t, t))) / np.arange(1, t + 1)[:, None]
    for i, r in rows.items():
        a[i] = r
    return np.repeat(a[None], h, axis=0)


def _hand_case():
    """4 visual tokens, text tokens 4 (aligned with the image: the rater) and 5 (opposed)."""
    d = 4
    hidden = np.zeros((6, d))
    hidden[:4] = [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1]]
    hidden[4] = [4, 0, 0, 0]
    hidden[5] = [-4, 0, 0, 0]
    attn = _attn_from_rows({4: [0.1, 0.4, 0.2, 0.3, 0.0, 0.0], 5: [0.4, 0.1, 0.3, 0.2, 0.0, 0.0]}, 2, 6)
    return attn, hidden


def test_raters_are_the_text_tokens_above_the_mean_relevance():
    _, hidden = _hand_case()  # as input embeddings
    assert raters(hidden, 4).tolist() == [4]
    same = hidden.copy()
    same[5] = same[4]  # equally relevant: nobody is above the mean, so every text token rates
    assert raters(same, 4).tolist() == [4, 5]


def test_hand_example_pins_scores_rank_count_and_recycling():
    attn, hidden = _hand_case()
    p, s = rater_scores(attn, np.array([4]), 4)
    np.testing.assert_allclose(s, [0.1, 0.4, 0.2, 0.3])  # the rater's row only; the opposed token does not vote
    assert numerical_rank(p) == 1
    # N = floor(0.5 * (4 - 1)) = 1: the lowest-scored token (0) goes; floor(0.3 * 1) + 1 = 1 recycled, 1 group
    keep, recycled, group = sparsevlm(attn, hidden, hidden, 4, scale=0.5)
    assert keep.tolist() == [1, 2, 3]
    assert group.tolist() == [0, -1, -1, -1]
    np.testing.assert_allclose(recycled, hidden[[0]])
    # lambda = 1 deletes n - rank = 3; the best deleted one (token 3, score 0.3) is recycled alone
    keep, recycled, group = sparsevlm(attn, hidden, hidden, 4, scale=1.0)
    assert keep.tolist() == [1]
    assert recycle_counts(3, 0.3, 0.1) == (1, 1)
    assert group.tolist() == [-1, -1, -1, 0]


def test_rank_of_the_rater_attention_sets_the_count():
    d = 3
    hidden = np.zeros((8, d))
    hidden[:6] = np.eye(6, d) + 1.0
    hidden[6:] = [5.0, 5.0, 5.0]  # two identical raters (equal relevance: both rate)
    row = [0.3, 0.05, 0.2, 0.1, 0.15, 0.2, 0.0, 0.0]
    same = _attn_from_rows({6: row, 7: row}, 1, 8)
    other = _attn_from_rows({6: row, 7: [0.05, 0.3, 0.1, 0.2, 0.2, 0.15, 0.0, 0.0]}, 1, 8)
    assert numerical_rank(rater_scores(same, np.array([6, 7]), 6)[0]) == 1
    assert numerical_rank(rater_scores(other, np.array([6, 7]), 6)[0]) == 2
    # N = floor(0.8 (6 - rank)): 4 with rank 1, 3 with rank 2
    assert sparsevlm(same, hidden, hidden, 6, scale=0.8, recycle_ratio=0.0)[0].size == 6 - 4
    assert sparsevlm(other, hidden, hidden, 6, scale=0.8, recycle_ratio=0.0)[0].size == 6 - 3
    assert numerical_rank(np.zeros((2, 5))) == 0
    assert n_deleted(10, 0, 1.0) == 9  # one visual token always stays


def test_density_peak_clustering_finds_separated_groups():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 6)) * 0.05 + 3.0
    b = rng.standard_normal((4, 6)) * 0.05 - 3.0
    x = np.concatenate([a[:2], b[:2], a[2:], b[2:]])
    g = dpc_knn(x, 2)
    assert len(set(g[[0, 1, 4, 5, 6]])) == 1 and len(set(g[[2, 3, 7, 8]])) == 1 and g[0] != g[2]
    assert dpc_knn(x, x.shape[0]).tolist() == list(range(x.shape[0]))  # every token its own centre
    assert dpc_knn(np.zeros((4, 3)), 2).tolist() == [0, 1, 0, 0]  # all tied: the lowest indices are the centres


@given(TECH.strategy())
def test_counts_order_and_recycled_means(kw):
    keep, recycled, group = sparsevlm(**kw)
    n, hidden = kw["n_visual"], kw["hidden"]
    e, m = kw["embeds"], hidden.shape[0] - n
    rank = numerical_rank(rater_scores(kw["attn"], raters(e, e.shape[0] - m) - (e.shape[0] - m) + n, n)[0])
    n_del = n_deleted(n, rank, kw["scale"])
    n_sel, c = recycle_counts(n_del, kw["recycle_ratio"], kw["cluster_ratio"])
    assert keep.size == n - n_del and np.all(np.diff(keep) > 0)
    assert recycled.shape == (c, hidden.shape[1]) and recycled.dtype == hidden.dtype
    assert np.count_nonzero(group >= 0) == n_sel and not np.any(group[keep] >= 0)
    if c:
        assert sorted(set(group[group >= 0].tolist())) == list(range(c))
        # each recycled token is its group's mean: the recycled tokens' count-weighted sum is the chosen ones' sum
        counts = np.bincount(group[group >= 0], minlength=c)
        np.testing.assert_allclose(
            (recycled.astype(np.float64) * counts[:, None]).sum(0),
            hidden[:n][group >= 0].astype(np.float64).sum(0),
            rtol=1e-5, atol=1e-5 * max(1.0, np.abs(hidden).max()) * n_sel,
        )  # fmt: skip


@given(TECH.strategy())
def test_scale_zero_is_the_identity(kw):
    keep, recycled, group = sparsevlm(**{**kw, "scale": 0.0})
    assert keep.tolist() == list(range(kw["n_visual"]))
    assert recycled.shape[0] == 0 and np.all(group == -1)


@given(TECH.strategy(), st.integers(0, 2**32 - 1))
def test_permuting_the_visual_tokens_permutes_the_choice(kw, seed):
    n, t = kw["n_visual"], kw["hidden"].shape[0]
    perm = np.random.default_rng(seed).permutation(n)
    full = np.concatenate([perm, np.arange(n, t)])
    attn = kw["attn"][:, full][:, :, full]
    keep, recycled, group = sparsevlm(**kw)
    keep_p, recycled_p, group_p = sparsevlm(**{**kw, "attn": attn, "hidden": kw["hidden"][full]})
    assert sorted(perm[keep_p].tolist()) == keep.tolist()
    assert np.array_equal(group_p >= 0, (group >= 0)[perm])
    # the grouping itself breaks exact density ties (mutual nearest neighbours) by index, so only the recycled
    # tokens' count-weighted sum (the sum of the recycled patches) is equivariant
    def total(rec, grp):
        counts = np.bincount(grp[grp >= 0], minlength=rec.shape[0])
        return (rec.astype(np.float64) * counts[:, None]).sum(0)

    np.testing.assert_allclose(total(recycled_p, group_p), total(recycled, group), rtol=1e-5, atol=1e-4)


def test_scale_for_maps_the_keep_ratio():
    assert scale_for(1.0) == 0.0
    assert scale_for(1 / 8, 3) == pytest.approx(0.5)
    assert scale_for(0.0) == 1.0


@pytest.fixture(scope="module")
def example():
    ex = world.vqa_set(world.EVAL_SEED, 1)[0]
    return ex.image, np.asarray(tokenizer.prompt_ids(ex.qa.question))


def test_policy_prunes_recycles_and_keeps_the_text(model, example):
    image, ids = example
    base_trace, trace = Trace(), Trace()
    base_logits, _ = prefill(model, image, ids, Plugs(), base_trace)
    logits, _ = prefill(model, image, ids, Plugs(token_policy=make_policy()), trace)
    p = ids.size
    assert trace.layer_tokens[0] == base_trace.layer_tokens[0]
    for layer, (a, b) in enumerate(zip(trace.layer_tokens, trace.layer_tokens[1:])):
        assert a > b if layer in DEFAULT_LAYERS else a == b  # tokens leave only after the pruning layers
    assert trace.layer_tokens[-1] - p < 0.5 * 144  # about a third of the visual tokens left (plus recycled ones)
    src = trace.source
    n_last = trace.layer_tokens[-1] - p
    assert src.shape == (144,) and src.max() < n_last and src.min() >= -1
    # recycled tokens carry several patches: some token is the target of more than one patch
    live = src[src >= 0]
    assert np.bincount(live).max() > 1
    assert np.isfinite(logits).all()


def test_policy_at_keep_ratio_one_is_the_plain_model(model, example):
    image, ids = example
    base, _ = prefill(model, image, ids, Plugs())
    same, _ = prefill(model, image, ids, Plugs(token_policy=make_policy(1.0)))
    np.testing.assert_array_equal(base, same)


def test_policy_text_rows_are_those_of_the_layer(model, example):
    """The policy's DecoderUpdate keeps the text rows bit for bit (the model also checks it) and puts the
    visual tokens at position 0."""
    from mllm_ref.tinyvlm.plugs import LayerView, PromptInfo

    image, ids = example
    rng = np.random.default_rng(1)
    kw = TECH.make_case("small", rng)
    n, t = kw["n_visual"], kw["hidden"].shape[0]
    info = PromptInfo(n, (12, 12), np.arange(n), np.arange(t - n), kw["embeds"])
    source = np.full(144, -1, dtype=np.int64)
    source[:n] = np.arange(n)
    view = LayerView(kw["hidden"], kw["attn"], np.zeros((1, t, 2), np.float32),
                     np.concatenate([np.zeros(n, np.int64), np.arange(1, t - n + 1)]), n, source, info)  # fmt: skip
    policy = SparseVLMPolicy((0,), 0.5)
    upd = policy.in_decoder(0, view)
    assert np.array_equal(upd.hidden[upd.n_visual:], kw["hidden"][n:])
    assert np.all(upd.positions[: upd.n_visual] == 0)
    assert np.array_equal(upd.positions[upd.n_visual :], view.positions[n:])
    assert upd.source.max() < upd.n_visual
