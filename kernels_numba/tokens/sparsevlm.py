"""Numba fast path of :mod:`mllm_ref.tokens.sparsevlm` (same function and signature, NumPy in and out).

The text-vision logits ``E_v E_t^T`` of the input embeddings are one BLAS product in the input precision (the
reference upcasts the embeddings to float64 first); everything after it runs in Numba kernels that accumulate in
float64: the softmax over the text and the relevance of each text token, the head and rater sums that read only
the raters' rows of the attention over the visual columns, the stable selections, and the density-peak clustering
(Gram distances, the k nearest by partial insertion, the denser-neighbour distances) with the recycled means.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from kernels_numba.nn._common import FASTMATH, native
from kernels_numba.tokens._common import value_flags
from mllm_ref.tokens.sparsevlm import (
    TIE_MARGIN,
    _validate,
    n_deleted,
    numerical_rank,
    recycle_counts,
    value_errors,
)

__all__ = ["sparsevlm"]


@njit(cache=True)
def _relevance(logits, scale):
    """``R_t``: the mean over rows of the softmax over the text of ``logits * scale`` (float64)."""
    n, m = logits.shape
    rel = np.zeros(m, dtype=np.float64)
    e = np.empty(m, dtype=np.float64)
    for v in range(n):
        mx = -np.inf
        for t in range(m):
            z = logits[v, t] * scale
            e[t] = z
            if z > mx:
                mx = z
        s = 0.0
        for t in range(m):
            e[t] = np.exp(e[t] - mx)
            s += e[t]
        for t in range(m):
            rel[t] += e[t] / s
    for t in range(m):
        rel[t] /= n
    return rel


@njit(cache=True)
def _scores(attn, rater_idx, n):
    """``P[i, j] = (1/H) sum_h attn[h, rater_i, j]`` and ``s_j = mean_i P[i, j]``, in float64."""
    h = attn.shape[0]
    r = rater_idx.shape[0]
    p = np.zeros((r, n), dtype=np.float64)
    for i in range(r):
        row = p[i]
        for hh in range(h):
            a = attn[hh, rater_idx[i]]
            for j in range(n):
                row[j] += a[j]
        for j in range(n):
            row[j] /= h
    s = np.zeros(n, dtype=np.float64)
    for i in range(r):
        for j in range(n):
            s[j] += p[i, j]
    for j in range(n):
        s[j] /= r
    return p, s


@njit(cache=True)
def _top_k_sorted(scores, k):
    """Indices of the ``k`` largest, ties to the lower index, ascending."""
    order = np.argsort(-scores, kind="mergesort")[:k]
    return np.sort(order)


@njit(cache=True, fastmath=FASTMATH)
def _gram_distance(x):
    """``d_ij = sqrt(max(|x_i|^2 + |x_j|^2 - 2 x_i.x_j, 0) / D)`` with float64 sums (vectorised, reassociated)."""
    p, d = x.shape
    sq = np.zeros(p, dtype=np.float64)
    for i in range(p):
        xi = x[i]
        acc = 0.0
        for k in range(d):
            v = np.float64(xi[k])
            acc += v * v
        sq[i] = acc
    dist = np.zeros((p, p), dtype=np.float64)
    for i in range(p):
        xi = x[i]
        for j in range(i + 1, p):
            xj = x[j]
            acc = 0.0
            for k in range(d):
                acc += np.float64(xi[k]) * np.float64(xj[k])
            d2 = sq[i] + sq[j] - 2.0 * acc
            if d2 < 0.0:
                d2 = 0.0
            dist[i, j] = np.sqrt(d2 / d)
            dist[j, i] = dist[i, j]
    return dist


@njit(cache=True)
def _dpc_knn(x, c):
    """Density-peak clustering with ``k = c`` nearest neighbours (see the reference's ``dpc_knn``)."""
    p = x.shape[0]
    dist = _gram_distance(x)
    # density from the c smallest distances of each row (the point itself included)
    density = np.empty(p, dtype=np.float64)
    best = np.empty(c, dtype=np.float64)
    for i in range(p):
        cnt = 0
        for j in range(p):
            v = dist[i, j]
            if cnt < c:
                pos = cnt
                cnt += 1
            elif v < best[c - 1]:
                pos = c - 1
            else:
                continue
            while pos > 0 and best[pos - 1] > v:
                best[pos] = best[pos - 1]
                pos -= 1
            best[pos] = v
        acc = 0.0
        for q in range(c):
            acc += best[q] * best[q]
        density[i] = np.exp(-(acc / c))
    dmax = 0.0
    for i in range(p):
        for j in range(p):
            if dist[i, j] > dmax:
                dmax = dist[i, j]
    gamma = np.empty(p, dtype=np.float64)
    for i in range(p):
        delta = dmax
        for j in range(p):
            if density[j] > density[i] or (density[j] == density[i] and j < i):
                if dist[i, j] < delta:
                    delta = dist[i, j]
        gamma[i] = density[i] * delta
    centres = _top_k_sorted(gamma, c)
    group = np.empty(p, dtype=np.int64)
    for i in range(p):
        g = 0
        bd = dist[i, centres[0]]
        for q in range(1, c):
            if dist[i, centres[q]] < bd:
                bd = dist[i, centres[q]]
                g = q
        group[i] = g
    for q in range(c):
        group[centres[q]] = q
    return group


@njit(cache=True)
def _recycle(hidden, scores, keep, n, n_sel, c):
    """The deleted tokens with the best scores, their groups and the groups' means (float64)."""
    kept = np.zeros(n, dtype=np.bool_)
    for i in range(keep.shape[0]):
        kept[keep[i]] = True
    deleted = np.empty(n - keep.shape[0], dtype=np.int64)
    q = 0
    for j in range(n):
        if not kept[j]:
            deleted[q] = j
            q += 1
    sub = np.empty(deleted.shape[0], dtype=np.float64)
    for i in range(deleted.shape[0]):
        sub[i] = scores[deleted[i]]
    chosen = deleted[_top_k_sorted(sub, n_sel)]
    x = np.empty((n_sel, hidden.shape[1]), dtype=hidden.dtype)
    for i in range(n_sel):
        x[i] = hidden[chosen[i]]
    g = _dpc_knn(x, c)
    acc = np.zeros((c, hidden.shape[1]), dtype=np.float64)
    cnt = np.zeros(c, dtype=np.int64)
    for i in range(n_sel):
        cnt[g[i]] += 1
        for k in range(hidden.shape[1]):
            acc[g[i], k] += x[i, k]
    for q in range(c):
        for k in range(hidden.shape[1]):
            acc[q, k] /= cnt[q]
    group = np.full(n, -1, dtype=np.int64)
    for i in range(n_sel):
        group[chosen[i]] = g[i]
    return acc, group


def sparsevlm(attn, hidden, embeds, n_visual, scale=0.5, recycle_ratio=0.3, cluster_ratio=0.1):
    """One SparseVLM pruning step (see :func:`mllm_ref.tokens.sparsevlm.sparsevlm`)."""
    attn, hidden, embeds, n, scale, tau, cr = _validate(
        attn, hidden, embeds, n_visual, scale, recycle_ratio, cluster_ratio, check_values=False
    )
    attn, hidden, embeds = native(attn), native(hidden), native(embeds)
    attn_finite, attn_nonneg = value_flags(attn, check_negative=True)
    finite = {"attn": attn_finite, "hidden": value_flags(hidden)[0], "embeds": value_flags(embeds)[0]}
    value_errors(finite, attn_nonneg)
    if attn.dtype == np.float16:  # Numba has no float16 arithmetic; the widening is exact
        attn, work, embeds = attn.astype(np.float32), hidden.astype(np.float32), embeds.astype(np.float32)
    else:
        work = hidden
    m = hidden.shape[0] - n
    n0 = embeds.shape[0] - m
    logits = np.ascontiguousarray(embeds[:n0]) @ np.ascontiguousarray(embeds[n0:]).T
    rel = _relevance(logits, 1.0 / np.sqrt(embeds.shape[1]))
    rater_idx = np.flatnonzero(rel > rel.mean() * (1.0 + TIE_MARGIN))
    if rater_idx.size == 0:
        rater_idx = np.arange(rel.size)
    p, scores = _scores(attn, (rater_idx + n).astype(np.int64), n)
    n_del = n_deleted(n, numerical_rank(p), scale)
    keep = _top_k_sorted(scores, n - n_del).astype(np.int64)
    n_sel, n_groups = recycle_counts(n_del, tau, cr)
    if n_sel == 0:
        return keep, np.zeros((0, hidden.shape[1]), dtype=hidden.dtype), np.full(n, -1, dtype=np.int64)
    acc, group = _recycle(np.ascontiguousarray(work[:n]), scores, keep, n, n_sel, n_groups)
    return keep, acc.astype(hidden.dtype), group
