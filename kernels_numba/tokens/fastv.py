"""Numba fast path of :mod:`mllm_ref.tokens.fastv` (same function and signature, NumPy in and out).

The reference reads the attention three times (a finiteness check, a minimum, the scores). Here one parallel pass
over ``attn`` checks every value (finite, non-negative) and accumulates the float64 column sums of the image
columns (the last row, or every row for ``scoring="mean"``) at the same time; a second pass checks ``hidden``. A
stable descending argsort of the ``n`` scores picks the kept tokens and a row copy gathers them.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from kernels_numba.nn._common import native
from kernels_numba.tokens._common import value_flags
from mllm_ref.tokens.fastv import _validate, n_kept, value_errors

__all__ = ["fastv"]


@njit(cache=True, parallel=True)
def _scan(attn, s, n, last_only, chunks):
    """One pass over ``attn [H, T, T]``: (all finite, all >= 0, float64 column sums of the image columns over
    the rows that score: the last one, or all). The checks are AND-reductions of comparisons, which vectorise
    (a floating-point accumulator would be a serial chain): ``v * 0 == 0`` is false for NaN and +-inf."""
    h, t, _ = attn.shape
    total = h * t
    zero = attn.dtype.type(0.0)
    partial = np.zeros((chunks, n), dtype=np.float64)
    finite = np.ones(chunks, dtype=np.uint8)
    nonneg = np.ones(chunks, dtype=np.uint8)
    per = (total + chunks - 1) // chunks
    for c in prange(chunks):
        acc = partial[c]
        ok = np.uint8(1)
        pos = np.uint8(1)
        for r in range(c * per, min(total, (c + 1) * per)):
            i = r % t
            row = attn[r // t, i]
            for j in range(t):
                v = row[j]
                ok &= np.uint8(v * zero == zero)
                pos &= np.uint8(v >= zero)
            if not last_only or i == t - 1:
                for j in range(n):
                    acc[j] += row[s + j]
        finite[c] = ok
        nonneg[c] = pos
    out = np.zeros(n, dtype=np.float64)
    for c in range(chunks):
        for j in range(n):
            out[j] += partial[c, j]
    return finite.all(), nonneg.all(), out


@njit(cache=True)
def _select(scores, k, s, n, t):
    order = np.argsort(-scores, kind="mergesort")[:k]  # stable: ties keep the lower index first
    top = np.sort(order)
    keep = np.empty(t - n + k, dtype=np.int64)
    for i in range(s):
        keep[i] = i
    for i in range(k):
        keep[s + i] = top[i] + s
    for i in range(t - s - n):
        keep[s + k + i] = s + n + i
    return keep


@njit(cache=True)
def _gather(hidden, keep):
    out = np.empty((keep.shape[0], hidden.shape[1]), dtype=hidden.dtype)
    for i in range(keep.shape[0]):
        out[i, :] = hidden[keep[i], :]
    return out


def fastv(hidden, attn, visual_start, n_visual, ratio=0.5, scoring="last"):
    """FastV's pruning step (see :func:`mllm_ref.tokens.fastv.fastv`)."""
    hidden, attn, s, n, ratio, scoring = _validate(hidden, attn, visual_start, n_visual, ratio, scoring,
                                                   check_values=False)  # fmt: skip
    hidden, attn = native(hidden), native(attn)
    if attn.dtype == np.float16:  # Numba has no float16 arithmetic; the widening is exact
        attn = attn.astype(np.float32)
    h, t, _ = attn.shape
    last_only = scoring == "last"
    chunks = max(1, min(16, (h * t * t) // (1 << 16)))
    attn_ok, nonneg, sums = _scan(attn, s, n, last_only, chunks)
    value_errors(value_flags(hidden)[0], attn_ok, nonneg)
    scores = sums / (h * (1 if last_only else t))
    keep = _select(scores, n_kept(n, ratio), s, n, t)
    if hidden.dtype == np.float16:
        return keep, hidden[keep]
    return keep, _gather(hidden, keep)
