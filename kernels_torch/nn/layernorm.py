"""torch fast path of :mod:`mllm_ref.nn.layernorm` (same function and signature, NumPy in and out):
``torch.nn.functional.layer_norm`` (biased variance, ``eps`` inside the square root, like the reference)."""

from __future__ import annotations

import numpy as np
import torch.nn.functional as F

from kernels_torch.nn._convert import as_tensor
from mllm_ref.nn.layernorm import _validate

__all__ = ["layernorm"]


def layernorm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """LayerNorm of ``x[..., d]`` (see :func:`mllm_ref.nn.layernorm.layernorm`)."""
    x, weight, bias, eps = _validate(x, weight, bias, eps)
    return F.layer_norm(as_tensor(x), (x.shape[-1],), as_tensor(weight), as_tensor(bias), eps).numpy()
