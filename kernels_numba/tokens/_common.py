"""Value checks shared by the Numba fast paths of :mod:`mllm_ref.tokens` (private).

The references check their arrays with NumPy passes (a float64 sum for NaN/inf, a minimum for negative weights);
on attention maps of tens of MB those passes cost more than the technique. These kernels check in one parallel
pass of AND-reductions over comparisons, which vectorise (a floating-point accumulator would be a serial chain):
``v * 0 == 0`` is false exactly for NaN and +-inf.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True, parallel=True)
def _rows_ok(x2, check_negative):
    rows = x2.shape[0]
    zero = x2.dtype.type(0.0)
    finite = np.ones(rows, dtype=np.uint8)
    nonneg = np.ones(rows, dtype=np.uint8)
    for i in prange(rows):
        ok = np.uint8(1)
        pos = np.uint8(1)
        row = x2[i]
        for j in range(row.shape[0]):
            v = row[j]
            ok &= np.uint8(v * zero == zero)
            if check_negative:
                pos &= np.uint8(v >= zero)
        finite[i] = ok
        nonneg[i] = pos
    return finite.all(), nonneg.all()


def value_flags(x: np.ndarray, check_negative: bool = False) -> tuple[bool, bool]:
    """``(all finite, all >= 0)`` of a float32/float64 array (``all >= 0`` is True when not asked)."""
    x2 = np.ascontiguousarray(x).reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
    if x2.dtype == np.float16:
        x2 = x2.astype(np.float32)
    finite, nonneg = _rows_ok(x2, check_negative)
    return bool(finite), bool(nonneg)
