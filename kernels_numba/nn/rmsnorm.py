"""Numba fast path of :mod:`mllm_ref.nn.rmsnorm` (same function, same signature, NumPy in and out).

One fused pass per row: the sum of squares (two-level blocked sum in the input precision), then
``x * inv_rms * weight`` written directly. Rows run in parallel above a size threshold.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from kernels_numba.nn._common import BLOCK, FASTMATH, PARALLEL_MIN, native
from mllm_ref.nn.rmsnorm import _validate

__all__ = ["rmsnorm"]


@njit(fastmath=FASTMATH)
def _rmsnorm_row(xr, weight, eps, outr):
    t = xr.dtype.type
    total = t(0.0)
    for j0 in range(0, xr.shape[0], BLOCK):
        xs = xr[j0 : j0 + BLOCK]
        part = t(0.0)
        for j in range(xs.shape[0]):
            part += xs[j] * xs[j]
        total += part
    inv_rms = t(1.0) / np.sqrt(total / t(xr.shape[0]) + eps)
    for j in range(xr.shape[0]):
        outr[j] = xr[j] * inv_rms * weight[j]


@njit(cache=True, fastmath=FASTMATH)
def _rmsnorm_rows(x, weight, eps, out):
    for r in range(x.shape[0]):
        _rmsnorm_row(x[r], weight, eps, out[r])


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def _rmsnorm_rows_parallel(x, weight, eps, out):
    for r in prange(x.shape[0]):
        _rmsnorm_row(x[r], weight, eps, out[r])


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """RMSNorm of ``x[..., d]`` scaled by ``weight[d]`` (see :func:`mllm_ref.nn.rmsnorm.rmsnorm`)."""
    x, weight, eps = _validate(x, weight, eps)
    x, weight = native(x), native(weight)
    if x.dtype == np.float16:  # Numba has no float16 arithmetic: compute in float32, round once
        return rmsnorm(x.astype(np.float32), weight.astype(np.float32), eps).astype(np.float16)
    rows = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
    weight = np.ascontiguousarray(weight)
    out = np.empty_like(rows)
    kernel = _rmsnorm_rows_parallel if rows.size >= PARALLEL_MIN and rows.shape[0] > 1 else _rmsnorm_rows
    kernel(rows, weight, x.dtype.type(eps), out)
    return out.reshape(x.shape)
