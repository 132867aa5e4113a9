"""torch fast path of :mod:`mllm_ref.nn.attention` (same function and signature, NumPy in and out).

Without ``return_weights`` it calls ``torch.nn.functional.scaled_dot_product_attention`` (fused kernels on the
CPU), with ``enable_gqa=True`` for grouped-query heads (query head h reads kv head h // (Hq/Hkv), as in the
reference). The masks map as follows:
- causal with Tq == Tk and no padding mask: ``is_causal=True`` (top-left and end alignment coincide);
- causal with Tq == 1 and no padding mask: no mask at all (the one query sees every key);
- otherwise a boolean ``attn_mask[B, 1, Tq, Tk]`` built by :func:`mllm_ref.nn.attention.allowed_mask` (True =
  attend), which handles the end-aligned causal mask and the padding mask together.
SDPA returns NaN for a row that may attend nothing; such rows are given an all-True mask for the call and set to 0
afterwards, as in the reference.

With ``return_weights`` it computes the weights explicitly (``matmul``, masked ``softmax``, ``matmul``), kv heads
repeated with ``repeat_interleave``; all-masked rows get zero weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels_torch.nn._convert import as_tensor
from mllm_ref.nn.attention import _validate, allowed_mask

__all__ = ["attention"]


def attention(q, k, v, *, causal=False, key_mask=None, scale=None, return_weights=False):
    """Softmax attention, grouped-query, causal aligned to the end (see :func:`mllm_ref.nn.attention.attention`)."""
    q, k, v, causal, key_mask, scale, return_weights = _validate(q, k, v, causal, key_mask, scale, return_weights)
    bsz, hq, tq, _ = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    group = hq // hkv
    qt, kt, vt = as_tensor(q), as_tensor(k), as_tensor(v)

    needs_mask = key_mask is not None or (causal and tq != tk and tq != 1)
    allowed = torch.from_numpy(allowed_mask(bsz, tq, tk, causal, key_mask)) if needs_mask else None

    if return_weights:
        if allowed is None and causal and tq == tk:
            allowed = torch.from_numpy(allowed_mask(bsz, tq, tk, causal, None))
        if group > 1:
            kt = kt.repeat_interleave(group, dim=1)
            vt = vt.repeat_interleave(group, dim=1)
        scores = torch.matmul(qt, kt.transpose(-1, -2)) * scale
        if allowed is None:
            weights = torch.softmax(scores, dim=-1)
        else:
            row_any = allowed.any(dim=-1, keepdim=True)  # [B, 1, Tq, 1]
            # Masked scores -> -inf; rows with no allowed key get finite scores (no NaN), then zero weights.
            scores = scores.masked_fill(~allowed, float("-inf"))
            scores = torch.where(row_any, scores, torch.zeros((), dtype=scores.dtype))
            weights = torch.softmax(scores, dim=-1)
            weights = torch.where(row_any, weights, torch.zeros((), dtype=weights.dtype))
        out = torch.matmul(weights, vt)
        return out.numpy(), weights.numpy()

    if allowed is None:
        out = F.scaled_dot_product_attention(
            qt, kt, vt, is_causal=causal and tq == tk and tq > 1, scale=scale, enable_gqa=group > 1
        )
        return out.numpy()
    row_any = allowed.any(dim=-1, keepdim=True)
    out = F.scaled_dot_product_attention(
        qt, kt, vt, attn_mask=allowed | ~row_any, scale=scale, enable_gqa=group > 1
    )
    return torch.where(row_any, out, torch.zeros((), dtype=out.dtype)).numpy()
