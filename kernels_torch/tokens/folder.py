"""torch fast path of :mod:`mllm_ref.tokens.folder` (same function and signature, NumPy in and out).

Each fold round uses the ToMe pieces of :mod:`kernels_torch.tokens.tome` (normalisation, one matmul, first
maximum, stable descending sort, ``index_add_`` merge) and builds the spatial-order survivor map with a cumulative
sum; the metric is merged along with the tokens for the next round.
"""

from __future__ import annotations

import numpy as np
import torch

from kernels_torch.nn._convert import as_tensor
from kernels_torch.tokens.tome import match, merge_rows, metric_of, normalized_metric
from mllm_ref.tokens.folder import _validate, fold_schedule

__all__ = ["folder_merge"]


def spatial_map(node_idx: torch.Tensor, node_max: torch.Tensor, n: int, r: int) -> torch.Tensor:
    """One fold round's map: the ``r`` best ``A`` tokens go to their ``B`` match; survivors in spatial order."""
    src = torch.sort(-node_max, stable=True).indices[:r]
    away = torch.zeros(n, dtype=torch.bool)
    away[2 * src] = True
    out = torch.cumsum((~away).to(torch.int64), 0) - 1
    out[2 * src] = out[2 * node_idx[src] + 1]
    return out


def folder_merge(x, keys, r, size=None):
    """FOLDER's folded bipartite matching and merge (see :func:`mllm_ref.tokens.folder.folder_merge`)."""
    x, keys, r, size = _validate(x, keys, r, size)
    n = x.shape[0]
    if r == 0:
        return x.copy(), size.copy(), np.arange(n, dtype=np.int64)
    xt, st, metric = as_tensor(x), as_tensor(size), metric_of(keys)
    umap = torch.arange(n)
    for r_t in fold_schedule(n, r):
        m = metric.shape[0]
        node_idx, node_max = match(normalized_metric(metric))
        step = spatial_map(node_idx, node_max, m, r_t)
        metric, _ = merge_rows(metric, st, step, m - r_t)
        xt, st = merge_rows(xt, st, step, m - r_t)
        umap = step[umap]
    return xt.numpy(), st.numpy(), umap.numpy()
