"""Bytes of the tiny VLM's KV cache under a KV policy, measured and by formula (not a technique).

Two ways to know how much memory a cache takes:

- **measured**: run a policy's :meth:`~mllm_ref.tinyvlm.plugs.KVPolicy.store` (and :meth:`extend` for decode
  steps) on keys and values of the model's shapes and add up :meth:`nbytes` over the layers: the bytes the cache
  value really holds (codes, scales, zero points, full-precision windows, codebooks, whole pages);
- **formula**: :func:`mllm_ref.system.memory.kv_cache_bytes`, ``2 * b_kv * L * H_kv * d_h * S``, the survey's
  memory formula, with ``S`` the tokens the cache holds and ``b_kv`` the bytes per element.

For the plain float32 cache the two agree to the byte (``b_kv = 4``). For a compressed cache the formula's
``b_kv`` is the *effective* bytes per element, which :func:`effective_bytes_per_element` reads back from the
measurement; the chapter plots both against the context length.

The keys and values fed to a policy here are random (seeded): byte counts do not depend on the values, and a
policy that needs attention weights gets causal softmax rows of random logits. Eviction policies that choose by
attention keep their budget whatever the weights are.
"""

from __future__ import annotations

import numpy as np

from mllm_ref import _checks
from mllm_ref.system.memory import kv_cache_bytes
from mllm_ref.tinyvlm.plugs import KVPolicy, PromptInfo
from mllm_ref.tinyvlm.model import positions_for

__all__ = ["measured_bytes", "formula_bytes", "effective_bytes_per_element"]


def _causal_weights(rng: np.random.Generator, heads: int, t: int) -> np.ndarray:
    logits = rng.standard_normal((heads, t, t))
    logits = np.where(np.tril(np.ones((t, t), dtype=bool)), logits, -np.inf)
    w = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (w / w.sum(axis=-1, keepdims=True)).astype(np.float32)


def measured_bytes(policy: KVPolicy, config, context: int, *, n_visual: int = 144, decode_steps: int = 0,
                   seed: int = 0) -> int:  # fmt: skip
    """Bytes a policy's caches hold over all decoder layers after a prefill of ``context`` tokens.

    Args:
        policy: the KV policy.
        config: a :class:`~mllm_ref.tinyvlm.config.TinyVLMConfig` (layers, kv_heads, head_dim, heads).
        context: tokens in the prefill (>= 2): ``min(n_visual, context - 1)`` visual tokens first, the text after.
        decode_steps: decode steps appended after the prefill (>= 0).
        seed: seed of the random keys, values and attention weights.
    """
    if not isinstance(policy, KVPolicy):
        raise TypeError(f"policy must be a KVPolicy, got {type(policy).__name__}")
    context = _checks.integer(context, "context", low=2)
    n_visual = _checks.integer(n_visual, "n_visual", low=0)
    decode_steps = _checks.integer(decode_steps, "decode_steps", low=0)
    rng = np.random.default_rng(seed)
    nv = min(n_visual, context - 1)
    n_text = context - nv
    positions = positions_for(nv, n_text)
    info = PromptInfo(nv, (config.grid, config.grid), np.arange(nv), np.zeros(n_text, dtype=np.int64))
    hkv, d, h = config.kv_heads, config.head_dim, config.heads
    total = 0
    for layer in range(config.layers):
        k = rng.standard_normal((hkv, context, d)).astype(np.float32)
        v = rng.standard_normal((hkv, context, d)).astype(np.float32)
        attn = _causal_weights(rng, h, context) if policy.needs_attention(layer) else None
        cache = policy.store(layer, k, v, attn, info, positions=positions, n_visual=nv)
        for step in range(decode_steps):
            s = policy.length(layer, cache)
            k1 = rng.standard_normal((hkv, 1, d)).astype(np.float32)
            v1 = rng.standard_normal((hkv, 1, d)).astype(np.float32)
            a1 = None
            if policy.needs_attention(layer):
                logits = rng.standard_normal((h, 1, s + 1))
                a1 = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
            cache = policy.extend(layer, cache, k1, v1, a1, position=int(n_text + 1 + step))
        total += int(policy.nbytes(cache))
    return total


def formula_bytes(config, tokens: int, kv_bytes_per_element: float = 4.0) -> float:
    """The survey's formula for the tiny VLM's decoder: ``2 * b_kv * L * H_kv * d_h * tokens``."""
    return kv_cache_bytes(config.layers, config.kv_heads, config.head_dim, tokens, 1, kv_bytes_per_element)


def effective_bytes_per_element(policy: KVPolicy, config, context: int, **kwargs) -> float:
    """``b_kv`` that makes the formula equal the measured bytes: the measured bytes over ``2 * L * H_kv * d_h * S``
    with ``S`` the tokens a plain cache would hold (``context`` plus the decode steps)."""
    measured = measured_bytes(policy, config, context, **kwargs)
    return measured / formula_bytes(config, context + kwargs.get("decode_steps", 0), 1.0)
