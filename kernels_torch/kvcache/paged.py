"""torch fast path of :mod:`mllm_ref.kvcache.paged`: gather each sequence's blocks once, then fused attention.

Same function and signature as :func:`mllm_ref.kvcache.paged.paged_attention`, NumPy in and out. For each
sequence, one indexing of the pool seen as ``[Hkv, N, Bs, d]`` gathers its used blocks straight into the
contiguous ``[Hkv, m * Bs, d]`` layout attention wants (one copy; gathering ``[m, Hkv, Bs, d]`` and permuting
would copy twice); its first ``C_b`` tokens go to ``torch.nn.functional.scaled_dot_product_attention`` with the
``g = H / Hkv`` query heads that share a kv head laid out as ``g`` query rows of that head (grouped-query attention
without repeated keys, and no mask: the context is sliced exactly). A sequence with no cached token gets zeros,
as the reference does. The pool's NaN/inf check is a multi-threaded float32 sum per array (a NaN or infinity makes
it non-finite; only then, or on a float32 overflow, is the element-wise test run).

On the 2-core CPU (``mllm-ref bench``, caches of about 130 MB) this is about 1.5x the reference: the gather copy
costs as much as the attention. A block-batched variant (``index_select`` into the pool's own layout, one tiny
matrix product per block) was slower than the reference. The numba path, which reads the blocks in place, is the
fast one here (5-17x).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from kernels_torch.nn._convert import as_tensor
from mllm_ref.kvcache.paged import _validate

__all__ = ["paged_attention"]


def _finite(t: torch.Tensor) -> bool:
    if torch.isfinite(t.sum()):
        return True
    return bool(torch.isfinite(t).all())


def paged_attention(q, k_blocks, v_blocks, block_tables, context_lens, scale=None):
    """Paged decode attention (see :func:`mllm_ref.kvcache.paged.paged_attention`)."""
    q, kb, vb, tables, lens, scale = _validate(q, k_blocks, v_blocks, block_tables, context_lens, scale,
                                               finite_kv=False)  # fmt: skip
    if q.dtype == np.float16:  # CPU half attention is slow: compute in float32, round once
        return paged_attention(q.astype(np.float32), kb.astype(np.float32), vb.astype(np.float32), tables, lens,
                               scale).astype(np.float16)  # fmt: skip
    with torch.no_grad():
        for arr, name in ((kb, "k_blocks"), (vb, "v_blocks")):
            if not _finite(as_tensor(arr)):
                raise ValueError(f"{name} contains NaN or infinite values")  # the message of mllm_ref._checks
        b, h, d = q.shape
        _, hkv, bs, _ = kb.shape
        dv = vb.shape[3]
        out = np.zeros((b, h, dv), dtype=q.dtype)
        kt_view, vt_view = kb.transpose(1, 0, 2, 3), vb.transpose(1, 0, 2, 3)  # [Hkv, N, Bs, d]: views
        for i in range(b):
            c = int(lens[i])
            if c == 0:
                continue
            ids = tables[i, : -(-c // bs)]
            k = as_tensor(kt_view[:, ids].reshape(hkv, ids.size * bs, d))[None, :, :c]
            v = as_tensor(vt_view[:, ids].reshape(hkv, ids.size * bs, dv))[None, :, :c]
            qt = as_tensor(q[i]).reshape(1, hkv, h // hkv, d)
            out[i] = F.scaled_dot_product_attention(qt, k, v, scale=scale).reshape(h, dv).numpy()
    return out
