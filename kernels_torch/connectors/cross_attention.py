"""torch fast path of :mod:`mllm_ref.connectors.cross_attention` (same function, same signature, NumPy in and out).

The whole layer in torch with open_flamingo's formulation: one ``[H, T, M n]`` score matrix, the media mask built
from ``cumsum(media_locations)`` (``eq`` or ``ge`` against the media times), masked scores set to ``-max``, the
softmax, then the attention of text without preceding media zeroed in the immediate mode. Entry checks are the
reference's, so errors are identical.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from kernels_torch.nn._convert import as_tensor
from mllm_ref.connectors.cross_attention import _validate

__all__ = ["gated_xattn_dense"]


def gated_xattn_dense(
    x: np.ndarray,
    media: np.ndarray,
    weights: dict,
    *,
    media_locations: np.ndarray | None = None,
    heads: int = 8,
    only_attend_immediate_media: bool = True,
    eps: float = 1e-5,
) -> np.ndarray:
    """Flamingo's GATED XATTN-DENSE layer (see :func:`mllm_ref.connectors.cross_attention.gated_xattn_dense`)."""
    x, media, w, loc, heads, immediate, eps = _validate(
        x, media, weights, media_locations, heads, only_attend_immediate_media, eps
    )
    wt = {k: as_tensor(v) for k, v in w.items()}
    xt, mt = as_tensor(x), as_tensor(media)
    t, d = x.shape
    n_media, n, dv = media.shape
    with torch.no_grad():
        q = F.layer_norm(xt, (d,), wt["attn.norm.weight"], wt["attn.norm.bias"], eps) @ wt["attn.to_q.weight"].T
        k, v = (mt.reshape(n_media * n, dv) @ wt["attn.to_kv.weight"].T).chunk(2, dim=-1)
        inner = q.shape[1]
        qh, kh, vh = (z.reshape(z.shape[0], heads, inner // heads).transpose(0, 1) for z in (q, k, v))
        sim = (qh * (inner // heads) ** -0.5) @ kh.transpose(-1, -2)  # [H, T, M n]
        if loc is not None:
            text_time = torch.from_numpy(loc.astype(np.int64)).cumsum(0)
            media_time = torch.arange(1, n_media + 1).repeat_interleave(n)
            op = torch.eq if immediate else torch.ge
            allowed = op(text_time[:, None], media_time[None, :])
            sim = sim.masked_fill(~allowed, -torch.finfo(sim.dtype).max)
        attn = torch.softmax(sim, dim=-1)
        if loc is not None and immediate:
            attn = attn.masked_fill((text_time == 0)[None, :, None], 0.0)
        a = (attn @ vh).transpose(0, 1).reshape(t, inner) @ wt["attn.to_out.weight"].T
        y = a * torch.tanh(wt["attn_gate"]) + xt
        h = F.layer_norm(y, (d,), wt["ff.0.weight"], wt["ff.0.bias"], eps) @ wt["ff.1.weight"].T
        out = (F.gelu(h) @ wt["ff.3.weight"].T) * torch.tanh(wt["ff_gate"]) + y
    return out.numpy()
