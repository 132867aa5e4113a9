"""A known-wrong submission: the exit is right, but the copied keys are not rotated to the token's position."""

import numpy as np


def margin_exit_layer(logits, threshold, min_layer):
    z = logits - logits.max(axis=-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
    top = np.sort(p, axis=-1)
    margin = top[:, -1] - (top[:, -2] if p.shape[1] > 1 else 0.0)
    for layer in range(min(min_layer, p.shape[0] - 1), p.shape[0]):
        if margin[layer] >= threshold:
            return layer
    return p.shape[0] - 1


def copy_kv(hidden, norm_weight, k_weight, v_weight, position, kv_heads, theta, eps):
    x = hidden / np.sqrt(np.mean(hidden.astype(np.float64) ** 2) + eps)
    ks, vs = [], []
    for j in range(norm_weight.shape[0]):
        h = (x * norm_weight[j]).astype(hidden.dtype)
        ks.append((h @ k_weight[j].T).reshape(kv_heads, -1))  # wrong: RoPE forgotten
        vs.append((h @ v_weight[j].T).reshape(kv_heads, -1))
    return np.stack(ks), np.stack(vs)
