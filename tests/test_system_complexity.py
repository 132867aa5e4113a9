"""FLOP and byte counts per stage (``system.complexity``): by hand on small numbers, scaling laws, token dropping,
decode steps, the survey's Table 1, and bad input."""

from __future__ import annotations

import types

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mllm_ref.system import complexity, memory, specs
from mllm_ref.system.complexity import (
    Cost,
    connector_cost,
    decode_cost,
    decode_step_cost,
    encoder_cost,
    forward_cost,
    layer_flops,
    prefill_cost,
)
from mllm_ref.system.specs import ConnectorSpec, DecoderSpec, ModelSpec, VisionSpec

TINY = specs.spec_from_tinyvlm(
    types.SimpleNamespace(image_size=48, patch_size=4, channels=3, vis_dim=64, vis_layers=3, vis_heads=4, vis_mlp=256,
                          proj_hidden=128, dim=128, layers=4, heads=4, kv_heads=2, ffn_dim=352, vocab_size=42)
)  # fmt: skip

# A toy model small enough to count by hand: 2x2 patches of a 4x4 image -> 4 tokens of width 4.
TOY = ModelSpec(
    "toy",
    VisionSpec(4, 2, 1, dim=4, layers=1, heads=1, mlp_dim=8, n_tokens=4),
    ConnectorSpec("mlp", 4, 6, 4, 4, 4),
    DecoderSpec(layers=1, dim=4, heads=2, kv_heads=1, head_dim=2, ffn_dim=8, vocab=10),
)


# ------------------------------------------------------------------------------------------------------- by hand
def test_layer_flops_by_hand():
    # dim 4, 2 query heads and 1 KV head of size 2: Q 4->4, K 4->2, V 4->2, O 4->4
    out = layer_flops(3, 3, dim=4, heads=2, kv_heads=1, head_dim=2, ffn_dim=8)
    assert out["projections"] == 2 * 3 * (16 + 8 + 8 + 16)
    assert out["attention"] == 2 * 2 * 4 * (1 + 2 + 3)  # QK^T and AV over H*d_h = 4, causal pairs 1+2+3
    assert out["ffn"] == 3 * 2 * 3 * 4 * 8
    assert out["total"] == out["projections"] + out["attention"] + out["ffn"]
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float64 and v.shape == () for v in out.values())
    # a decode step: 1 query over 5 keys (4 cached + itself) -> 5 pairs
    assert layer_flops(1, 5, 4, 2, 1, 2, 8)["attention"] == 2 * 2 * 4 * 5
    # a chunk of 2 queries at positions 4 and 5 of 5 keys: 4 + 5 pairs
    assert layer_flops(2, 5, 4, 2, 1, 2, 8)["attention"] == 2 * 2 * 4 * (4 + 5)
    # bidirectional: the full square; non-gated FFN: two matrices
    assert layer_flops(3, 3, 4, 2, 1, 2, 8, causal=False)["attention"] == 2 * 2 * 4 * 9
    assert layer_flops(3, 3, 4, 2, 1, 2, 8, gated_ffn=False)["ffn"] == 2 * 2 * 3 * 4 * 8


def test_layer_flops_vectorises():
    nq, nk = np.array([1, 2, 7]), np.array([7, 7, 7])
    out = layer_flops(nq, nk, 8, 4, 2, 2, 16)
    for i in range(3):
        one = layer_flops(int(nq[i]), int(nk[i]), 8, 4, 2, 2, 16)
        assert all(out[k][i] == one[k] for k in out)
    assert layer_flops(1, np.arange(1, 6), 8, 4, 2, 2, 16)["total"].shape == (5,)  # broadcasting


