"""Numba fast path of :mod:`mllm_ref.nn.softmax` (same function, same signature, NumPy in and out).

One pass for the row maximum, one fused pass that writes ``exp(x - max)`` and sums it (two-level blocked float32
sum), one pass that multiplies by the reciprocal of the sum. ``exp`` is the vectorisable polynomial of
:mod:`kernels_numba.nn._fastexp` (float32) or libm (float64). Rows run in parallel above a size threshold. A
softmax over another axis than the last is computed on a contiguous copy with that axis moved last.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from kernels_numba.nn._common import BLOCK, FASTMATH, PARALLEL_MIN, native, row_max
from kernels_numba.nn._fastexp import exp
from mllm_ref.nn.softmax import _validate

__all__ = ["softmax"]


@njit(fastmath=FASTMATH)
def _softmax_row(xr, outr):
    n = xr.shape[0]
    m = row_max(xr)
    total = xr.dtype.type(0.0)
    for j0 in range(0, n, BLOCK):
        xs = xr[j0 : j0 + BLOCK]
        os = outr[j0 : j0 + BLOCK]
        part = xr.dtype.type(0.0)
        for j in range(xs.shape[0]):
            e = exp(xs[j] - m)
            os[j] = e
            part += e
        total += part
    inv = xr.dtype.type(1.0) / total  # total >= 1: the maximum contributes exp(0) = 1
    for j in range(n):
        outr[j] *= inv


@njit(cache=True, fastmath=FASTMATH)
def _softmax_rows(x, out):
    for r in range(x.shape[0]):
        _softmax_row(x[r], out[r])


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def _softmax_rows_parallel(x, out):
    for r in prange(x.shape[0]):
        _softmax_row(x[r], out[r])


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Stable softmax of ``x`` along ``axis`` (see :func:`mllm_ref.nn.softmax.softmax`)."""
    x, axis = _validate(x, axis)
    x = native(x)
    if x.dtype == np.float16:  # Numba has no float16 arithmetic: compute in float32, round once
        return softmax(x.astype(np.float32), axis).astype(np.float16)
    moved = np.ascontiguousarray(np.moveaxis(x, axis, -1))
    rows = moved.reshape(-1, moved.shape[-1])
    out = np.empty_like(rows)
    if rows.size >= PARALLEL_MIN and rows.shape[0] > 1:
        _softmax_rows_parallel(rows, out)
    else:
        _softmax_rows(rows, out)
    return np.moveaxis(out.reshape(moved.shape), -1, axis)
