"""torch fast path of :mod:`mllm_ref.nn.rmsnorm` (same function and signature, NumPy in and out):
``torch.nn.functional.rms_norm``, which also puts ``eps`` inside the square root."""

from __future__ import annotations

import numpy as np
import torch.nn.functional as F

from kernels_torch.nn._convert import as_tensor
from mllm_ref.nn.rmsnorm import _validate

__all__ = ["rmsnorm"]


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """RMSNorm of ``x[..., d]`` scaled by ``weight[d]`` (see :func:`mllm_ref.nn.rmsnorm.rmsnorm`)."""
    x, weight, eps = _validate(x, weight, eps)
    return F.rms_norm(as_tensor(x), (x.shape[-1],), weight=as_tensor(weight), eps=eps).numpy()