def test_encoder_and_connector_by_hand():
    n, d, m = 4, 4, 8
    block = 2 * n * 4 * d * d + 2 * 2 * d * n * n + 2 * 2 * n * d * m  # Q, K, V, O + full attention + GELU MLP
    patch = 2 * n * (2 * 2 * 1) * d
    enc = encoder_cost(TOY, bytes_per_param=1, bytes_per_activation=1)
    assert enc.flops == block + patch
    assert enc.bytes_weights == memory.param_count(TOY)["vision"]
    assert encoder_cost(TOY, n_images=3).flops == 3 * enc.flops
    assert encoder_cost(TOY, n_images=3).bytes_weights == encoder_cost(TOY).bytes_weights  # read once
    assert encoder_cost(TOY, n_images=0) == Cost()
    con = connector_cost(TOY, bytes_per_param=1, bytes_per_activation=1)
    assert con.flops == 2 * 4 * (4 * 6 + 6 * 4)
    assert con.bytes_activations == 4 * (4 + 6) + 4 * (6 + 4)
    assert con.bytes_weights == 4 * 6 + 6 + 6 * 4 + 4


def test_prefill_by_hand():
    t = 3  # 1 visual + 2 text tokens through one layer
    proj = 2 * t * (16 + 8 + 8 + 16)
    attn = 2 * 2 * 4 * (1 + 2 + 3)
    ffn = 3 * 2 * t * 4 * 8
    head = 2 * 4 * 10  # the LM head on the last position only
    cost = prefill_cost(TOY, 1, 2, bytes_per_param=1, kv_bytes_per_element=1)
    assert cost.flops == proj + attn + ffn + head
    assert prefill_cost(TOY, 1, 2, all_logits=True).flops == proj + attn + ffn + 3 * head
    assert prefill_cost(TOY, 1, 2, causal=False).flops == proj + 2 * 2 * 4 * 9 + ffn + head
    assert cost.bytes_kv_written == t * 2 * 1 * 2  # a key and a value of 1 head x 2 per token
    layer = 4 * 4 + 2 * 4 * 2 + 4 * 4 + 3 * 4 * 8 + 2 * 4
    assert cost.bytes_weights == layer + 4 + 10 * 4 + 2 * 4  # layer, final norm, LM head, 2 embedding rows
    assert cost.bytes_kv_read == 0


def test_decode_step_by_hand():
    c = decode_step_cost(TOY, 5, kv_bytes_per_element=1, bytes_per_param=1)
    layer = layer_flops(1, 6, 4, 2, 1, 2, 8)["total"]
    assert c.flops == layer + 2 * 4 * 10
    assert c.bytes_kv_read == 5 * 2 * 2 and c.bytes_kv_written == 2 * 2
    assert c.bytes == c.bytes_weights + c.bytes_activations + c.bytes_kv_read + c.bytes_kv_written


# ------------------------------------------------------------------------------------------------------ scaling
def test_prefill_attention_is_quadratic_and_projections_linear():
    d = TINY.decoder

    def parts(n):
        return layer_flops(n, n, d.dim, d.heads, d.kv_heads, d.head_dim, d.ffn_dim)

    for n in (10, 100, 1000):
        assert parts(2 * n)["projections"] == 2 * parts(n)["projections"]
        assert parts(2 * n)["ffn"] == 2 * parts(n)["ffn"]
        assert parts(2 * n)["attention"] / parts(n)["attention"] == pytest.approx(4, rel=1 / n)
    # the whole prefill: f(n) = a n + b n (n + 1) / 2 + head, so the second difference is constant and positive
    f = [prefill_cost(TINY, n, 0).flops for n in (100, 200, 300, 400)]
    second = [f[2] - 2 * f[1] + f[0], f[3] - 2 * f[2] + f[1]]
    assert second[0] == second[1] > 0
    assert second[0] == TINY.decoder.layers * 4 * d.heads * d.head_dim * 100**2  # 2*2*H*d_h * (100^2 / 2) * 2


