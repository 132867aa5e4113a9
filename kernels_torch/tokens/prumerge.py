"""torch fast path of :mod:`mllm_ref.tokens.prumerge` (same function and signature, NumPy in and out).

The selection is the reference's :func:`~mllm_ref.tokens.prumerge.select_tokens`. The neighbour search is one
matrix product of the normalised keys with the self-similarity masked to ``-inf``; ``torch.topk`` gives each
row's k-th largest similarity ``v``, and the neighbours are the entries above ``v`` plus the first entries equal to
``v`` (ties to the lower index, as the reference's stable sort) -- no sort, no gather. The merge is then one dense
product ``x[keep] + W @ x`` with ``W[i, j] = a_j`` on the neighbours of kept token ``i`` and 0 elsewhere.
"""

from __future__ import annotations

import torch

from kernels_torch.nn._convert import as_tensor
from mllm_ref.tokens.prumerge import _validate, safe_scale, select_tokens

__all__ = ["prumerge"]


def prumerge(cls_attn, keys, features, *, k_neighbors=32, plus=False, keep_ratio=None, extra_token=True):
    """LLaVA-PruMerge / PruMerge+ (see :func:`mllm_ref.tokens.prumerge.prumerge`)."""
    cls_attn, keys, features, k_neighbors, plus, keep_ratio, extra_token = _validate(
        cls_attn, keys, features, k_neighbors, plus, keep_ratio, extra_token
    )
    n = cls_attn.shape[0]
    keep = select_tokens(cls_attn, plus=plus, keep_ratio=keep_ratio)
    kk = min(k_neighbors, n - 1)
    a, x = as_tensor(cls_attn), as_tensor(features)
    kt = torch.from_numpy(keep)
    k = as_tensor(safe_scale(keys))  # cosines do not change; squares neither overflow nor underflow
    norm = torch.linalg.vector_norm(k, dim=1, keepdim=True)
    unit = k / torch.clamp(norm, min=torch.finfo(k.dtype).tiny)
    sims = unit[kt] @ unit.T
    sims[torch.arange(keep.size), kt] = -torch.inf
    if kk > 0:
        kth = torch.topk(sims, kk, dim=1).values[:, -1:]  # [K, 1], finite: only the self entry is -inf
        above = sims > kth
        tied = sims == kth
        room = kk - above.sum(dim=1, keepdim=True)
        chosen = above | (tied & (torch.cumsum(tied, dim=1) <= room))
        weights = torch.where(chosen, a.unsqueeze(0), torch.zeros((), dtype=a.dtype))
        merged = x[kt] + weights @ x
    else:
        merged = x[kt].clone()
    if extra_token and keep.size < n:
        mask = torch.ones(n, dtype=torch.bool)
        mask[kt] = False
        merged = torch.cat([merged, (a[mask] @ x[mask]).unsqueeze(0)], dim=0)
    return keep, merged.numpy()
