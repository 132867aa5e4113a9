"""The KV-cache plug of the tiny VLM: positions handed to the policy, the fused-attention hook, reading the question
through the cache, key re-rotation, and the measured bytes against the memory formula."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mllm_ref.kvcache._accounting import effective_bytes_per_element, formula_bytes, measured_bytes
from mllm_ref.nn.attention import attention
from mllm_ref.nn.rope import rerotate, rope
from mllm_ref.tinyvlm import tokenizer, world
from mllm_ref.tinyvlm.evaluate import evaluate
from mllm_ref.tinyvlm.model import Trace, generate, prefill
from mllm_ref.tinyvlm.plugs import KVPolicy, Plugs


@pytest.fixture(scope="module")
def example():
    return world.vqa_set(world.EVAL_SEED, 1)[3]


class _Recording(KVPolicy):
    """Records the positions and visual counts the model hands over (a test fixture)."""

    def __init__(self):
        self.stored, self.extended = {}, []

    def store(self, layer, k, v, attn, info, *, positions, n_visual):
        self.stored[layer] = (positions.copy(), n_visual, k.shape[1])
        return super().store(layer, k, v, attn, info, positions=positions, n_visual=n_visual)

    def extend(self, layer, cache, k, v, attn, *, position):
        self.extended.append((layer, position))
        return super().extend(layer, cache, k, v, attn, position=position)


def test_the_policy_sees_positions_and_visual_counts(model, example):
    from mllm_ref.tokens.fastv import FastVPolicy

    rec = _Recording()
    ids = tokenizer.prompt_ids(example.qa.question)
    gen = generate(model, example.image, ids, max_new_tokens=3, plugs=Plugs(token_policy=FastVPolicy(2, 0.5),
                                                                            kv_policy=rec))  # fmt: skip
    p = len(ids)
    pos0, nv0, t0 = rec.stored[0]
    assert nv0 == 144 and t0 == 144 + p and pos0.tolist() == [0] * 144 + list(range(1, p + 1))
    pos_late, nv_late, t_late = rec.stored[model.config.layers - 1]
    assert nv_late == 72 and t_late == 72 + p and pos_late.tolist() == [0] * 72 + list(range(1, p + 1))
    steps = len(gen.trace.decode_layers)
    assert [pos for layer, pos in rec.extended if layer == 0] == list(range(p + 1, p + 1 + steps))


class _FusedPlain(KVPolicy):
    """A policy with its own attend(): plain attention over its float32 cache (must change nothing)."""

    def attend(self, layer, cache, q, k, v, *, want_weights):
        kk = np.concatenate([cache.k[0], k], axis=1)
        vv = np.concatenate([cache.v[0], v], axis=1)
        out = attention(q[None], kk[None], vv[None], causal=True, return_weights=want_weights)
        return (out[0][0], out[1][0]) if want_weights else (out[0], None)


class _Declines(KVPolicy):
    """attend() returns None: the model must read and attend as usual."""

    calls = 0

    def attend(self, layer, cache, q, k, v, *, want_weights):
        type(self).calls += 1
        return None


class _BadShape(KVPolicy):
    def attend(self, layer, cache, q, k, v, *, want_weights):
        return np.zeros((1, 1, 1), np.float32), None


def test_fused_attention_hook_gives_the_same_tokens(model, example):
    ids = tokenizer.prompt_ids(tokenizer.CAPTION_PROMPT)
    plain = generate(model, example.image, ids)
    assert generate(model, example.image, ids, plugs=Plugs(kv_policy=_FusedPlain())).tokens == plain.tokens
    assert generate(model, example.image, ids, plugs=Plugs(kv_policy=_Declines())).tokens == plain.tokens
    assert _Declines.calls > 0
    with pytest.raises(ValueError, match="KVPolicy.attend must return"):
        generate(model, example.image, ids, plugs=Plugs(kv_policy=_BadShape()))


def test_question_read_through_the_cache_equals_the_whole_prefill(model):
    for ex in world.vqa_set(world.EVAL_SEED, 2)[:8]:
        ids = tokenizer.prompt_ids(ex.qa.question)
        whole = generate(model, ex.image, ids)
        for split in (1, 2, len(ids)):
            assert generate(model, ex.image, ids, prefill_tokens=split).tokens == whole.tokens
    trace = Trace()
    prefill(model, ex.image, ids[:1], trace=trace)
    assert trace.n_prompt == 1
    with pytest.raises(ValueError, match="prefill_tokens"):
        generate(model, ex.image, ids, prefill_tokens=len(ids) + 1)
    with pytest.raises(TypeError, match="question_after_image"):
        evaluate(model, 1, n_captions=0, question_after_image="yes")


def test_question_after_image_counts_the_prompt_as_decode_steps(model):
    a = evaluate(model, 1, n_captions=0)
    b = evaluate(model, 1, n_captions=0, question_after_image=True)
    assert a.predictions == b.predictions
    for ta, tb in zip(a.traces, b.traces):
        assert tb.n_prompt == 1 and len(tb.decode_layers) == len(ta.decode_layers) + ta.n_prompt - 1


@given(st.integers(0, 2**32 - 1), st.sampled_from([np.float32, np.float64]))
def test_rerotated_keys_equal_keys_rotated_at_the_new_positions(seed, dtype):
    rng = np.random.default_rng(seed)
    t, d = int(rng.integers(1, 9)), 2 * int(rng.integers(1, 9))
    x = rng.standard_normal((2, t, d)).astype(dtype)
    old = rng.integers(0, 5000, t)
    new = rng.integers(0, 5000, t)
    got = rerotate(rope(x, old, 10000.0), old, new, 10000.0)
    tol = 1e-4 if dtype == np.float32 else 1e-9
    np.testing.assert_allclose(got, rope(x, new, 10000.0), atol=tol * np.abs(x).max(), rtol=0)
    assert got.dtype == dtype


def test_rerotate_rejects_bad_positions():
    x = np.zeros((3, 4))
    with pytest.raises(ValueError, match="new_positions"):
        rerotate(x, [0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match="positions"):
        rerotate(x, [0, 1, 2], [0, -1, 2])


@pytest.mark.parametrize("context", [2, 150, 1000])
def test_plain_cache_bytes_equal_the_memory_formula(model, context):
    cfg = model.config
    assert measured_bytes(KVPolicy(), cfg, context, decode_steps=2) == formula_bytes(cfg, context + 2, 4.0)
    assert effective_bytes_per_element(KVPolicy(), cfg, context) == 4.0


def test_measured_bytes_of_a_real_request_match_the_trace(model, example):
    """The accounting feeds the policy what the model would: the bytes agree with a real request's trace."""
    trace = Trace()
    ids = tokenizer.prompt_ids(example.qa.question)
    prefill(model, example.image, ids, trace=trace)
    assert trace.kv_bytes == measured_bytes(KVPolicy(), model.config, 144 + len(ids))


