"""A known-wrong submission: the keys are grouped per token, like the values (the grouping KIVI rejects for keys);
the values and both dequantizers are right."""

import numpy as np


def _quant(x, bits, g):
    lo = x.min(axis=-1, keepdims=True)
    hi = x.max(axis=-1, keepdims=True)
    scale = (hi - lo) / x.dtype.type(2**bits - 1)
    scale = np.where(scale > 0, scale, x.dtype.type(1)).astype(x.dtype)
    q = np.clip(np.rint((x - lo) / scale), 0, 2**bits - 1).astype(np.uint8)
    return q, scale[..., 0], lo[..., 0]


def quantize_values(v, bits, group_size):
    t, d = v.shape
    q, s, m = _quant(v.reshape(t, d // group_size, group_size), bits, group_size)
    return q.reshape(t, d), s, m


def quantize_keys(k, bits, group_size):
    return quantize_values(k, bits, group_size)  # should group along the tokens


def dequantize_keys(codes, scale, minimum, group_size):
    return (codes * np.repeat(scale, group_size, axis=0) + np.repeat(minimum, group_size, axis=0)).astype(scale.dtype)


def dequantize_values(codes, scale, minimum, group_size):
    s, m = np.repeat(scale, group_size, axis=-1), np.repeat(minimum, group_size, axis=-1)
    return (codes * s + m).astype(scale.dtype)
