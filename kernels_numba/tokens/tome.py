"""Numba fast path of :mod:`mllm_ref.tokens.tome` (same function, same signature, NumPy in and out).

One compiled call does the whole step: the head mean of the keys (summed head by head, as NumPy's reduction does),
the float64-normed normalisation, the ``A x B`` cosine matrix four rows at a time (``d`` vectorised axpys per
block of rows; SciPy is not installed, so Numba has no BLAS ``np.dot``), the row arg-max (first maximum), the
stable ranking of the edges, the unmerge map, and the size-weighted merge in one pass over ``x`` (accumulated in
the input precision, then divided by the summed size) instead of the reference's float64 ``np.add.at`` scatter,
which dominates its time.

The pieces (:func:`normalized_metric`, :func:`match`, :func:`merge_rows`) are shared with the FOLDER fast path.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from kernels_numba.nn._common import native
from mllm_ref.tokens.tome import _validate

__all__ = ["tome_merge"]


@njit(cache=True)
def head_mean(keys):
    """``[H, N, d] -> [N, d]``: the sum over heads in head order, divided by ``H`` (NumPy's ``mean(axis=0)``)."""
    h, n, d = keys.shape
    out = keys[0].copy()
    for i in range(1, h):
        out += keys[i]
    return out / keys.dtype.type(h)


@njit(cache=True)
def normalized_metric(metric):
    """``m / max(||m||, tiny)`` per row, the norm in float64, the quotient rounded once to the input precision."""
    n, d = metric.shape
    out = np.empty_like(metric)
    tiny = np.finfo(metric.dtype).tiny
    for i in range(n):
        row = metric[i]
        ss = 0.0
        for j in range(d):
            v = np.float64(row[j])
            ss += v * v
        norm = max(np.sqrt(ss), tiny)
        for j in range(d):
            out[i, j] = np.float64(row[j]) / norm
    return out


@njit(cache=True)
def match(mn):
    """Bipartite soft matching on a normalised metric: ``(node_idx[nA], node_max[nA])`` with ``A = 0::2``,
    ``B = 1::2``; the arg-max is the first (lowest-index) maximum."""
    n, d = mn.shape
    n_a, n_b = (n + 1) // 2, n // 2
    bt = np.ascontiguousarray(mn[1::2].T)  # [d, nB]: each score row is a sum of d axpys over contiguous rows
    node_idx = np.zeros(n_a, dtype=np.int64)
    node_max = np.empty(n_a, dtype=mn.dtype)
    # four separate accumulators (not rows of one array, which LLVM could not prove unaliased)
    r0, r1, r2, r3 = (np.empty(n_b, dtype=mn.dtype), np.empty(n_b, dtype=mn.dtype), np.empty(n_b, dtype=mn.dtype),
                      np.empty(n_b, dtype=mn.dtype))  # fmt: skip
    for i0 in range(0, n_a, 4):  # four A rows at a time: each row of bt is loaded once for all four
        m = min(4, n_a - i0)
        r0[:] = 0
        r1[:] = 0
        r2[:] = 0
        r3[:] = 0
        a0 = mn[2 * i0]
        a1 = mn[2 * (i0 + 1)] if m > 1 else a0
        a2 = mn[2 * (i0 + 2)] if m > 2 else a0
        a3 = mn[2 * (i0 + 3)] if m > 3 else a0
        for k in range(d):
            bk = bt[k]
            c0, c1, c2, c3 = a0[k], a1[k], a2[k], a3[k]
            for j in range(n_b):
                v = bk[j]
                r0[j] += c0 * v
                r1[j] += c1 * v
                r2[j] += c2 * v
                r3[j] += c3 * v
        for t in range(m):
            row = r0 if t == 0 else (r1 if t == 1 else (r2 if t == 2 else r3))
            best = row[0]
            arg = 0
            for j in range(1, n_b):
                if row[j] > best:
                    best = row[j]
                    arg = j
            node_idx[i0 + t] = arg
            node_max[i0 + t] = best
    return node_idx, node_max


@njit(cache=True)
def tome_map(node_idx, node_max, n, r):
    """ToMe's unmerge map: ``[unmerged A by decreasing score (stable), all B]``; merged A go to their B."""
    n_a, n_b = (n + 1) // 2, n // 2
    edge = np.argsort(-node_max, kind="mergesort")
    out = np.empty(n, dtype=np.int64)
    for p in range(r, n_a):
        out[2 * edge[p]] = p - r
    for j in range(n_b):
        out[2 * j + 1] = n_a - r + j
    for p in range(r):
        a = edge[p]
        out[2 * a] = n_a - r + node_idx[a]
    return out


@njit(cache=True)
def merge_rows(x, size, umap, n_out):
    """Size-weighted merge: ``y[j] = sum_{umap[i] = j} s_i x_i / sum s_i`` and the summed sizes."""
    n, c = x.shape
    acc = np.zeros((n_out, c), dtype=x.dtype)
    s = np.zeros(n_out, dtype=size.dtype)
    for i in range(n):
        j = umap[i]
        w = x.dtype.type(size[i])
        row = acc[j]
        xi = x[i]
        for k in range(c):
            row[k] += w * xi[k]
        s[j] += size[i]
    for j in range(n_out):
        sj = x.dtype.type(s[j])
        row = acc[j]
        for k in range(c):
            row[k] = row[k] / sj
    return acc, s


@njit(cache=True)
def _tome(x, metric, size, r):
    n = x.shape[0]
    node_idx, node_max = match(normalized_metric(metric))
    umap = tome_map(node_idx, node_max, n, r)
    merged, size_out = merge_rows(x, size, umap, n - r)
    return merged, size_out, umap


def prepare(x, keys, size):
    """Native-order, contiguous inputs and the ``[N, d]`` metric (the head mean for 3-D keys)."""
    x = np.ascontiguousarray(native(x))
    size = np.ascontiguousarray(native(size))
    keys = np.ascontiguousarray(native(keys))
    metric = head_mean(keys) if keys.ndim == 3 else keys
    return x, metric, size


def tome_merge(x, keys, r, size=None):
    """ToMe bipartite soft matching and size-weighted merge (see :func:`mllm_ref.tokens.tome.tome_merge`)."""
    x, keys, r, size = _validate(x, keys, r, size)
    n = x.shape[0]
    if r == 0:
        return x.copy(), size.copy(), np.arange(n, dtype=np.int64)
    x, metric, size = prepare(x, keys, size)
    return _tome(x, metric, size, r)
