"""Known-wrong: the causal mask lets each query see the NEXT key too (j <= i + 1 instead of j <= i).
softmax is left as the stub."""

import numpy as np


def softmax(x, axis=-1):
    raise NotImplementedError("softmax")


def attention(q, k, v, *, causal=False, key_mask=None, scale=None, return_weights=False):
    b, hq, tq, d = q.shape
    tk = k.shape[2]
    group = hq // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    s = (q @ k.swapaxes(-1, -2)) * q.dtype.type(1 / np.sqrt(d) if scale is None else scale)
    allowed = np.ones((b, 1, tq, tk), dtype=bool)
    if causal:
        allowed &= np.arange(tk) <= (tk - tq + np.arange(tq))[:, None] + 1  # the bug: + 1
    if key_mask is not None:
        allowed &= key_mask[:, None, None, :]
    s = np.where(allowed, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    w = np.exp(s - np.where(np.isfinite(m), m, 0))
    total = w.sum(axis=-1, keepdims=True)
    w = w / np.where(total > 0, total, 1)
    return (w @ v, w) if return_weights else w @ v
