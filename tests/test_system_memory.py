"""Memory (``system.memory``): weights + KV cache, the longest context that fits, model-level helpers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mllm_ref.system import memory, specs
from mllm_ref.system.memory import kv_cache_bytes, max_context, memory_footprint

ARGS = dict(n_params=10**9, bytes_per_param=2, layers=24, kv_heads=4, head_dim=64)


def test_footprint_by_hand():
    # 1000 params in fp16 + 2 (K and V) x 2 bytes x 3 layers x 2 heads x 4 dims x 10 tokens x 2 sequences
    assert memory_footprint(1000, 2, 3, 2, 4, 10, batch=2) == 2000 + 2 * 2 * 3 * 2 * 4 * 10 * 2
    assert kv_cache_bytes(3, 2, 4, 10, batch=2, kv_bytes_per_element=0.5) == 2 * 0.5 * 3 * 2 * 4 * 10 * 2
    out = memory_footprint(1000, 0.5, 3, 2, 4, np.array([0, 1, 10]))
    np.testing.assert_array_equal(out, 500 + 2 * 2 * 3 * 2 * 4 * np.array([0, 1, 10]))
    assert out.dtype == np.float64


def test_llava_kv_cache():
    d = specs.LLAVA_15_7B.decoder
    # 0.5 MiB per token in fp16 (2 x 2 bytes x 32 layers x 32 heads x 128): 608 tokens = 304 MiB
    assert kv_cache_bytes(d.layers, d.kv_heads, d.head_dim, 1) == 2**19
    assert memory.model_memory(specs.LLAVA_15_7B, 608) == 2 * 7_062_902_784 + 608 * 2**19
    # grouped-query attention: Qwen2-VL-2B caches 2 of 12 heads, 28 KiB per token
    q = specs.QWEN2_VL_2B.decoder
    assert kv_cache_bytes(q.layers, q.kv_heads, q.head_dim, 1) == 28 * 1024


@given(st.integers(0, 100_000), st.sampled_from([0.5, 1.0, 2.0]), st.integers(1, 8))
def test_linear_in_context_and_kv_bytes(s, kvb, batch):
    weights = memory_footprint(seq_len=0, kv_bytes_per_element=kvb, batch=batch, **ARGS)
    one = memory_footprint(seq_len=1, kv_bytes_per_element=kvb, batch=batch, **ARGS) - weights
    assert memory_footprint(seq_len=s, kv_bytes_per_element=kvb, batch=batch, **ARGS) == weights + s * one
    half = kv_cache_bytes(24, 4, 64, s, batch, kv_bytes_per_element=kvb / 2)
    assert half == kv_cache_bytes(24, 4, 64, s, batch, kv_bytes_per_element=kvb) / 2
    assert kv_cache_bytes(24, 4, 64, s, 2 * batch, kvb) == 2 * kv_cache_bytes(24, 4, 64, s, batch, kvb)


@given(st.floats(2e9, 1e12), st.sampled_from([0.5, 1.0, 2.0]), st.integers(1, 4))
def test_max_context_inverts_the_footprint(budget, kvb, batch):
    kw = dict(ARGS, batch=batch, kv_bytes_per_element=kvb)
    s = max_context(budget, **kw)
    assert memory_footprint(seq_len=s, **kw) <= budget < memory_footprint(seq_len=s + 1, **kw)


@given(st.integers(0, 10**7))
def test_max_context_is_exact_at_the_boundary(s):
    budget = memory_footprint(seq_len=s, **ARGS)
    assert max_context(budget, **ARGS) == s
    assert max_context(budget - 1, **ARGS) == s - 1 if s else True


def test_max_context_when_the_weights_barely_fit():
    weights = memory_footprint(seq_len=0, **ARGS)
    assert max_context(weights, **ARGS) == 0
    assert max_context(int(weights), **ARGS) == 0  # an int budget
    with pytest.raises(ValueError, match="memory_budget"):
        max_context(weights - 1, **ARGS)
    # LLaVA-1.5-7B in fp16 on a 16 GiB device: 14.1 GB of weights, 0.5 MiB per token
    s = memory.model_max_context(specs.LLAVA_15_7B, 16 * 2**30)
    assert s == (16 * 2**30 - 2 * 7_062_902_784) // 2**19
    assert memory.model_max_context(specs.LLAVA_15_7B, 16 * 2**30, kv_bytes_per_element=1) in (2 * s, 2 * s + 1)
    with pytest.raises(ValueError, match="memory_budget"):
        memory.model_max_context(specs.LLAVA_15_7B, 8 * 2**30)
    assert memory.model_max_context(specs.LLAVA_15_7B, 8 * 2**30, bytes_per_param=0.5) > 0  # int4 weights


def test_bad_input_names_the_argument():
    cases = [
        (ValueError, "seq_len", lambda: memory_footprint(10, 2, 1, 1, 1, -1)),
        (ValueError, "seq_len", lambda: memory_footprint(10, 2, 1, 1, 1, np.array([3, -1]))),
        (TypeError, "seq_len", lambda: memory_footprint(10, 2, 1, 1, 1, 3.0)),
        (TypeError, "seq_len", lambda: memory_footprint(10, 2, 1, 1, 1, np.array([3.0]))),
        (TypeError, "layers", lambda: kv_cache_bytes(1.5, 1, 1, 1)),
        (ValueError, "kv_heads", lambda: kv_cache_bytes(1, 0, 1, 1)),
        (TypeError, "head_dim", lambda: kv_cache_bytes(1, 1, "64", 1)),
        (ValueError, "batch", lambda: kv_cache_bytes(1, 1, 1, 1, batch=0)),
        (ValueError, "kv_bytes_per_element", lambda: kv_cache_bytes(1, 1, 1, 1, kv_bytes_per_element=0)),
        (ValueError, "kv_bytes_per_element", lambda: kv_cache_bytes(1, 1, 1, 1, kv_bytes_per_element=16 * 8)),
        (ValueError, "n_params", lambda: memory_footprint(-1, 2, 1, 1, 1, 1)),
        (TypeError, "n_params", lambda: memory_footprint(7e9, 2, 1, 1, 1, 1)),
        (ValueError, "bytes_per_param", lambda: memory_footprint(10, float("inf"), 1, 1, 1, 1)),
        (TypeError, "bytes_per_param", lambda: memory_footprint(10, None, 1, 1, 1, 1)),
        (ValueError, "memory_budget", lambda: max_context(-1.0, 10, 2, 1, 1, 1)),
        (ValueError, "memory_budget", lambda: max_context(1e9, 10**9, 2, 1, 1, 1)),
        (TypeError, "memory_budget", lambda: max_context("1e9", 10, 2, 1, 1, 1)),
        (TypeError, "spec", lambda: memory.model_memory(None, 10)),
    ]
    for exc, name, call in cases:
        with pytest.raises(exc, match=rf"(?<!\w){name}(?!\w)"):
            call()


@given(st.integers(0, 10**6), st.integers(0, 10**6))
def test_footprint_monotone(a, b):
    lo, hi = sorted((a, b))
    assert memory_footprint(seq_len=lo, **ARGS) <= memory_footprint(seq_len=hi, **ARGS)
    budget = 2.5e9
    assert max_context(budget, **ARGS) <= max_context(budget + hi, **ARGS)
