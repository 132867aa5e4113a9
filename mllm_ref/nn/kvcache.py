"""The key/value cache of autoregressive decoding, as an immutable value.

Paper: caching past keys and values is how every Transformer decoder since Vaswani et al., "Attention Is All You
Need", NeurIPS 2017 (arXiv:1706.03762), generates in O(T) per token; see also Reiner Pope et al., "Efficiently
Scaling Transformer Inference", MLSys 2023 (arXiv:2211.05102), for its memory cost.

Equations. After t steps the cache holds ``k[:, :, :t]`` and ``v[:, :, :t]``; one decoding step appends the new
token's key and value and attends over all of them::

    cache' = append(cache, k_new, v_new)
    out    = attention(q_new, cache'.k, cache'.v, causal=True)       (mllm_ref.nn.attention)

The cache is a frozen value: :func:`append` returns a new cache and never modifies its input (state is passed in
and returned, never hidden). Appending copies the cache (O(T) per step); a paged or preallocated cache is a
technique of its own.

Shape legend:
    B batch, Hkv key/value heads, T cached tokens (0 for an empty cache), d key head dimension, dv value head
    dimension. k: ``[B, Hkv, T, d]``, v: ``[B, Hkv, T, dv]``, k_new: ``[B, Hkv, t, d]``, v_new: ``[B, Hkv, t, dv]``.

Deviations from the paper: none.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mllm_ref import _checks

__all__ = ["KVCache", "empty_cache", "append"]


@dataclass(frozen=True, eq=False)
class KVCache:
    """Cached keys ``k[B, Hkv, T, d]`` and values ``v[B, Hkv, T, dv]`` (same dtype); ``len(cache)`` is T."""

    k: np.ndarray
    v: np.ndarray

    def __post_init__(self):
        k = _checks.float_array(self.k, "k", ndim=4, allow_empty=True)
        v = _checks.float_array(self.v, "v", ndim=4, allow_empty=True)
        _checks.same_dtype("k", k, "v", v)
        for axis, what in ((0, "the batch size of k"), (1, "the kv heads of k"), (2, "the cached tokens of k")):
            _checks.dim("v", v, axis, k.shape[axis], what)

    def __len__(self) -> int:
        return int(self.k.shape[2])

    @property
    def batch(self) -> int:
        return int(self.k.shape[0])

    @property
    def kv_heads(self) -> int:
        return int(self.k.shape[1])

    @property
    def head_dim(self) -> int:
        return int(self.k.shape[3])

    @property
    def value_dim(self) -> int:
        return int(self.v.shape[3])

    @property
    def dtype(self) -> np.dtype:
        return self.k.dtype

    @property
    def nbytes(self) -> int:
        """Bytes held by the keys and values."""
        return int(self.k.nbytes + self.v.nbytes)


def empty_cache(batch: int, kv_heads: int, head_dim: int, value_dim: int | None = None, dtype=np.float32) -> KVCache:
    """An empty cache (T = 0) for ``batch`` sequences, ``kv_heads`` heads, key size ``head_dim``.

    Args:
        batch, kv_heads, head_dim: >= 1.
        value_dim: value head size (default ``head_dim``).
        dtype: float16, float32 or float64.
    """
    batch = _checks.integer(batch, "batch", low=1)
    kv_heads = _checks.integer(kv_heads, "kv_heads", low=1)
    head_dim = _checks.integer(head_dim, "head_dim", low=1)
    value_dim = head_dim if value_dim is None else _checks.integer(value_dim, "value_dim", low=1)
    try:
        dtype = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"dtype must be a NumPy float dtype, got {dtype!r}") from exc
    if dtype.type not in _checks.FLOAT_DTYPES:
        raise TypeError(f"dtype must be float16, float32 or float64, got {dtype}")
    return KVCache(
        np.zeros((batch, kv_heads, 0, head_dim), dtype=dtype),
        np.zeros((batch, kv_heads, 0, value_dim), dtype=dtype),
    )


def append(cache: KVCache, k_new: np.ndarray, v_new: np.ndarray) -> KVCache:
    """A new cache with ``k_new[B, Hkv, t, d]`` / ``v_new[B, Hkv, t, dv]`` appended on the token axis.

    The input cache is not modified.
    """
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
    k_new = _checks.float_array(k_new, "k_new", ndim=4)
    v_new = _checks.float_array(v_new, "v_new", ndim=4)
    _checks.same_dtype("cache.k", cache.k, "k_new", k_new)
    _checks.same_dtype("cache.k", cache.k, "v_new", v_new)
    for axis, what in ((0, "the cache's batch size"), (1, "the cache's kv heads"), (3, "the cache's head_dim")):
        _checks.dim("k_new", k_new, axis, cache.k.shape[axis], what)
    for axis, what in ((0, "the cache's batch size"), (1, "the cache's kv heads"), (3, "the cache's value_dim")):
        _checks.dim("v_new", v_new, axis, cache.v.shape[axis], what)
    _checks.dim("v_new", v_new, 2, k_new.shape[2], "the new tokens of k_new")
    return KVCache(np.concatenate([cache.k, k_new], axis=2), np.concatenate([cache.v, v_new], axis=2))
