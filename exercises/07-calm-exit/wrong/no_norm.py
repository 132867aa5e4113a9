"""A known-wrong submission: the skipped layers' projections read the raw hidden state, without their RMSNorm."""

import numpy as np


def margin_exit_layer(logits, threshold, min_layer):
    z = logits - logits.max(axis=-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
    top = np.sort(p, axis=-1)
    margin = top[:, -1] - (top[:, -2] if p.shape[1] > 1 else 0.0)
    hits = [l for l in range(min(min_layer, p.shape[0] - 1), p.shape[0]) if margin[l] >= threshold]
    return hits[0] if hits else p.shape[0] - 1


def _rope(x, position, theta):
    d = x.shape[-1]
    inv = theta ** (-np.arange(0, d // 2) * 2.0 / d)
    ang = position * inv
    c, s = np.cos(ang).astype(x.dtype), np.sin(ang).astype(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def copy_kv(hidden, norm_weight, k_weight, v_weight, position, kv_heads, theta, eps):
    ks, vs = [], []
    for j in range(norm_weight.shape[0]):
        h = hidden  # wrong: each layer's RMSNorm is skipped
        ks.append(_rope((h @ k_weight[j].T).reshape(kv_heads, -1), position, theta))
        vs.append((h @ v_weight[j].T).reshape(kv_heads, -1))
    return np.stack(ks), np.stack(vs)