def test_dropping_half_the_tokens_at_layer_k():
    spec = specs.LLAVA_15_7B
    d = spec.decoder
    n_visual, n_text, k = 576, 32, 2
    full = prefill_cost(spec, n_visual, n_text)
    total = n_visual + n_text
    kept = n_text + n_visual // 2  # FastV-style: half the visual tokens dropped after layer K
    layer_tokens = [total] * k + [kept] * (d.layers - k)
    dropped = prefill_cost(spec, n_visual, n_text, layer_tokens)

    def layer(t):
        return float(layer_flops(t, t, d.dim, d.heads, d.kv_heads, d.head_dim, d.ffn_dim)["total"])

    assert full.flops - dropped.flops == (d.layers - k) * (layer(total) - layer(kept))
    per_token_kv = 2 * d.kv_heads * d.head_dim * 2
    assert full.bytes_kv_written - dropped.bytes_kv_written == (d.layers - k) * (total - kept) * per_token_kv
    assert dropped.bytes_weights == full.bytes_weights  # every layer still runs
    ratio = dropped.flops / full.flops
    assert 0.5 < ratio < 0.6  # 30 of 32 layers at 320 / 608 tokens
    # the decode step after it reads the smaller caches
    after = forward_cost(spec, n_visual, n_text, 2, layer_tokens=layer_tokens)["decode"]
    assert after == decode_step_cost(spec, np.array(layer_tokens))


def test_decode_cost_is_the_sum_of_its_steps():
    for context, layers_run in ((17, None), (np.array([5, 9, 3, 0]), 3)):
        total = decode_cost(TINY, context, 6, layers_run, 1.0)
        steps = sum(decode_step_cost(TINY, np.add(context, j), layers_run, 1.0) for j in range(6))
        for field in ("flops", "bytes_weights", "bytes_activations", "bytes_kv_read", "bytes_kv_written"):
            assert getattr(total, field) == pytest.approx(getattr(steps, field), rel=1e-12)
    assert decode_cost(TINY, 5, 0) == Cost()


def test_decode_kv_bytes_and_early_exit():
    d = TINY.decoder
    full = decode_step_cost(TINY, 100, kv_bytes_per_element=4)
    assert full.bytes_kv_read == d.layers * 2 * d.kv_heads * d.head_dim * 4 * 100
    half = decode_step_cost(TINY, 100, kv_bytes_per_element=2)
    assert half.bytes_kv_read == full.bytes_kv_read / 2 and half.flops == full.flops
    early = decode_step_cost(TINY, 100, layers_run=2, kv_bytes_per_element=4)
    assert early.bytes_kv_read == full.bytes_kv_read / 2
    one_layer = layer_flops(1, 101, d.dim, d.heads, d.kv_heads, d.head_dim, d.ffn_dim)["total"]
    assert full.flops - early.flops == 2 * one_layer
    per_layer = decode_step_cost(TINY, [100, 100, 0, 0], kv_bytes_per_element=4)
    assert per_layer.bytes_kv_read == early.bytes_kv_read


def test_forward_cost_stages():
    costs = forward_cost(TINY, None, 6, 3)
    assert list(costs) == ["encoder", "connector", "prefill", "decode"]
    assert costs["prefill"] == prefill_cost(TINY, 144, 6)
    assert costs["decode"] == decode_step_cost(TINY, 150) + decode_step_cost(TINY, 151)
    assert forward_cost(TINY, None, 6, 1)["decode"] == Cost()
    two = forward_cost(TINY, None, 6, 1, n_images=2)
    assert two["prefill"] == prefill_cost(TINY, 288, 6) and two["encoder"].flops == 2 * costs["encoder"].flops


def test_published_prefill_flops():
    """The figures quoted in the docs; cross-checked against 2 FLOPs per non-embedding parameter per token."""
    llava = specs.LLAVA_15_7B
    pre = prefill_cost(llava, 576, 32)
    d = llava.decoder
    body = d.layers * memory._decoder_layer_params(d)
    attention = d.layers * 4 * d.dim * (608 * 609 / 2)
    assert pre.flops == pytest.approx(2 * body * 608 + attention + 2 * d.dim * d.vocab, rel=1e-3)
    assert pre.flops / 1e12 == pytest.approx(7.972, abs=1e-3)
    assert encoder_cost(llava).flops / 1e12 == pytest.approx(0.3819, abs=1e-4)
    assert prefill_cost(specs.QWEN2_VL_2B, 256, 32).flops / 1e12 == pytest.approx(0.7623, abs=1e-4)
    assert prefill_cost(specs.MOBILEVLM_1_7B, 144, 32).flops / 1e12 == pytest.approx(0.4373, abs=1e-4)
    # the merger runs its MLP on the 256 merged rows, the LDP on all 576 then convolves
    assert connector_cost(specs.QWEN2_VL_2B).flops == 2 * 256 * (5120 * 5120 + 5120 * 1536)
    assert connector_cost(specs.MOBILEVLM_1_7B).flops > 2 * 576 * (1024 * 2048 + 2048 * 2048)


