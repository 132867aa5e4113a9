"""A known-wrong submission: the quantizers are right, but the dequantizers forget to add the minimum back."""

import numpy as np


def _quant(x, bits):
    lo = x.min(axis=1, keepdims=True)
    hi = x.max(axis=1, keepdims=True)
    scale = (hi - lo) / x.dtype.type(2**bits - 1)
    scale = np.where(scale > 0, scale, x.dtype.type(1)).astype(x.dtype)
    q = np.clip(np.rint((x - lo) / scale), 0, 2**bits - 1).astype(np.uint8)
    return q, scale[:, 0], lo[:, 0]


def quantize_keys(k, bits, group_size):
    t, d = k.shape
    q, s, m = _quant(k.reshape(t // group_size, group_size, d), bits)
    return q.reshape(t, d), s, m


def quantize_values(v, bits, group_size):
    t, d = v.shape
    q, s, m = _quant(v.reshape(t, d // group_size, group_size).transpose(0, 2, 1), bits)
    return q.transpose(0, 2, 1).reshape(t, d), s.reshape(t, -1), m.reshape(t, -1)


def dequantize_keys(codes, scale, minimum, group_size):
    return (codes * np.repeat(scale, group_size, axis=0)).astype(scale.dtype)  # + minimum forgotten


def dequantize_values(codes, scale, minimum, group_size):
    return (codes * np.repeat(scale, group_size, axis=-1)).astype(scale.dtype)  # + minimum forgotten
