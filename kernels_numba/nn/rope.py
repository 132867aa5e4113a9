"""Numba fast path of :mod:`mllm_ref.nn.rope` (same function, same signature, NumPy in and out).

The cos/sin tables ``[T, d/2]`` come from the reference's :func:`mllm_ref.nn.rope.rope_cos_sin` (float64 angles
rounded once to x's dtype, so both compute with the same rounded coefficients). The kernel then rotates every
(leading index, token) row in one pass, without the reference's temporaries and concatenation.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from kernels_numba.nn._common import FASTMATH, PARALLEL_MIN, native
from mllm_ref.nn.rope import _validate, rope_cos_sin

__all__ = ["rope"]


@njit(fastmath=FASTMATH)
def _rotate(xr, c, s, outr):
    half = c.shape[0]
    x1 = xr[:half]
    x2 = xr[half:]
    o1 = outr[:half]
    o2 = outr[half:]
    for i in range(half):
        o1[i] = x1[i] * c[i] - x2[i] * s[i]
        o2[i] = x2[i] * c[i] + x1[i] * s[i]


@njit(cache=True, fastmath=FASTMATH)
def _rope_rows(x, cos, sin, out):
    for lead in range(x.shape[0]):
        for t in range(x.shape[1]):
            _rotate(x[lead, t], cos[t], sin[t], out[lead, t])


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def _rope_rows_parallel(x, cos, sin, out):
    tokens = x.shape[1]
    for r in prange(x.shape[0] * tokens):
        lead = r // tokens
        t = r - lead * tokens
        _rotate(x[lead, t], cos[t], sin[t], out[lead, t])


def rope(x: np.ndarray, positions: np.ndarray, theta: float = 10000.0) -> np.ndarray:
    """Rotary position embedding, rotate-half layout (see :func:`mllm_ref.nn.rope.rope`)."""
    x, positions, theta = _validate(x, positions, theta)
    x = native(x)
    if x.dtype == np.float16:  # Numba has no float16 arithmetic: compute in float32, round once
        return rope(x.astype(np.float32), positions, theta).astype(np.float16)
    t, d = x.shape[-2], x.shape[-1]
    cos, sin = rope_cos_sin(positions, d, theta, x.dtype)
    rows = np.ascontiguousarray(x).reshape(-1, t, d)
    out = np.empty_like(rows)
    kernel = _rope_rows_parallel if rows.size >= PARALLEL_MIN else _rope_rows
    kernel(rows, cos, sin, out)
    return out.reshape(x.shape)
