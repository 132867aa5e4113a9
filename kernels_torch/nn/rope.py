"""torch fast path of :mod:`mllm_ref.nn.rope` (same function and signature, NumPy in and out).

The cos/sin tables are the reference's (:func:`mllm_ref.nn.rope.rope_cos_sin`: float64 angles rounded once to x's
dtype); torch applies the rotate-half rotation with its vectorised, multi-threaded elementwise kernels.
"""

from __future__ import annotations

import numpy as np
import torch

from kernels_torch.nn._convert import as_tensor
from mllm_ref.nn.rope import _validate, rope_cos_sin

__all__ = ["rope"]


def rope(x: np.ndarray, positions: np.ndarray, theta: float = 10000.0) -> np.ndarray:
    """Rotary position embedding, rotate-half layout (see :func:`mllm_ref.nn.rope.rope`)."""
    x, positions, theta = _validate(x, positions, theta)
    half = x.shape[-1] // 2
    cos, sin = (as_tensor(a) for a in rope_cos_sin(positions, x.shape[-1], theta, x.dtype))
    xt = as_tensor(x)
    x1, x2 = xt[..., :half], xt[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).numpy()
