"""A known-wrong submission: the heads are split with reshape(T, d, num_heads), so head h takes every
num_heads-th column instead of a contiguous block of d columns. Right with one head only."""

import numpy as np


def _split(x, num_heads):
    t, h = x.shape
    return x.reshape(t, h // num_heads, num_heads).transpose(2, 0, 1)  # should be reshape(t, num_heads, d)


def multi_head_attention(q, k, v, num_heads, key_mask=None):
    nq, h = q.shape
    qh, kh, vh = _split(q, num_heads), _split(k, num_heads), _split(v, num_heads)
    d = h // num_heads
    s = qh @ kh.transpose(0, 2, 1) / np.sqrt(d)
    if key_mask is not None:
        s = np.where(key_mask[None, None, :], s, -np.inf)
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    w = e / e.sum(axis=-1, keepdims=True)
    return (w @ vh).transpose(1, 2, 0).reshape(nq, h).astype(q.dtype)  # the inverse of the wrong split


def cross_attention_block(query_states, image_embeds, weights, num_heads, eps=1e-12, image_mask=None):
    def lin(x, name):
        return x @ weights[name + ".weight"].T + weights[name + ".bias"]

    c = multi_head_attention(
        lin(query_states, "attention.query"), lin(image_embeds, "attention.key"), lin(image_embeds, "attention.value"),
        num_heads, image_mask,
    )
    x = lin(c, "output.dense") + query_states
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps) * weights["output.LayerNorm.weight"] + weights["output.LayerNorm.bias"]
    return y.astype(query_states.dtype)