# ------------------------------------------------------------------------------------------------------------- Cost
def test_cost_arithmetic():
    a, b = Cost(1, 2, 3, 4, 5), Cost(10, 20, 30, 40, 50)
    assert a + b == Cost(11, 22, 33, 44, 55) == sum([a, b])
    assert 2 * a == a * 2 == a + a
    assert (a + b).bytes == 22 + 33 + 44 + 55
    assert a.intensity == pytest.approx(1 / 14) and Cost(flops=3).intensity == float("inf")
    with pytest.raises(ValueError, match="Cost.flops"):
        Cost(flops=-1)
    with pytest.raises(TypeError, match="Cost.bytes_weights"):
        Cost(bytes_weights="1")
    with pytest.raises(TypeError):
        a + 1
    with pytest.raises(ValueError, match="k"):
        a * -1.0


# ---------------------------------------------------------------------------------------------------- the tables
def test_table1():
    t = complexity.table1(N=576, M=32, D=4096, K=32, E=8, r=0.25, r_rank=8)
    assert set(t) == set(complexity.TABLE1_MECHANISMS)
    kept = 0.25 * 576 + 32
    assert t["token_reduction"]["time"] == kept * 4096 + kept**2 * 4096  # both terms (deviation)
    assert t["token_reduction"]["space"] == kept**2
    assert t["unified_self_attention"] == {"time": 608**2 * 4096, "space": 608**2}
    assert t["dense_cross_attention"] == {"time": 32 * 576 * 4096, "space": 32 * 576}
    assert t["latent_query"] == {"time": 32 * 608 * 4096, "space": 32 * 608}
    assert t["linear_attention_ssm"] == {"time": 608 * 4096**2, "space": 4096**2}
    assert t["moe"] == {"time": 608 * 4096**2, "space": 8 * 4096**2}
    assert t["lora"] == {"time": 608 * 4096 * 8, "space": 4096 * 8}
    full = complexity.table1(576, 32, 4096, 32, 8, 1.0, 8)
    assert full["token_reduction"]["space"] == full["unified_self_attention"]["space"]
    b = complexity.intext_bounds(S=1024, D=64, window=128, r_rank=8, K=32)
    assert b["transformer"] == 1024**2 and b["window_attention"] == 1024 * 128 and b["probsparse"] == 1024 * 10
    assert b["ssm_memory"] == 1 and b["ssm_time"] == 1024


