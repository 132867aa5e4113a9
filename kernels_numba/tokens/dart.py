"""Numba fast path of :mod:`mllm_ref.tokens.dart` (same function and signature, NumPy in and out).

One kernel sums each token's key norm over all heads in float64, straight from the input precision (the reference
upcasts the keys first); a second reads each visual row of the hidden state once and accumulates, in float64, its
squared norm and its dot products with the few pivot rows, giving the pivot-to-visual cosine similarities without
normalising (or upcasting) the whole hidden state; the greedy selection then runs one stable sort per pivot.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from kernels_numba.nn._common import FASTMATH, native
from mllm_ref.tokens.dart import _validate, quotas

__all__ = ["dart"]

TINY = float(np.finfo(np.float64).tiny)


@njit(cache=True, fastmath=FASTMATH)
def _key_norms(keys, l1):
    h, t, d = keys.shape
    out = np.zeros(t, dtype=np.float64)
    for hh in range(h):
        for i in range(t):
            row = keys[hh, i]
            acc = 0.0
            if l1:
                for k in range(d):
                    acc += abs(np.float64(row[k]))
            else:
                for k in range(d):
                    v = np.float64(row[k])
                    acc += v * v
            out[i] += acc
    if not l1:
        for i in range(t):
            out[i] = np.sqrt(out[i])
    return out


@njit(cache=True, fastmath=FASTMATH)
def _cosines(hidden, piv, n):
    """``float64[P, n]``: cosine similarity of each pivot row with each visual row (zero rows give 0)."""
    p = piv.shape[0]
    d = hidden.shape[1]
    pn = np.empty(p, dtype=np.float64)
    for a in range(p):
        row = hidden[piv[a]]
        acc = 0.0
        for k in range(d):
            v = np.float64(row[k])
            acc += v * v
        pn[a] = max(np.sqrt(acc), TINY)
    sim = np.empty((p, n), dtype=np.float64)
    for j in range(n):
        xj = hidden[j]
        acc = 0.0
        for k in range(d):
            v = np.float64(xj[k])
            acc += v * v
        nj = max(np.sqrt(acc), TINY)
        for a in range(p):
            xp = hidden[piv[a]]
            dot = 0.0
            for k in range(d):
                dot += np.float64(xp[k]) * np.float64(xj[k])
            sim[a, j] = (dot / pn[a]) / nj
    return sim


@njit(cache=True)
def _top_k_sorted(scores, k):
    order = np.argsort(-scores, kind="mergesort")[:k]
    return np.sort(order)


@njit(cache=True)
def _greedy(sim, taken, q):
    n = taken.shape[0]
    for a in range(sim.shape[0]):
        free = np.flatnonzero(~taken)
        if q[a] == 0 or free.shape[0] == 0:
            continue
        neg = np.empty(free.shape[0], dtype=np.float64)
        for i in range(free.shape[0]):
            neg[i] = -sim[a, free[i]]
        pick = _top_k_sorted(neg, min(q[a], free.shape[0]))
        for i in range(pick.shape[0]):
            taken[free[pick[i]]] = True
    return np.flatnonzero(taken).astype(np.int64)


def dart(keys, hidden, n_visual, n_keep, n_pivot_visual=4, n_pivot_text=4, norm_ord=1):
    """DART's selection (see :func:`mllm_ref.tokens.dart.dart`)."""
    keys, hidden, n, n_keep, npv, npt, norm_ord = _validate(
        keys, hidden, n_visual, n_keep, n_pivot_visual, n_pivot_text, norm_ord
    )
    keys, hidden = native(keys), native(hidden)
    if keys.dtype == np.float16:  # Numba has no float16 arithmetic; the widening is exact
        keys, hidden = keys.astype(np.float32), hidden.astype(np.float32)
    norms = _key_norms(keys, norm_ord == 1)
    pv = _top_k_sorted(norms[:n], min(npv, n_keep)).astype(np.int64)
    pt = (_top_k_sorted(norms[n:], min(npt, norms.size - n)) + n).astype(np.int64)
    piv = np.concatenate([pv, pt])
    budget = n_keep - pv.size
    taken = np.zeros(n, dtype=np.bool_)
    taken[pv] = True
    if budget > 0 and piv.size == 0:  # no pivot at all: the largest key norms are kept
        return _top_k_sorted(norms[:n], n_keep).astype(np.int64), piv
    if budget <= 0:
        return np.flatnonzero(taken).astype(np.int64), piv
    sim = _cosines(hidden, piv, n)
    return _greedy(sim, taken, quotas(budget, piv.size)), piv
