"""torch fast path of :mod:`mllm_ref.connectors.perceiver_resampler` (same function, same signature, NumPy in and
out): the whole resampler in torch (``F.layer_norm``, ``F.scaled_dot_product_attention``, exact ``F.gelu``), one
conversion in and one out. Entry checks are the reference's, so errors are identical.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from kernels_torch.nn._convert import as_tensor
from mllm_ref.connectors.perceiver_resampler import _validate

__all__ = ["perceiver_resampler"]


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    n, width = t.shape
    return t.reshape(n, heads, width // heads).transpose(0, 1)


def perceiver_resampler(x: np.ndarray, weights: dict, *, heads: int = 8, eps: float = 1e-5) -> np.ndarray:
    """Flamingo's Perceiver Resampler (see :func:`mllm_ref.connectors.perceiver_resampler.perceiver_resampler`)."""
    x, w, heads, eps, depth = _validate(x, weights, heads, eps)
    t, n, d = x.shape
    wt = {k: as_tensor(v) for k, v in w.items()}
    xt = as_tensor(x)
    if "frame_embs" in wt:
        xt = xt + wt["frame_embs"][:t, None, :]
    media = xt.reshape(t * n, d)
    z = wt["latents"]
    with torch.no_grad():
        for i in range(depth):
            p = f"layers.{i}."
            xn = F.layer_norm(media, (d,), wt[p + "0.norm_media.weight"], wt[p + "0.norm_media.bias"], eps)
            zn = F.layer_norm(z, (d,), wt[p + "0.norm_latents.weight"], wt[p + "0.norm_latents.bias"], eps)
            q = zn @ wt[p + "0.to_q.weight"].T
            k, v = (torch.cat([xn, zn], 0) @ wt[p + "0.to_kv.weight"].T).chunk(2, dim=-1)
            o = F.scaled_dot_product_attention(_heads(q, heads), _heads(k, heads), _heads(v, heads))
            z = o.transpose(0, 1).reshape(q.shape) @ wt[p + "0.to_out.weight"].T + z
            h = F.layer_norm(z, (d,), wt[p + "1.0.weight"], wt[p + "1.0.bias"], eps) @ wt[p + "1.1.weight"].T
            z = F.gelu(h) @ wt[p + "1.3.weight"].T + z
        out = F.layer_norm(z, (d,), wt["norm.weight"], wt["norm.bias"], eps)
    return out.numpy()
