"""Numba fast path of :mod:`mllm_ref.connectors.perceiver_resampler` (same function, same signature).

The resampler is a short chain of matrix products (NumPy's BLAS already does them well), LayerNorms and attention.
This fast path runs the reference's pipeline (:func:`mllm_ref.connectors.perceiver_resampler.resample`) with the
project's compiled kernels for the non-BLAS parts: the blocked online-softmax attention of
:mod:`kernels_numba.nn.attention` (no ``[H, Q, T N + Q]`` score matrix) and the two-pass LayerNorm of
:mod:`kernels_numba.nn.layernorm`, and the exact GELU of :mod:`kernels_numba.nn.activations`. Entry checks are the
reference's, so errors are identical.
"""

from __future__ import annotations

import numpy as np

from kernels_numba.nn.activations import gelu_exact
from kernels_numba.nn.attention import attention
from kernels_numba.nn.layernorm import layernorm
from mllm_ref.connectors.perceiver_resampler import _validate, resample

__all__ = ["perceiver_resampler"]

OPS = {"attention": attention, "layernorm": layernorm, "gelu": gelu_exact}


def perceiver_resampler(x: np.ndarray, weights: dict, *, heads: int = 8, eps: float = 1e-5) -> np.ndarray:
    """Flamingo's Perceiver Resampler (see :func:`mllm_ref.connectors.perceiver_resampler.perceiver_resampler`)."""
    x, w, heads, eps, depth = _validate(x, weights, heads, eps)
    return resample(x, w, heads, eps, depth, OPS)
