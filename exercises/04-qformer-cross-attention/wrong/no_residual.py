"""A known-wrong submission: the cross-attention block forgets the residual connection, normalising
dense(attention) alone instead of query_states + dense(attention). The attention itself is right."""

import numpy as np


def multi_head_attention(q, k, v, num_heads, key_mask=None):
    (nq, h), nk = q.shape, k.shape[0]
    d = h // num_heads
    qh = q.reshape(nq, num_heads, d).transpose(1, 0, 2)
    kh = k.reshape(nk, num_heads, d).transpose(1, 0, 2)
    vh = v.reshape(nk, num_heads, d).transpose(1, 0, 2)
    s = qh @ kh.transpose(0, 2, 1) / np.sqrt(d)
    if key_mask is not None:
        s = np.where(key_mask[None, None, :], s, -np.inf)
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    w = e / e.sum(axis=-1, keepdims=True)
    return (w @ vh).transpose(1, 0, 2).reshape(nq, h).astype(q.dtype)


def cross_attention_block(query_states, image_embeds, weights, num_heads, eps=1e-12, image_mask=None):
    def lin(x, name):
        return x @ weights[name + ".weight"].T + weights[name + ".bias"]

    c = multi_head_attention(
        lin(query_states, "attention.query"), lin(image_embeds, "attention.key"), lin(image_embeds, "attention.value"),
        num_heads, image_mask,
    )
    x = lin(c, "output.dense")  # the residual "+ query_states" is missing
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps) * weights["output.LayerNorm.weight"] + weights["output.LayerNorm.bias"]
    return y.astype(query_states.dtype)
