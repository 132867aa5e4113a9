"""Numba kernels for :mod:`mllm_ref.nn.activations` used inside the connectors' fast paths.

``gelu_exact(x)``: the exact (erf) GELU of :func:`mllm_ref.nn.activations.gelu` with ``approximate="none"``,
elementwise in one compiled pass (``math.erf`` in float64, rounded once to ``x``'s dtype); the NumPy reference
evaluates its own erf polynomial over whole arrays, several temporaries deep.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = ["gelu_exact"]

_INV_SQRT2 = 1.0 / math.sqrt(2.0)


@njit(cache=True)
def _gelu_kernel(x, out):
    for i in range(x.size):
        v = np.float64(x[i])
        out[i] = 0.5 * v * (1.0 + math.erf(v * _INV_SQRT2))


def gelu_exact(x: np.ndarray) -> np.ndarray:
    """Exact GELU of a float32/float64 array (same shape and dtype)."""
    flat = np.ascontiguousarray(x).reshape(-1)
    out = np.empty_like(flat)
    _gelu_kernel(flat, out)
    return out.reshape(x.shape)
