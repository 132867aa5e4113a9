"""Known-wrong: the decode step attends over the OLD cache and never appends the new key/value to it, so the new
token cannot see itself (and the first step sees nothing at all)."""

import numpy as np


def _attend(q, k, v):
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    s = (q @ k.swapaxes(-1, -2)) / np.sqrt(q.shape[-1]).astype(q.dtype)
    if s.shape[-1] == 0:
        return np.zeros(q.shape[:3] + (v.shape[-1],), dtype=q.dtype)
    w = np.exp(s - s.max(axis=-1, keepdims=True))
    return (w / w.sum(axis=-1, keepdims=True)) @ v


def decode_step(cache_k, cache_v, q_new, k_new, v_new):
    out = _attend(q_new, cache_k, cache_v)  # the bug: k_new / v_new are never appended
    return out, cache_k, cache_v


def decode(q_steps, k_steps, v_steps):
    b, hkv, t, d = k_steps.shape
    cache_k = np.zeros((b, hkv, 0, d), dtype=k_steps.dtype)
    cache_v = np.zeros((b, hkv, 0, v_steps.shape[-1]), dtype=v_steps.dtype)
    outs = []
    for i in range(t):
        out, cache_k, cache_v = decode_step(cache_k, cache_v, q_steps[:, :, i : i + 1], k_steps[:, :, i : i + 1], v_steps[:, :, i : i + 1])
        outs.append(out)
    return np.concatenate(outs, axis=2)
