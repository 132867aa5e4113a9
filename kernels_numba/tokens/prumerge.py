"""Numba fast path of :mod:`mllm_ref.tokens.prumerge` (same function, same signature, NumPy in and out).

The selection (percentiles of one row) is the reference's own :func:`~mllm_ref.tokens.prumerge.select_tokens`.
The similarity of the kept tokens to every token is one BLAS product of the raw keys (``keys[keep] @ keys.T``,
after :func:`~mllm_ref.tokens.prumerge.safe_scale`, in NumPy: Numba has no BLAS without SciPy), divided by the
key norms inside the kernel; the kernel then keeps each
row's ``k`` best in one pass with an insertion list (a candidate is compared with the current k-th best first, so
most cost one comparison; ties go to the lower index, as the reference's stable sort), and accumulates
``x_p + sum_j a_j x_j`` row by row. The reference instead sorts every row and gathers a ``[K, k, D]`` array.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from kernels_numba.nn._common import FASTMATH, native
from mllm_ref.tokens.prumerge import _validate, safe_scale, select_tokens

__all__ = ["prumerge"]


@njit(cache=True, fastmath=FASTMATH)
def _norms(keys):
    n, c = keys.shape
    out = np.empty(n, dtype=np.float64)
    for i in range(n):
        s = 0.0
        for j in range(c):
            v = np.float64(keys[i, j])
            s += v * v
        out[i] = np.sqrt(s)
    return out


@njit(cache=True)
def _merge(dots, norms, keep, cls_attn, features, kk, out):
    """``dots[K, N]`` raw key products; writes the merged kept tokens into ``out[:K]``."""
    k_rows, n = dots.shape
    d = features.shape[1]
    best_v = np.empty(kk, dtype=np.float64)
    best_j = np.empty(kk, dtype=np.int64)
    for r in range(k_rows):
        p = keep[r]
        npn = norms[p]
        m = 0
        for j in range(n):
            if j == p:
                continue
            den = npn * norms[j]
            v = np.float64(dots[r, j]) / den if den > 0 else 0.0
            if m == kk and not v > best_v[kk - 1]:
                continue
            # insert (v, j) keeping best_v decreasing; an equal value stays after (lower index first)
            pos = m if m < kk else kk - 1
            while pos > 0 and v > best_v[pos - 1]:
                if pos < kk:
                    best_v[pos] = best_v[pos - 1]
                    best_j[pos] = best_j[pos - 1]
                pos -= 1
            best_v[pos] = v
            best_j[pos] = j
            if m < kk:
                m += 1
        row = out[r]
        for t in range(d):
            row[t] = features[p, t]
        for q in range(m):
            j = best_j[q]
            w = cls_attn[j]
            for t in range(d):
                row[t] += w * features[j, t]


@njit(cache=True)
def _extra(cls_attn, features, kept_mask, out_row):
    d = features.shape[1]
    for t in range(d):
        out_row[t] = 0.0
    for j in range(features.shape[0]):
        if not kept_mask[j]:
            w = cls_attn[j]
            for t in range(d):
                out_row[t] += w * features[j, t]


def prumerge(cls_attn, keys, features, *, k_neighbors=32, plus=False, keep_ratio=None, extra_token=True):
    """LLaVA-PruMerge / PruMerge+ (see :func:`mllm_ref.tokens.prumerge.prumerge`)."""
    cls_attn, keys, features, k_neighbors, plus, keep_ratio, extra_token = _validate(
        cls_attn, keys, features, k_neighbors, plus, keep_ratio, extra_token
    )
    cls_attn, keys, features = (np.ascontiguousarray(native(a)) for a in (cls_attn, keys, features))
    keys = safe_scale(keys)  # cosines do not change; products neither overflow nor underflow
    n = cls_attn.shape[0]
    keep = select_tokens(cls_attn, plus=plus, keep_ratio=keep_ratio)
    has_extra = extra_token and keep.size < n
    out = np.empty((keep.size + int(has_extra), features.shape[1]), dtype=features.dtype)
    dots = keys[keep] @ keys.T
    _merge(dots, _norms(keys), keep, cls_attn, features, min(k_neighbors, n - 1), out)
    if has_extra:
        mask = np.zeros(n, dtype=np.bool_)
        mask[keep] = True
        _extra(cls_attn, features, mask, out[keep.size])
    return keep, out
