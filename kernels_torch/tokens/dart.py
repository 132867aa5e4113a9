"""torch fast path of :mod:`mllm_ref.tokens.dart` (same function and signature, NumPy in and out).

Key norms are float64-accumulated reductions, sixteen heads at a time (no float64 copy of the keys); only the pivot
rows and, 192 rows at a time, the visual rows of the hidden state are upcast to float64 (the reference normalises
the whole sequence); their cosine similarities are small matmuls, and each pivot's choice is a stable
``torch.sort`` of the remaining candidates (ties keep the lower index first).
"""

from __future__ import annotations

import numpy as np
import torch

from kernels_torch.nn._convert import as_tensor
from mllm_ref.tokens.dart import _validate, quotas

__all__ = ["dart"]


def _top_k_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return torch.sort(order).values


def dart(keys, hidden, n_visual, n_keep, n_pivot_visual=4, n_pivot_text=4, norm_ord=1):
    """DART's selection (see :func:`mllm_ref.tokens.dart.dart`)."""
    keys, hidden, n, n_keep, npv, npt, norm_ord = _validate(
        keys, hidden, n_visual, n_keep, n_pivot_visual, n_pivot_text, norm_ord
    )
    k, h = as_tensor(keys), as_tensor(hidden)
    if k.dtype == torch.float16:
        k = k.float()
    # sixteen heads at a time (temporaries of a few MB), accumulating each token's norm in float64
    per = torch.zeros(k.shape[1], dtype=torch.float64)
    for h0 in range(0, k.shape[0], 16):
        kh = k[h0 : h0 + 16]
        per += (kh.abs() if norm_ord == 1 else kh * kh).sum(dim=(0, 2), dtype=torch.float64)
    norms = per if norm_ord == 1 else torch.sqrt(per)
    pv = _top_k_sorted(norms[:n], min(npv, n_keep))
    pt = _top_k_sorted(norms[n:], min(npt, norms.numel() - n)) + n
    piv = torch.cat([pv, pt])
    budget = n_keep - pv.numel()
    taken = torch.zeros(n, dtype=torch.bool)
    taken[pv] = True
    if budget > 0 and piv.numel() == 0:  # no pivot at all: the largest key norms are kept
        return _top_k_sorted(norms[:n], n_keep).numpy(), piv.numpy()
    if budget <= 0:
        return torch.nonzero(taken).flatten().numpy(), piv.numpy()
    tiny = float(np.finfo(np.float64).tiny)
    hp = h[piv].double()
    up = hp / torch.linalg.vector_norm(hp, dim=1, keepdim=True).clamp_min(tiny)
    sim = torch.empty((piv.numel(), n), dtype=torch.float64)
    for i in range(0, n, 192):  # blocks of visual rows: float64 copies of a few MB
        hv = h[i : min(i + 192, n)].double()
        sim[:, i : i + hv.shape[0]] = (up @ hv.T) / torch.linalg.vector_norm(hv, dim=1).clamp_min(tiny)
    for a, q in enumerate(quotas(budget, piv.numel()).tolist()):
        free = torch.nonzero(~taken).flatten()
        if q == 0 or free.numel() == 0:
            continue
        taken[free[_top_k_sorted(-sim[a, free], min(q, free.numel()))]] = True
    return torch.nonzero(taken).flatten().numpy(), piv.numpy()
