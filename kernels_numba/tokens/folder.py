"""Numba fast path of :mod:`mllm_ref.tokens.folder` (same function, same signature, NumPy in and out).

The whole fold runs in one compiled call: per round the ToMe matching kernels of :mod:`kernels_numba.tokens.tome`
(normalisation, blocked cosine rows with first-maximum arg-max, stable edge ranking), the spatial-order survivor
map, and the size-weighted merge of the tokens and of the metric (for the next round) in the input precision.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from kernels_numba.tokens.tome import match, merge_rows, normalized_metric, prepare
from mllm_ref.tokens.folder import _validate, fold_schedule

__all__ = ["folder_merge"]


@njit(cache=True)
def spatial_map(node_idx, node_max, n, r):
    """One fold round's map: the ``r`` best-scoring ``A`` tokens go to their ``B`` match, survivors in spatial
    order (stable ranking: equal scores by increasing ``A`` index)."""
    edge = np.argsort(-node_max, kind="mergesort")
    away = np.zeros(n, dtype=np.bool_)
    for p in range(r):
        away[2 * edge[p]] = True
    out = np.empty(n, dtype=np.int64)
    k = 0
    for i in range(n):
        if not away[i]:
            out[i] = k
            k += 1
    for p in range(r):
        a = edge[p]
        out[2 * a] = out[2 * node_idx[a] + 1]
    return out


@njit(cache=True)
def _fold(x, metric, size, schedule):
    umap = np.arange(x.shape[0])
    for t in range(schedule.shape[0]):
        r_t = schedule[t]
        n = metric.shape[0]
        node_idx, node_max = match(normalized_metric(metric))
        step = spatial_map(node_idx, node_max, n, r_t)
        metric, _ = merge_rows(metric, size, step, n - r_t)
        x, size = merge_rows(x, size, step, n - r_t)
        new = np.empty_like(umap)
        for i in range(umap.shape[0]):
            new[i] = step[umap[i]]
        umap = new
    return x, size, umap


def folder_merge(x, keys, r, size=None):
    """FOLDER's folded bipartite matching and merge (see :func:`mllm_ref.tokens.folder.folder_merge`)."""
    x, keys, r, size = _validate(x, keys, r, size)
    n = x.shape[0]
    if r == 0:
        return x.copy(), size.copy(), np.arange(n, dtype=np.int64)
    x, metric, size = prepare(x, keys, size)
    return _fold(x, np.ascontiguousarray(metric), size, np.asarray(fold_schedule(n, r), dtype=np.int64))
