"""Memory footprint: weights plus the KV cache, and the longest context that fits a memory budget.

Survey: the edge-MLLM survey (001_ff7ff3c1b032d9c6.txt), Eq. (2), refs [65][66]; `system.memory` in the
inventory (F3)::

    M_total = M_params + sigma * L * H * d_h * S * B
    sigma   = 2 * (bytes per KV element)            (a key and a value per layer, head and token)
    S_max   = floor((M_budget - M_params) / (sigma * L * H * d_h * B))

with M_params = parameters x bytes per parameter, L layers, H key/value heads (under grouped-query attention only
the KV heads are cached), d_h the head size, S cached tokens (visual and text), B the batch.

Shapes: ``seq_len`` may be an int array; the result has its shape.

Deviations from the paper: Eq. (2) is an image missing from the survey's text (and reuses L for latency); this
is the standard form its words describe, with sigma made explicit as 2 x bytes per element.
"""

from __future__ import annotations

import numpy as np

from mllm_ref import _checks
from mllm_ref.oracle.registry import Technique, register

__all__ = ["kv_cache_bytes", "memory_footprint", "max_context"]


def kv_cache_bytes(layers, kv_heads, head_dim, seq_len, batch=1, kv_bytes_per_element=2.0):
    """Bytes of the KV cache: ``2 * bytes * L * H * d_h * S * B``."""
    layers = _checks.integer(layers, "layers", low=1)
    kv_heads = _checks.integer(kv_heads, "kv_heads", low=1)
    head_dim = _checks.integer(head_dim, "head_dim", low=1)
    batch = _checks.integer(batch, "batch", low=1)
    kvb = _checks.real(kv_bytes_per_element, "kv_bytes_per_element", low=0.0, low_open=True, high=64.0)
    if np.isscalar(seq_len):
        s = _checks.integer(seq_len, "seq_len", low=0)
    else:
        s = _checks.int_array(seq_len, "seq_len", low=0).astype(np.float64)
    return 2.0 * kvb * layers * kv_heads * head_dim * s * batch


def memory_footprint(
    n_params, bytes_per_param, layers, kv_heads, head_dim, seq_len, batch=1, kv_bytes_per_element=2.0
):
    """Total bytes: weights plus the KV cache of ``seq_len`` tokens (an int or an int array)."""
    n_params = _checks.integer(n_params, "n_params", low=0)
    bpp = _checks.real(bytes_per_param, "bytes_per_param", low=0.0, low_open=True, high=64.0)
    return n_params * bpp + kv_cache_bytes(layers, kv_heads, head_dim, seq_len, batch, kv_bytes_per_element)


def max_context(memory_budget, n_params, bytes_per_param, layers, kv_heads, head_dim, batch=1, kv_bytes_per_element=2.0) -> int:
    """The largest number of cached tokens whose footprint fits ``memory_budget`` bytes.

    Raises ``ValueError`` when the weights alone exceed the budget (no context fits at all).
    """
    budget = _checks.real(memory_budget, "memory_budget", low=0.0)
    weights = memory_footprint(n_params, bytes_per_param, layers, kv_heads, head_dim, 0, batch, kv_bytes_per_element)
    if weights > budget:
        raise ValueError(
            f"memory_budget ({budget:.4g} bytes) is smaller than the weights alone ({weights:.4g} bytes)"
        )
    per_token = kv_cache_bytes(layers, kv_heads, head_dim, 1, batch, kv_bytes_per_element)
    return int((budget - weights) // per_token)


def _case(size: str, rng: np.random.Generator) -> dict:
    return {
        "n_params": int(rng.integers(10**6, 10**10)),
        "bytes_per_param": float(rng.choice([0.5, 1.0, 2.0])),
        "layers": int(rng.integers(1, 80)),
        "kv_heads": int(rng.choice([1, 2, 8, 32])),
        "head_dim": int(rng.choice([64, 128])),
        "seq_len": rng.integers(0, 32768, 9),
        "batch": int(rng.integers(1, 8)),
        "kv_bytes_per_element": float(rng.choice([0.5, 1.0, 2.0])),
    }


register(
    Technique(
        id="system.memory",
        reference=memory_footprint,
        make_case=_case,
        paper="Edge-MLLM survey (001_ff7ff3c1b032d9c6.txt) Eq. (2), refs [65][66]",
        test_sizes=("a", "b"),
    )
)