# -------------------------------------------------------------------------------------------------------- bad input
def test_bad_input_names_the_argument():
    cases = [
        (ValueError, "n_queries", lambda: layer_flops(-1, 3, 4, 2, 1, 2, 8)),
        (TypeError, "n_keys", lambda: layer_flops(1, 3.0, 4, 2, 1, 2, 8)),
        (ValueError, "n_keys", lambda: layer_flops(4, 3, 4, 2, 1, 2, 8)),
        (ValueError, "n_queries", lambda: layer_flops(np.ones(3, int), np.ones(4, int), 4, 2, 1, 2, 8)),
        (ValueError, "kv_heads", lambda: layer_flops(1, 3, 4, 2, 3, 2, 8)),
        (TypeError, "dim", lambda: layer_flops(1, 3, 4.0, 2, 1, 2, 8)),
        (TypeError, "causal", lambda: layer_flops(1, 3, 4, 2, 1, 2, 8, causal=1)),
        (TypeError, "spec", lambda: prefill_cost("llava", 10, 2)),
        (ValueError, "n_visual", lambda: prefill_cost(TINY, -1, 2)),
        (TypeError, "n_text", lambda: prefill_cost(TINY, 10, 2.5)),
        (ValueError, "n_text", lambda: prefill_cost(TINY, 0, 0)),
        (ValueError, "layer_tokens", lambda: prefill_cost(TINY, 10, 2, layer_tokens=[12, 12])),
        (ValueError, "layer_tokens", lambda: prefill_cost(TINY, 10, 2, layer_tokens=[13, 12, 12, 12])),
        (TypeError, "layer_tokens", lambda: prefill_cost(TINY, 10, 2, layer_tokens=[12.0] * 4)),
        (TypeError, "all_logits", lambda: prefill_cost(TINY, 10, 2, all_logits="yes")),
        (ValueError, "bytes_per_param", lambda: prefill_cost(TINY, 10, 2, bytes_per_param=0)),
        (ValueError, "kv_bytes_per_element", lambda: decode_step_cost(TINY, 10, kv_bytes_per_element=-2)),
        (ValueError, "context_len", lambda: decode_step_cost(TINY, -1)),
        (ValueError, "context_len", lambda: decode_step_cost(TINY, [1, 2])),
        (ValueError, "layers_run", lambda: decode_step_cost(TINY, 10, layers_run=5)),
        (ValueError, "layers_run", lambda: decode_step_cost(TINY, 10, layers_run=0)),
        (ValueError, "n_steps", lambda: decode_cost(TINY, 10, -1)),
        (ValueError, "n_images", lambda: encoder_cost(TINY, -1)),
        (TypeError, "n_images", lambda: connector_cost(TINY, 1.0)),
        (ValueError, "n_generated", lambda: forward_cost(TINY, None, 4, 0)),
        (ValueError, "r", lambda: complexity.table1(10, 10, 10, 1, 1, 1.5, 1)),
        (ValueError, "r", lambda: complexity.table1(10, 10, 10, 1, 1, 0.0, 1)),
        (ValueError, "N", lambda: complexity.table1(-1, 10, 10, 1, 1, 0.5, 1)),
        (TypeError, "D", lambda: complexity.table1(1, 10, 10.0, 1, 1, 0.5, 1)),
        (ValueError, "window", lambda: complexity.intext_bounds(10, 4, 0, 1, 1)),
    ]
    for exc, name, call in cases:
        with pytest.raises(exc, match=rf"(?<!\w){name}(?!\w)"):
            call()


# ------------------------------------------------------------------------------------------------ properties
@given(st.integers(0, 2000), st.integers(1, 200), st.integers(0, 3))
def test_prefill_grows_with_every_token(n_visual, n_text, k):
    base = prefill_cost(TINY, n_visual, n_text)
    more = prefill_cost(TINY, n_visual + 1, n_text)
    assert more.flops > base.flops and more.bytes_kv_written > base.bytes_kv_written
    # dropping tokens at layer k never costs more than keeping them
    total = n_visual + n_text
    kept = [total] * k + [max(1, total // 2)] * (4 - k)
    assert prefill_cost(TINY, n_visual, n_text, kept).flops <= base.flops


@given(st.integers(0, 10**6), st.integers(1, 4), st.sampled_from([0.5, 1.0, 2.0]))
def test_decode_step_grows_with_context_and_layers(context, layers_run, kvb):
    c = decode_step_cost(TINY, context, layers_run, kvb)
    assert decode_step_cost(TINY, context + 1, layers_run, kvb).flops > c.flops
    assert decode_step_cost(TINY, context + 1, layers_run, kvb).bytes_kv_read > c.bytes_kv_read
    if layers_run < 4:
        assert decode_step_cost(TINY, context, layers_run + 1, kvb).bytes > c.bytes


@given(st.integers(0, 5000), st.integers(0, 5000), st.booleans())
def test_layer_flops_monotone(nq, extra, causal):
    a = layer_flops(nq, nq + extra, 64, 4, 2, 16, 128, causal=causal)["total"]
    assert layer_flops(nq + 1, nq + extra + 1, 64, 4, 2, 16, 128, causal=causal)["total"] > a
    assert layer_flops(nq, nq + extra + 1, 64, 4, 2, 16, 128, causal=causal)["total"] >= a
