"""Numba fast path of :mod:`mllm_ref.quant.affine`: affine quantization in one pass per group, and bit packing.

``x`` is viewed without a copy as ``[A, n, B]`` (``A`` the product of the axes before the quantization axis, ``n``
its length, ``B`` the product of the axes after it; per tensor: ``[1, size, 1]``). For each ``a``, group of ``g``
consecutive positions along ``n`` and ``b``: the group's minimum and maximum (or maximum magnitude), the step ``Δ``
(1 for an empty range), the zero point and the codes. Every operation is the reference's, in ``x``'s precision
(float32 stays float32: the constants are passed typed, so no int/float mix promotes to float64): the true division
``x / Δ``, ``np.rint`` (round half to even), the same 0-inclusion of the integer form, so codes, steps and zero
points agree bit for bit with the reference. One kernel serves the three forms (a ``mode`` argument), so there are
two specialisations (float32, float64). float16 input (no float16 arithmetic in Numba) is handed to the reference.

:func:`pack` and :func:`unpack` write and read the reference's little-endian bit stream directly, one row at a time.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from mllm_ref.quant import affine as ref

_SYM, _INT, _FLOAT = 0, 1, 2


@njit(cache=True)
def _quant_kernel(x, g, mode, qmin, qmax, zero_f, one, codes, scale, zero):
    """x: [A, n, B] float; codes: uint8 [A, n, B] (symmetric codes stored modulo 256); scale, zero: [A, n/g, B]."""
    na, n, nb = x.shape
    for a in range(na):
        for grp in range(n // g):
            s0 = grp * g
            for b in range(nb):
                if mode == 0:  # symmetric: max |x|
                    amax = abs(x[a, s0, b])
                    for i in range(s0 + 1, s0 + g):
                        v = abs(x[a, i, b])
                        if v > amax:
                            amax = v
                    step = amax / qmax
                    if not step > 0:
                        step = one
                    scale[a, grp, b] = step
                    zero[a, grp, b] = zero_f
                    for i in range(s0, s0 + g):
                        q = np.rint(x[a, i, b] / step)
                        if q < qmin:
                            q = qmin
                        if q > qmax:
                            q = qmax
                        codes[a, i, b] = np.uint8(np.int64(q) & 0xFF)
                    continue
                lo = x[a, s0, b]
                hi = lo
                for i in range(s0 + 1, s0 + g):
                    v = x[a, i, b]
                    if v < lo:
                        lo = v
                    if v > hi:
                        hi = v
                if mode == 1:  # integer zero point, 0 inside the range
                    if lo > zero_f:
                        lo = zero_f
                    if hi < zero_f:
                        hi = zero_f
                    step = (hi - lo) / (qmax - qmin)
                    if not step > 0:
                        step = one
                    z = qmin - np.rint(lo / step)
                    if z < qmin:
                        z = qmin
                    if z > qmax:
                        z = qmax
                    scale[a, grp, b] = step
                    zero[a, grp, b] = z
                    for i in range(s0, s0 + g):
                        q = np.rint(x[a, i, b] / step) + z
                        if q < qmin:
                            q = qmin
                        if q > qmax:
                            q = qmax
                        codes[a, i, b] = np.uint8(q)
                else:  # real zero point: the group minimum
                    step = (hi - lo) / qmax
                    if not step > 0:
                        step = one
                    scale[a, grp, b] = step
                    zero[a, grp, b] = lo
                    for i in range(s0, s0 + g):
                        q = np.rint((x[a, i, b] - lo) / step)
                        if q < zero_f:
                            q = zero_f
                        if q > qmax:
                            q = qmax
                        codes[a, i, b] = np.uint8(q)


def quantize(x, bits: int = 8, *, symmetric: bool = False, axis: int | None = None, group_size: int | None = None,
             zero_point: str = "integer"):  # fmt: skip
    """Same contract as :func:`mllm_ref.quant.affine.quantize`."""
    x, bits, symmetric, ax, g, zp = ref._validate(x, bits, symmetric, axis, group_size, zero_point)
    if x.dtype == np.float16:
        return ref.quantize(x, bits, symmetric=symmetric, axis=axis, group_size=group_size, zero_point=zero_point)
    out_dtype = x.dtype  # the reference returns x's dtype, byte order included
    shape = x.shape
    xc = np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("="))
    if ax is None:
        x3 = xc.reshape(1, -1, 1)
    else:
        before, after = int(np.prod(shape[:ax], dtype=np.int64)), int(np.prod(shape[ax + 1 :], dtype=np.int64))
        x3 = xc.reshape(before, shape[ax], after)
    dt = xc.dtype.type
    qmin, qmax = ref.code_range(bits, symmetric)
    mode = _SYM if symmetric else (_INT if zp == "integer" else _FLOAT)
    na, n, nb = x3.shape
    codes = np.empty(x3.shape, dtype=np.uint8)
    scale = np.empty((na, n // g, nb), dtype=xc.dtype)
    zero = np.empty((na, n // g, nb), dtype=xc.dtype)
    _quant_kernel(x3, g, mode, dt(qmin), dt(qmax), dt(0), dt(1), codes, scale, zero)
    pshape = ref._param_shape(shape, ax, g)
    scale = scale.reshape(pshape).astype(out_dtype, copy=False)
    if mode == _SYM:
        return codes.view(np.int8).reshape(shape), scale, np.zeros(pshape, dtype=np.int8)
    if mode == _INT:
        return codes.reshape(shape), scale, zero.reshape(pshape).astype(np.uint8)
    return codes.reshape(shape), scale, zero.reshape(pshape).astype(out_dtype, copy=False)


@njit(cache=True)
def _pack_kernel(codes, bits, out):
    """codes: uint8 [R, n]; out: uint8 [R, ceil(n bits / 8)] zeroed; code i at stream bits [i bits, (i+1) bits)."""
    r, n = codes.shape
    for row in range(r):
        for i in range(n):
            code = np.int64(codes[row, i])
            off = i * bits
            byte = off >> 3
            sh = off & 7
            out[row, byte] |= np.uint8((code << sh) & 0xFF)
            if sh + bits > 8:
                out[row, byte + 1] |= np.uint8(code >> (8 - sh))


@njit(cache=True)
def _unpack_kernel(packed, bits, n, out):
    r = packed.shape[0]
    mask = (1 << bits) - 1
    for row in range(r):
        for i in range(n):
            off = i * bits
            byte = off >> 3
            sh = off & 7
            v = np.int64(packed[row, byte]) >> sh
            if sh + bits > 8:
                v |= np.int64(packed[row, byte + 1]) << (8 - sh)
            out[row, i] = np.uint8(v & mask)


def pack(codes, bits: int) -> np.ndarray:
    """Same contract as :func:`mllm_ref.quant.affine.pack`."""
    codes = np.asarray(codes)
    if codes.dtype != np.uint8:
        raise TypeError(f"codes must be uint8 (add 2^(bits-1) to signed codes first), got {codes.dtype}")
    if codes.ndim < 1:
        raise ValueError("codes must have at least one axis (codes are packed along the last)")
    bits = ref._checks.choice(bits, "bits", ref.PACK_BITS)
    if codes.size and int(codes.max()) >= 2**bits:
        raise ValueError(f"codes must be < 2^bits = {2**bits}, got a code {int(codes.max())}")
    if bits == 8:
        return codes.copy()
    lead, n = codes.shape[:-1], codes.shape[-1]
    flat = np.ascontiguousarray(codes).reshape(int(np.prod(lead, dtype=np.int64)), n)
    out = np.zeros((flat.shape[0], ref.packed_length(n, bits)), dtype=np.uint8)
    _pack_kernel(flat, bits, out)
    return out.reshape(lead + (out.shape[1],))


def unpack(packed, bits: int, n: int) -> np.ndarray:
    """Same contract as :func:`mllm_ref.quant.affine.unpack`."""
    packed = np.asarray(packed)
    if packed.dtype != np.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    if packed.ndim < 1:
        raise ValueError("packed must have at least one axis")
    bits = ref._checks.choice(bits, "bits", ref.PACK_BITS)
    n = ref._checks.integer(n, "n", low=0)
    if packed.shape[-1] != ref.packed_length(n, bits):
        raise ValueError(f"packed must hold ceil({n} * {bits} / 8) = {ref.packed_length(n, bits)} bytes per row, "
                         f"got {packed.shape[-1]}")  # fmt: skip
    if bits == 8:
        return packed.copy()
    lead = packed.shape[:-1]
    flat = np.ascontiguousarray(packed).reshape(int(np.prod(lead, dtype=np.int64)), packed.shape[-1])
    out = np.empty((flat.shape[0], n), dtype=np.uint8)
    _unpack_kernel(flat, bits, n, out)
    return out.reshape(lead + (n,))
