"""torch fast path of :mod:`mllm_ref.tokens.tome` (same function and signature, NumPy in and out).

The head mean, the float64-normed normalisation, one ``A @ B^T`` matmul, the row maximum with its index
(``torch.max`` documents that it returns the first of equal maxima: the reference's tie rule), a stable
descending sort of the edges, and the size-weighted merge as two ``index_add_`` scatters (sum of ``s_i x_i`` and
of ``s_i``) followed by one division. The pieces are shared with the FOLDER fast path.
"""

from __future__ import annotations

import numpy as np
import torch

from kernels_torch.nn._convert import as_tensor
from mllm_ref.tokens.tome import _validate

__all__ = ["tome_merge"]


def normalized_metric(metric: torch.Tensor) -> torch.Tensor:
    """``m / max(||m||, tiny)`` per row; the norm and the quotient in float64, rounded once to the input dtype."""
    m64 = metric.double()
    norm = m64.square().sum(-1, keepdim=True).sqrt().clamp_min(torch.finfo(metric.dtype).tiny)
    return (m64 / norm).to(metric.dtype)


def match(mn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(node_idx[nA], node_max[nA])`` for ``A = 0::2``, ``B = 1::2``: first maximal ``B`` of each ``A`` row."""
    node_max, node_idx = (mn[0::2] @ mn[1::2].T).max(dim=-1)  # documented: the first maximal index
    return node_idx, node_max


def tome_map(node_idx: torch.Tensor, node_max: torch.Tensor, n: int, r: int) -> torch.Tensor:
    """ToMe's unmerge map: ``[unmerged A by decreasing score (stable), all B]``; merged A go to their B."""
    n_a, n_b = (n + 1) // 2, n // 2
    edge = torch.sort(-node_max, stable=True).indices
    unm, src = edge[r:], edge[:r]
    out = torch.empty(n, dtype=torch.int64)
    out[2 * unm] = torch.arange(n_a - r)
    out[1::2] = n_a - r + torch.arange(n_b)
    out[2 * src] = n_a - r + node_idx[src]
    return out


def merge_rows(xt: torch.Tensor, st: torch.Tensor, umap: torch.Tensor, n_out: int):
    """Size-weighted merge by two scatters and a division."""
    acc = torch.zeros((n_out, xt.shape[1]), dtype=xt.dtype).index_add_(0, umap, xt * st[:, None])
    s = torch.zeros(n_out, dtype=st.dtype).index_add_(0, umap, st)
    return acc.div_(s[:, None]), s


def metric_of(keys: np.ndarray) -> torch.Tensor:
    kt = as_tensor(keys)
    return kt.mean(dim=0) if kt.ndim == 3 else kt


def tome_merge(x, keys, r, size=None):
    """ToMe bipartite soft matching and size-weighted merge (see :func:`mllm_ref.tokens.tome.tome_merge`)."""
    x, keys, r, size = _validate(x, keys, r, size)
    n = x.shape[0]
    if r == 0:
        return x.copy(), size.copy(), np.arange(n, dtype=np.int64)
    node_idx, node_max = match(normalized_metric(metric_of(keys)))
    umap = tome_map(node_idx, node_max, n, r)
    merged, s = merge_rows(as_tensor(x), as_tensor(size), umap, n - r)
    return merged.numpy(), s.numpy(), umap.numpy()
