"""torch fast path of :mod:`mllm_ref.tokens.fastv` (same function and signature, NumPy in and out).

``torch.aminmax`` checks the attention in one pass (a NaN or an infinity makes the minimum or the maximum
non-finite; a negative minimum is not a weight), the image columns are summed in float64 head by head, a
stable descending ``torch.sort`` ranks them (ties keep the lower index first, as the reference's), and
``index_select`` gathers the kept hidden states.
"""

from __future__ import annotations

import torch

from kernels_torch.nn._convert import as_tensor
from kernels_torch.tokens._common import finite_and_min
from mllm_ref.tokens.fastv import _validate, n_kept, value_errors

__all__ = ["fastv"]


def fastv(hidden, attn, visual_start, n_visual, ratio=0.5, scoring="last"):
    """FastV's pruning step (see :func:`mllm_ref.tokens.fastv.fastv`)."""
    hidden, attn, s, n, ratio, scoring = _validate(hidden, attn, visual_start, n_visual, ratio, scoring,
                                                   check_values=False)  # fmt: skip
    a, x = as_tensor(attn), as_tensor(hidden)
    attn_ok, lo = finite_and_min(a)
    value_errors(finite_and_min(x)[0], attn_ok, not lo < 0)
    h, t, _ = a.shape
    if scoring == "last":
        scores = a[:, -1, s : s + n].sum(dim=0, dtype=torch.float64) / h
    else:  # head by head: a float64 copy of one head's columns stays in cache (a single call is 8x slower)
        per_head = [a[i, :, s : s + n].to(torch.float64).sum(dim=0) for i in range(h)]
        scores = torch.stack(per_head).sum(dim=0) / (h * t)
    k = n_kept(n, ratio)
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    top = torch.sort(order).values + s
    keep = torch.cat([torch.arange(s), top, torch.arange(s + n, t)]).to(torch.int64)
    return keep.numpy(), x.index_select(0, keep).numpy()
