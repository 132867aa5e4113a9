"""Numba fast path of :mod:`mllm_ref.nn.layernorm` (same function, same signature, NumPy in and out).

Per row: pass one sums x (the mean), pass two sums the centred squares (the variance, two-pass as in the
reference, blocked sums in the input precision), pass three writes ``(x - mean) * inv_std * weight + bias``. The
row stays in L1/L2 between the passes, so memory traffic is one read and one write. Rows run in parallel above a
size threshold.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from kernels_numba.nn._common import BLOCK, FASTMATH, PARALLEL_MIN, blocked_sum, native
from mllm_ref.nn.layernorm import _validate

__all__ = ["layernorm"]


@njit(fastmath=FASTMATH)
def _layernorm_row(xr, weight, bias, eps, outr):
    t = xr.dtype.type
    n = t(xr.shape[0])
    mean = blocked_sum(xr) / n
    total = t(0.0)
    for j0 in range(0, xr.shape[0], BLOCK):
        xs = xr[j0 : j0 + BLOCK]
        part = t(0.0)
        for j in range(xs.shape[0]):
            c = xs[j] - mean
            part += c * c
        total += part
    inv_std = t(1.0) / np.sqrt(total / n + eps)
    for j in range(xr.shape[0]):
        outr[j] = (xr[j] - mean) * inv_std * weight[j] + bias[j]


@njit(cache=True, fastmath=FASTMATH)
def _layernorm_rows(x, weight, bias, eps, out):
    for r in range(x.shape[0]):
        _layernorm_row(x[r], weight, bias, eps, out[r])


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def _layernorm_rows_parallel(x, weight, bias, eps, out):
    for r in prange(x.shape[0]):
        _layernorm_row(x[r], weight, bias, eps, out[r])


def layernorm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """LayerNorm of ``x[..., d]`` (see :func:`mllm_ref.nn.layernorm.layernorm`)."""
    x, weight, bias, eps = _validate(x, weight, bias, eps)
    x, weight, bias = native(x), native(weight), native(bias)
    if x.dtype == np.float16:  # Numba has no float16 arithmetic: compute in float32, round once
        w32, b32 = weight.astype(np.float32), bias.astype(np.float32)
        return layernorm(x.astype(np.float32), w32, b32, eps).astype(np.float16)
    rows = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
    out = np.empty_like(rows)
    kernel = _layernorm_rows_parallel if rows.size >= PARALLEL_MIN and rows.shape[0] > 1 else _layernorm_rows
    kernel(rows, np.ascontiguousarray(weight), np.ascontiguousarray(bias), x.dtype.type(eps), out)
    return out.reshape(x.shape)
