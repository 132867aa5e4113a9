"""The cost model: FLOP and byte counts, latency, memory, published configurations."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mllm_ref.system import complexity, latency, memory, specs
from mllm_ref.system.complexity import Cost, decode_step_cost, prefill_cost
from mllm_ref.tinyvlm.config import TinyVLMConfig

TINY = specs.spec_from_tinyvlm(TinyVLMConfig())


@pytest.mark.parametrize(
    "spec, billions",
    [(specs.LLAVA_15_7B, 7.06), (specs.QWEN2_VL_2B, 2.21), (specs.MOBILEVLM_17B, 1.7)],
    ids=["llava", "qwen2vl", "mobilevlm"],
)
def test_published_parameter_counts(spec, billions):
    assert complexity.param_count(spec)["total"] / 1e9 == pytest.approx(billions, rel=0.03)


def test_llava_parts():
    pc = complexity.param_count(specs.LLAVA_15_7B)
    assert pc["vision"] / 1e6 == pytest.approx(304, rel=0.02)  # CLIP ViT-L/14-336
    assert pc["connector"] / 1e6 == pytest.approx(21, rel=0.03)
    assert pc["decoder"] / 1e9 == pytest.approx(6.74, rel=0.01)  # LLaMA-2-7B


def test_tiny_vlm_parameter_count_matches_the_weights():
    torch = pytest.importorskip("torch")
    from kernels_torch.tinyvlm.model import TinyVLM, param_count

    assert complexity.param_count(TINY)["total"] == param_count(TinyVLM(TinyVLMConfig()))


def test_linear_flops_by_hand():
    # one layer, 1 head of 4, no GQA, tiny FFN: count every term by hand
    d = specs.DecoderSpec(layers=1, dim=4, heads=1, kv_heads=1, head_dim=4, ffn_dim=8, vocab=10)
    spec = specs.ModelSpec("toy", TINY.vision, TINY.connector, d)
    t = 3
    proj = 2 * t * (4 * 4 + 2 * 4 * 4 + 4 * 4)
    attn = 2 * 2 * 1 * 4 * (1 + 2 + 3)
    ffn = 3 * 2 * t * 4 * 8
    head = 2 * 4 * 10
    assert prefill_cost(spec, 1, 2).flops == proj + attn + ffn + head


def test_prefill_attention_term_is_quadratic_and_projections_linear():
    d = TINY.decoder
    f = lambda n: prefill_cost(TINY, n, 0).flops - 2 * d.dim * d.vocab
    # f(n) = a n + b n (n + 1) / 2: the second difference is constant
    second = f(300) - 2 * f(200) + f(100)
    assert second == pytest.approx(f(400) - 2 * f(300) + f(200))
    assert second > 0


def test_dropping_tokens_at_layer_k_saves_the_expected_flops():
    n, text = 144, 8
    full = prefill_cost(TINY, n, text)
    kept = (n + text) // 2
    dropped = prefill_cost(TINY, n, text, layer_tokens=[n + text, n + text, kept, kept])
    per_layer = lambda t: complexity._layer_flops(TINY.decoder, t, t * (t + 1) / 2)
    assert full.flops - dropped.flops == pytest.approx(2 * (per_layer(n + text) - per_layer(kept)))
    assert dropped.kv_write_bytes < full.kv_write_bytes


def test_decode_step_reads_the_whole_cache():
    d = TINY.decoder
    c = decode_step_cost(TINY, 100, kv_bytes_per_element=4)
    assert c.kv_read_bytes == d.layers * 2 * d.kv_heads * d.head_dim * 4 * 100
    half = decode_step_cost(TINY, 100, kv_bytes_per_element=2)
    assert half.kv_read_bytes == c.kv_read_bytes / 2
    early = decode_step_cost(TINY, 100, layers_run=2, kv_bytes_per_element=4)
    assert early.kv_read_bytes == c.kv_read_bytes / 2 and early.flops < c.flops


def test_cost_adds_and_has_an_intensity():
    a, b = Cost(1, 2, 3, 4), Cost(10, 20, 30, 40)
    assert (a + b) == Cost(11, 22, 33, 44)
    assert (a + b).bytes == 99 and a.intensity == pytest.approx(1 / 9)


def test_table1_token_reduction_has_both_terms():
    t = complexity.table1(n=576, m=32, d=4096, k=32, e=8, r=0.25, r_rank=8)
    kept = 0.25 * 576 + 32
    assert t["token_reduction"]["time"] == kept * 4096 + kept**2 * 4096
    assert t["token_reduction"]["space"] < t["unified_self_attention"]["space"]
    assert t["latent_query"]["time"] == 32 * 608 * 4096


def test_latency_conventions():
    ttft, tpot, n = np.array([0.5]), np.array([0.1]), np.array([11])
    assert latency.latency(ttft, tpot, n)[0] == pytest.approx(1.5)
    assert latency.latency(ttft, tpot, n, convention="n")[0] == pytest.approx(1.6)
    assert latency.tokens_per_second(np.array([0.05]))[0] == pytest.approx(20)
    assert latency.prefill_share(ttft, tpot, n)[0] == pytest.approx(0.5 / 1.5)


def test_stage_time_is_the_roofline():
    c = Cost(flops=1e12, weight_bytes=1e9)
    assert latency.stage_time(c, peak_flops=1e14, bandwidth=1e10) == pytest.approx(0.1)  # memory-bound
    assert latency.stage_time(c, peak_flops=1e12, bandwidth=1e12) == pytest.approx(1.0)  # compute-bound


@given(st.integers(0, 100_000), st.sampled_from([0.5, 1.0, 2.0]))
def test_memory_is_linear_in_the_context_and_in_kv_bytes(s, kvb):
    args = dict(n_params=10**9, bytes_per_param=2, layers=32, kv_heads=8, head_dim=128)
    weights = memory.memory_footprint(seq_len=0, kv_bytes_per_element=kvb, **args)
    one = memory.memory_footprint(seq_len=1, kv_bytes_per_element=kvb, **args) - weights
    assert memory.memory_footprint(seq_len=s, kv_bytes_per_element=kvb, **args) == pytest.approx(weights + s * one)
    half = memory.kv_cache_bytes(32, 8, 128, s, kv_bytes_per_element=kvb / 2)
    assert half == pytest.approx(memory.kv_cache_bytes(32, 8, 128, s, kv_bytes_per_element=kvb) / 2)


@given(st.floats(2e9, 1e11))
def test_max_context_inverts_the_footprint(budget):
    args = dict(n_params=10**9, bytes_per_param=2, layers=24, kv_heads=4, head_dim=64)
    s = memory.max_context(budget, **args)
    assert memory.memory_footprint(seq_len=s, **args) <= budget < memory.memory_footprint(seq_len=s + 1, **args)


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="memory_budget"):
        memory.max_context(1e9, 10**9, 2, 1, 1, 1)
    with pytest.raises(ValueError, match="seq_len"):
        memory.memory_footprint(10, 2, 1, 1, 1, -1)
    with pytest.raises(TypeError, match="layers"):
        memory.kv_cache_bytes(1.5, 1, 1, 1)
    with pytest.raises(ValueError, match="convention"):
        latency.latency(np.array([1.0]), np.array([1.0]), np.array([1]), convention="n+1")
    with pytest.raises(ValueError, match="ttft"):
        latency.latency(np.array([-1.0]), np.array([1.0]), np.array([1]))
    with pytest.raises(ValueError, match="layer_tokens"):
        prefill_cost(TINY, 10, 2, layer_tokens=[12, 12])
    with pytest.raises(ValueError, match="layer_tokens"):
        prefill_cost(TINY, 10, 2, layer_tokens=[13, 12, 12, 12])
    with pytest.raises(TypeError, match="spec"):
        prefill_cost("llava", 10, 2)
    with pytest.raises(ValueError, match="r"):
        complexity.table1(10, 10, 10, 1, 1, 1.5, 1)
    with pytest.raises(ValueError, match="resolution"):
        specs.qwen2_vl_at(450)
