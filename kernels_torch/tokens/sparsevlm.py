"""torch fast path of :mod:`mllm_ref.tokens.sparsevlm` (same function and signature, NumPy in and out).

The text-vision logits are one matmul in the input precision (MKL); the softmax and relevance, the raters' head and
row sums (read from the raters' rows only), the stable selections (``torch.sort(stable=True)``: ties keep the lower
index first), the density-peak clustering on a float64 Gram matrix and the group means (a one-hot matmul) are torch
ops in float64.
"""

from __future__ import annotations

import numpy as np
import torch

from kernels_torch.nn._convert import as_tensor
from kernels_torch.tokens._common import finite_and_min
from mllm_ref.tokens.sparsevlm import (
    TIE_MARGIN,
    _validate,
    n_deleted,
    numerical_rank,
    recycle_counts,
    value_errors,
)

__all__ = ["sparsevlm"]


def _top_k_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest (ties to the lower index), ascending."""
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return torch.sort(order).values


def _dpc_knn(x: torch.Tensor, c: int) -> torch.Tensor:
    """Density-peak clustering with ``k = c`` nearest neighbours (see the reference's ``dpc_knn``)."""
    p = x.shape[0]
    x = x.double()
    sq = (x * x).sum(dim=1)
    d2 = torch.triu((sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp_min_(0.0), 1)
    dist = torch.sqrt((d2 + d2.T) / x.shape[1])  # mirrored: d_ij and d_ji are the same number
    knn = torch.sort(dist, dim=1).values[:, :c]
    density = torch.exp(-(knn * knn).mean(dim=1))
    idx = torch.arange(p)
    tie = (density[None, :] == density[:, None]) & (idx[None, :] < idx[:, None])
    denser = (density[None, :] > density[:, None]) | tie
    delta = torch.where(denser, dist, dist.max()).min(dim=1).values
    centres = _top_k_sorted(density * delta, c)
    group = torch.argmin(dist[:, centres], dim=1)  # the first minimum: the lower-numbered centre
    group[centres] = torch.arange(c)
    return group


def sparsevlm(attn, hidden, embeds, n_visual, scale=0.5, recycle_ratio=0.3, cluster_ratio=0.1):
    """One SparseVLM pruning step (see :func:`mllm_ref.tokens.sparsevlm.sparsevlm`)."""
    attn, hidden, embeds, n, scale, tau, cr = _validate(
        attn, hidden, embeds, n_visual, scale, recycle_ratio, cluster_ratio, check_values=False
    )
    a, h, e = as_tensor(attn), as_tensor(hidden), as_tensor(embeds)
    attn_finite, lo = finite_and_min(a)
    value_errors({"attn": attn_finite, "hidden": finite_and_min(h)[0], "embeds": finite_and_min(e)[0]}, not lo < 0)
    work = h.float() if h.dtype == torch.float16 else h
    e = e.float() if e.dtype == torch.float16 else e
    m = hidden.shape[0] - n
    n0 = embeds.shape[0] - m
    logits = (e[:n0] @ e[n0:].T).double() / np.sqrt(embeds.shape[1])
    rel = torch.softmax(logits, dim=1).mean(dim=0)
    rater_idx = torch.nonzero(rel > rel.mean() * (1.0 + TIE_MARGIN)).flatten()
    if rater_idx.numel() == 0:
        rater_idx = torch.arange(rel.numel())
    p = a[:, rater_idx + n, :n].double().sum(dim=0) / a.shape[0]
    scores = p.mean(dim=0)
    n_del = n_deleted(n, numerical_rank(p.numpy()), scale)
    keep = _top_k_sorted(scores, n - n_del)
    group = torch.full((n,), -1, dtype=torch.int64)
    n_sel, c = recycle_counts(n_del, tau, cr)
    if n_sel == 0:
        return keep.numpy(), np.zeros((0, hidden.shape[1]), dtype=hidden.dtype), group.numpy()
    mask = torch.ones(n, dtype=torch.bool)
    mask[keep] = False
    deleted = torch.nonzero(mask).flatten()
    chosen = deleted[_top_k_sorted(scores[deleted], n_sel)]
    x = work[chosen]
    g = _dpc_knn(x, c)
    group[chosen] = g
    onehot = (g[None, :] == torch.arange(c)[:, None]).double()  # [c, n_sel]: the groups' members
    recycled = (onehot @ x.double()) / onehot.sum(dim=1, keepdim=True)
    return keep.numpy(), recycled.numpy().astype(hidden.dtype), group.numpy()