def test_cli_eval_with_a_technique(capsys):
    import json

    from mllm_ref.cli import main

    assert main(["eval", "--n", "1", "--captions", "0", "--technique", "tokens.fastv", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 6 and 0.0 <= out["accuracy"] <= 1.0
    assert main(["eval", "--n", "1", "--captions", "0", "--technique", "nn.softmax"]) == 2
    assert "does not plug into the tiny VLM" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["streaming", "h2o", "snapkv"])
def test_eviction_policies_report_the_tokens_they_keep(model, example, name):
    import importlib

    from mllm_ref.tinyvlm.model import decode_step

    policy = importlib.import_module(f"mllm_ref.kvcache.{name}").make_policy(32)
    ids = tokenizer.prompt_ids(example.qa.question)
    t = 144 + len(ids)
    _, state = prefill(model, example.image, ids, Plugs(kv_policy=policy))
    for layer in (0, model.config.layers - 1):
        kept = policy.kept_tokens(layer, state.caches[layer])
        assert kept.shape == (model.config.kv_heads, 32) and kept.dtype == np.int64
        assert np.all(np.diff(kept, axis=1) > 0) and kept.min() >= 0 and kept.max() == t - 1
    _, state = decode_step(model, state, 5, Plugs(kv_policy=policy))
    kept = policy.kept_tokens(0, state.caches[0])
    assert kept.max() == t and policy.length(0, state.caches[0]) == kept.shape[1]
    if name == "streaming":  # sinks and the recent window, the same in every head
        assert kept[0].tolist() == [0, 1, 2, 3] + list(range(t + 1 - 28, t + 1))


def test_memory_formula_against_eviction_and_paged_caches(model):
    """The survey's formula with S = the tokens each cache holds gives the bytes of its keys and values; what the
    cache holds besides (position ids, whole blocks) is accounted for exactly."""
    from mllm_ref.kvcache import h2o, paged, streaming

    cfg = model.config
    lhd = cfg.layers * cfg.kv_heads
    # StreamingLLM at 64 tokens: keys and values of 64 tokens, plus their int64 position ids
    got = measured_bytes(streaming.make_policy(64), cfg, 300, decode_steps=5)
    assert got == formula_bytes(cfg, 64, 4.0) + lhd * 64 * 8
    # H2O also keeps its float64 accumulated scores
    got = measured_bytes(h2o.make_policy(64), cfg, 300, decode_steps=5)
    assert got == formula_bytes(cfg, 64, 4.0) + lhd * 64 * (8 + 8)
    # paged: whole blocks of 16, the last one partly empty
    for context in (150, 160, 161):
        blocks = -(-context // 16)
        assert measured_bytes(paged.PagedKV(16), cfg, context) == formula_bytes(cfg, 16 * blocks, 4.0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_memory_formula_against_the_per_token_quantized_cache(model, bits):
    """Effective bytes per cached number: bits / 8 of packed codes plus a float32 step and minimum per group of 32
    channels (the formula's b_kv for this cache)."""
    from mllm_ref.kvcache.quant_token import make_policy

    got = effective_bytes_per_element(make_policy(bits), model.config, 150, decode_steps=3)
    assert got == pytest.approx(bits / 8 + 8 / 32, rel=1e-12)


def test_every_kv_technique_on_the_tiny_vlm_reads_the_question_through_its_cache():
    """The one-word answers come from the prefill's logits: a KV technique's tour row is only meaningful in the
    question-after-image mode, and the sweeps need each module's make_policy."""
    import importlib
    import inspect

    from mllm_ref.oracle import registry

    techs = [t for t in registry.all_techniques("kvcache") if t.model_level]
    assert len(techs) >= 8
    for t in techs:
        assert t.extra.get("question_after_image") is True, t.id
        make = getattr(importlib.import_module(t.reference.__module__), "make_policy", None)
        if t.id != "kvcache.paged":
            assert make is not None, f"{t.id} has no make_policy"
            assert next(iter(inspect.signature(make).parameters)) in ("bits", "budget"), t.id
