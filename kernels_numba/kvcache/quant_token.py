"""Numba fast path of :mod:`mllm_ref.kvcache.quant_token`: per-token quantization and packing in one pass.

For each token and group of ``g`` channels: the minimum and maximum, the step ``Δ = (M − m) / (2^b − 1)`` (1 for
an empty range), the codes ``clip(rint((x − m) / Δ), 0, 2^b − 1)`` written straight into the little-endian bit
stream of the packed row. Every operation is the reference's, in the input's precision (float32 stays float32), so
codes, steps and minima agree bit for bit. float16 input (no float16 arithmetic in Numba) is handed to the
reference.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from mllm_ref.kvcache import quant_token as ref


@njit(cache=True)
def _kernel(x, g, bits, qmax, one, packed, scale, zero):
    n, d = x.shape
    for t in range(n):
        row = packed[t]
        for j in range(row.shape[0]):
            row[j] = 0
        for grp in range(d // g):
            lo = x[t, grp * g]
            hi = lo
            for c in range(grp * g + 1, grp * g + g):
                v = x[t, c]
                if v < lo:
                    lo = v
                if v > hi:
                    hi = v
            step = (hi - lo) / qmax
            if not step > 0:
                step = one
            scale[t, grp] = step
            zero[t, grp] = lo
            for c in range(grp * g, grp * g + g):
                q = np.rint((x[t, c] - lo) / step)
                if q < 0:
                    q = 0
                if q > qmax:
                    q = qmax
                code = np.int64(q)
                off = c * bits
                byte = off >> 3
                sh = off & 7
                row[byte] |= np.uint8((code << sh) & 0xFF)
                if sh + bits > 8:
                    row[byte + 1] |= np.uint8(code >> (8 - sh))


def quant_token(x: np.ndarray, bits: int = 4, group_size: int | None = None):
    """Same contract as :func:`mllm_ref.kvcache.quant_token.quant_token`."""
    x, bits, g = ref._check(x, bits, group_size)
    if x.dtype == np.float16:
        return ref.quant_token(x, bits, group_size)
    lead, d = x.shape[:-1], x.shape[-1]
    out_dtype = x.dtype  # the reference returns the input's dtype, byte order included
    x = np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("="))  # native byte order for the kernel
    flat = x.reshape(-1, d)
    n = flat.shape[0]
    dt = x.dtype.type
    packed = np.zeros((n, -(-d * bits // 8)), dtype=np.uint8)
    scale = np.empty((n, d // g), dtype=x.dtype)
    zero = np.empty((n, d // g), dtype=x.dtype)
    _kernel(flat, g, bits, dt(2**bits - 1), dt(1), packed, scale, zero)
    shape = lead + (d // g,)
    return (packed.reshape(lead + (packed.shape[1],)), scale.reshape(shape).astype(out_dtype, copy=False),
            zero.reshape(shape).astype(out_dtype, copy=False))  # fmt: skip
