"""Decoding strategies on the tiny VLM: every greedy variant equals plain greedy decoding; tree verification equals
sequential verification of every path; the cache after a rejection equals the cache of the accepted prefix; the
tiny VLM's speculative sampling loop draws exactly what the generic loop draws."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mllm_ref.decoding import _model
from mllm_ref.decoding.medusa import DEFAULT_TREE, MedusaDecoding, candidate_tree, load_heads, medusa_heads
from mllm_ref.decoding.multimodal import drafter_inputs, load_drafter
from mllm_ref.decoding.sampling import PlainDecoding, Sampler
from mllm_ref.decoding.self_speculative import SelfSpeculative, early_exit_logits, load_exit_heads
from mllm_ref.decoding.speculative import SpeculativeDecoding, speculative_generate
from mllm_ref.decoding.speculative_greedy import greedy_verify
from mllm_ref.decoding.tree import (
    TreeSpeculative,
    forward_tree,
    random_tree,
    tree_attention_mask,
    tree_positions,
    tree_verify_greedy,
    verify_and_compact,
)
from mllm_ref.kvcache.h2o import H2OPolicy
from mllm_ref.tinyvlm import tokenizer, world
from mllm_ref.tinyvlm.model import forward_logits, generate, load, logits_from_hidden, prefill
from mllm_ref.tinyvlm.plugs import Plugs


@pytest.fixture(scope="module")
def model():
    return load()


@pytest.fixture(scope="module")
def strategies():
    with_image, text_only = load_drafter(True), load_drafter(False)
    exits = load_exit_heads()
    return {
        "plain through the strategies' cache": PlainDecoding(),
        "speculative k=1": SpeculativeDecoding(with_image, k=1),
        "speculative k=3": SpeculativeDecoding(with_image, k=3),
        "speculative k=6": SpeculativeDecoding(with_image, k=6),
        "speculative text-only k=4": SpeculativeDecoding(text_only, k=4),
        "tree": TreeSpeculative(with_image, (2, 2, 1, 1)),
        "medusa": MedusaDecoding(load_heads()),
        "self-speculative E=2": SelfSpeculative(exits, 2, 3),
        "self-speculative E=6": SelfSpeculative(exits, 6, 5),
    }


def requests(n_captions: int, n_questions: int):
    rng = np.random.default_rng(11)
    out = []
    for _ in range(n_captions):
        scene = world.make_scene(rng)
        out.append((world.render(scene), tokenizer.prompt_ids(tokenizer.CAPTION_PROMPT)))
    for ex in world.vqa_set(world.EVAL_SEED + 7, max(1, n_questions // 6))[:n_questions]:
        out.append((ex.image, tokenizer.prompt_ids(ex.qa.question)))
    return out


def test_every_greedy_strategy_equals_plain_greedy_decoding(model, strategies):
    for image, ids in requests(10, 6):
        plain = generate(model, image, ids).tokens
        for name, strategy in strategies.items():
            got = generate(model, image, ids, plugs=strategy.plugs())
            assert got.tokens == plain, name
            assert got.trace.accepted <= got.trace.drafted


def test_max_new_tokens_and_the_question_after_the_image(model, strategies):
    image, ids = requests(1, 0)[0]
    for n in (1, 2, 5):
        plain = generate(model, image, ids, max_new_tokens=n).tokens
        for name, strategy in strategies.items():
            assert generate(model, image, ids, max_new_tokens=n, plugs=strategy.plugs()).tokens == plain, (name, n)
    plain = generate(model, image, ids, prefill_tokens=1).tokens
    got = generate(model, image, ids, prefill_tokens=1, plugs=strategies["speculative k=3"].plugs())
    assert got.tokens == plain


def test_a_good_drafter_is_accepted_more_with_the_image(model, strategies):
    acc = {}
    for name in ("speculative k=3", "speculative text-only k=4"):
        drafted = accepted = 0
        for image, ids in requests(6, 0):
            tr = generate(model, image, ids, plugs=strategies[name].plugs()).trace
            drafted, accepted = drafted + tr.drafted, accepted + tr.accepted
        acc[name] = accepted / drafted
    assert acc["speculative k=3"] > acc["speculative text-only k=4"]


def test_the_cache_after_a_rejection_is_the_cache_of_the_accepted_prefix(model):
    image, ids = requests(1, 0)[0]
    _, state = prefill(model, image, ids)
    stack = _model.stack_from_state(state, Plugs())
    pos = state.next_position
    first = int(np.argmax(forward_logits(model, image, ids)[-1]))
    draft = [first, 5, 7, 9]  # the first token is the target's own choice, then nonsense
    s0 = stack.length()
    logits, grown = _model.feed(model, stack, draft, pos)
    emitted = greedy_verify(logits, np.asarray(draft[1:]))
    n = len(emitted) - 1
    cut = grown.truncate(s0 + n + 1)
    _, direct = _model.feed(model, stack, draft[: n + 1], pos)
    for a, b in zip(cut.k + cut.v, direct.k + direct.v):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_tree_forward_equals_the_forward_of_each_path(model):
    image, ids = requests(1, 0)[0]
    _, state = prefill(model, image, ids)
    stack = _model.stack_from_state(state, Plugs())
    pos = state.next_position
    rng = np.random.default_rng(3)
    parents = random_tree(rng, 9)
    tokens = rng.integers(3, model.config.vocab_size, 9)
    h, _ = forward_tree(model, stack, tokens, parents, pos)
    tree_logits = logits_from_hidden(model, h)
    for node in range(9):
        path = [node]
        while parents[path[-1]] >= 0:
            path.append(int(parents[path[-1]]))
        path = path[::-1]
        seq_logits, _ = _model.feed(model, stack, tokens[path], pos)
        np.testing.assert_allclose(tree_logits[node], seq_logits[-1], rtol=1e-4, atol=1e-4)


def test_the_compacted_tree_cache_is_the_cache_of_the_accepted_path(model):
    image, ids = requests(1, 0)[0]
    logits, state = prefill(model, image, ids)
    stack = _model.stack_from_state(state, Plugs())
    pos = state.next_position
    heads = load_heads()
    from mllm_ref.nn.rmsnorm import rmsnorm

    hl = heads(rmsnorm(state.hidden, model["norm.weight"], eps=model.config.rms_eps))
    tokens, parents = candidate_tree(int(np.argmax(logits)), hl)
    emitted, path, _, compact = verify_and_compact(model, stack, tokens, parents, pos)
    _, direct = _model.feed(model, stack, tokens[path], pos)
    for a, b in zip(compact.k + compact.v, direct.k + direct.v):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@given(st.integers(0, 2**32 - 1), st.integers(1, 12), st.integers(1, 4))
def test_tree_verification_equals_sequential_verification_of_every_path(seed, n, v):
    rng = np.random.default_rng(seed)
    parents = random_tree(rng, n)
    z = np.round(rng.standard_normal((n, v)) * 2)
    tokens = rng.integers(0, v, n)
    emitted, path = tree_verify_greedy(z, tokens, parents)
    best = None
    for leaf in range(n):
        if np.any(parents == leaf):
            continue
        p = [leaf]
        while parents[p[-1]] >= 0:
            p.append(int(parents[p[-1]]))
        p = p[::-1]
        seq = greedy_verify(z[p], tokens[p[1:]])
        if best is None or seq.size > best.size:
            best = seq
    assert emitted.size == best.size  # the longest accepted path over all root-to-leaf paths
    assert emitted[-1] == np.argmax(z[path[-1]])
    for a, b in zip(path[1:], path[:-1]):
        assert parents[a] == b and tokens[a] == np.argmax(z[b])


def test_tree_mask_and_positions():
    parents = np.array([-1, 0, 0, 1, 3])
    m = tree_attention_mask(parents)
    assert m[4].tolist() == [True, True, False, True, True]
    assert m[2].tolist() == [True, False, True, False, False]
    assert tree_positions(parents, 10).tolist() == [10, 11, 11, 12, 13]
    with pytest.raises(ValueError, match="parents"):
        tree_attention_mask(np.array([-1, 2, 0]))


def test_medusa_heads_and_candidate_tree():
    rng = np.random.default_rng(0)
    d, v = 8, 6
    h = rng.standard_normal(d).astype(np.float32)
    w = rng.standard_normal((2, v, d)).astype(np.float32)
    zero = medusa_heads(h, np.zeros((2, d, d), np.float32), np.zeros((2, d), np.float32), w)
    np.testing.assert_allclose(zero, w @ (h + 0.0), rtol=1e-6)  # SiLU(0) = 0: the residual block is the identity
    z = np.array([[0.0, 3.0, 1.0, 2.0, 0.5, -1.0], [5.0, 0.0, 0.0, 0.0, 0.0, 4.0]])
    tokens, parents = candidate_tree(9 % v, z, ((0,), (1,), (0, 0), (0, 1)))
    assert tokens.tolist() == [3, 1, 3, 0, 5] and parents.tolist() == [-1, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="prefix"):
        candidate_tree(0, z, ((0, 0),))


def test_early_exit_head_of_the_last_layer_is_the_lm_head(model):
    h = np.random.default_rng(0).standard_normal(model.config.dim).astype(np.float32)
    np.testing.assert_allclose(
        early_exit_logits(h, model["norm.weight"], model["lm_head.weight"]), logits_from_hidden(model, h), rtol=1e-6
    )
    assert len(load_exit_heads().norm) == model.config.layers - 1
    assert DEFAULT_TREE[0] == (0,)


def test_drafter_inputs():
    vis, txt = np.ones((3, 4), np.float32), np.zeros((2, 4), np.float32)
    x, pos = drafter_inputs(vis, txt)
    assert x.shape == (5, 4) and pos.tolist() == [0, 0, 0, 1, 2]
    x, pos = drafter_inputs(vis, txt, use_visual=False)
    assert x.shape == (2, 4) and pos.tolist() == [1, 2]
    with pytest.raises(ValueError, match="text"):
        drafter_inputs(vis, np.zeros((2, 5), np.float32))


def test_speculative_sampling_on_the_tiny_vlm_draws_what_the_generic_loop_draws(model):
    """Same generator, same uniforms in the same order: the tiny VLM's cached loop and the generic loop over full
    re-forwards emit the same tokens, so the VLM loop inherits the generic loop's exactness (tested above)."""
    drafter = load_drafter(True)
    image, ids = requests(1, 0)[0]
    sampler = Sampler(temperature=1.0)
    _, state = prefill(model, image, ids)
    prompt_stack = drafter.prefill(state.info, np.asarray(ids))

    def target(seq):
        return sampler.probs(forward_logits(model, image, np.asarray(seq))[-1])

    def draft(seq):  # the drafter's distribution after the prompt and the generated tokens (never empty here)
        logits, _ = drafter.feed(prompt_stack, seq[len(ids):], len(ids) + 1)
        return sampler.probs(logits[-1])

    for seed in (0, 1):
        strategy = SpeculativeDecoding(drafter, k=3, sampler=sampler)
        got = generate(model, image, ids, max_new_tokens=6, plugs=strategy.plugs(), rng=np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        first = int(sampler(forward_logits(model, image, np.asarray(ids))[-1], rng))
        rest, _ = speculative_generate(target, draft, list(ids) + [first], k=3, max_new_tokens=5, rng=rng,
                                       eos=tokenizer.EOS)  # fmt: skip
        want = [first] + rest
        if tokenizer.EOS in want:
            want = want[: want.index(tokenizer.EOS)]
        assert list(got.tokens) == want[:6]


def test_strategies_refuse_a_kv_policy_and_a_missing_generator(model, strategies):
    image, ids = requests(1, 0)[0]
    with pytest.raises(ValueError, match="kv_policy"):
        generate(model, image, ids, plugs=Plugs(kv_policy=H2OPolicy(), decoding=strategies["speculative k=3"]))
    with pytest.raises(ValueError, match="rng"):
        generate(model, image, ids, plugs=SpeculativeDecoding(load_drafter(), sampler=Sampler(1.0)).plugs())
    with pytest.raises(TypeError, match="whole decoding loop"):
        strategies["tree"](np.zeros(3))


def test_tour_rows_of_the_decoding_family(model):
    from mllm_ref.tinyvlm.tour import format_table, run_tour

    rows = run_tour(model, only="decoding", n_per_type=1, n_captions=3)
    assert rows[0]["id"] == "baseline" and rows[0]["acceptance_rate"] is None
    ids = {r["id"] for r in rows[1:]}
    assert ids == {"decoding.speculative", "decoding.speculative_greedy", "decoding.tree", "decoding.medusa",
                   "decoding.self_speculative", "decoding.multimodal"}  # fmt: skip
    for r in rows[1:]:
        assert 0.0 <= r["acceptance_rate"] <= 1.0 and r["tokens_per_call"] >= 1.0
        assert r["tokens_per_call"] == pytest.approx(1.0 + r["accepted_per_call"])
        if "sampling" not in r["setting"]:
            assert r["identical_output"], r["setting"]  # every greedy strategy writes what plain greedy writes
    assert "tok/call" in format_table(rows)
