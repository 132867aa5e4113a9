"""A vectorisable ``exp`` for Numba kernels (private helper of :mod:`kernels_numba.nn`).

Numba compiles ``np.exp``/``math.exp`` on a scalar to a call into libm, which LLVM cannot vectorise (this Numba is
not built with SVML): about 1.9 ns per element against about 0.17 ns for the inlined polynomial below, measured
on this machine (PERF-NOTES.md, "Numba codegen traps"). :func:`exp` is inlined into the caller's loop.

float32 method (Cody-Waite range reduction)::

    n = floor(x log2(e) + 1/2)
    r = x - n ln2_hi - n ln2_lo          in [-ln2/2, ln2/2], with two explicit FMAs (see below)
    exp(r) ~ 1 + r + r^2/2! + ... + r^7/7!         (Horner; truncation error < 6e-9 relative)
    exp(x) = exp(r) * 2^n                          (2^n built from its IEEE-754 bits)

``ln2_hi`` has few significant bits, so ``n * ln2_hi`` is exact, and ``ln2_lo`` carries the rest of ln 2. The two
steps are explicit ``llvm.fma`` calls, so ``fastmath`` reassociation in the calling kernel cannot merge them back
into one rounded ``n * ln2`` (which would cost several ulps for large |x|). Measured: within 1.5 float32 ulps of
the true value on [-87.3, 88].

Range: inputs below -87.3 return exactly 0 (the true value is below 1.2e-38, the smallest normal float32); inputs
above 88 are clamped to 88 (the kernels only call it with x <= 0). float64 arguments use ``math.exp`` (libm):
accuracy comes first in double precision, which is not the speed target.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693145751953125)  # 0x3f317200: ln 2 with its low 12 bits cleared
_LN2_LO = np.float32(1.428606765330187e-06)  # ln 2 - _LN2_HI
_LOW = np.float32(-87.3)
_HIGH = np.float32(88.0)


@intrinsic
def _fma32(typingctx, a, b, c):
    """``a * b + c`` with one rounding (llvm.fma.f32)."""
    if not (a == types.float32 and b == types.float32 and c == types.float32):
        return None
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return sig, codegen


@intrinsic
def _pow2_32(typingctx, n):
    """``2**n`` for a float32 ``n`` holding an integer in [-126, 127], built from the exponent bits."""
    if n != types.float32:
        return None
    sig = types.float32(types.float32)

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        k = builder.fptosi(args[0], i32)  # int32 arithmetic kept in 32 bits (Numba would widen to int64)
        k = builder.add(k, ir.Constant(i32, 127))
        k = builder.shl(k, ir.Constant(i32, 23))
        return builder.bitcast(k, ir.FloatType())

    return sig, codegen


@njit(fastmath=True)
def _exp32(x):
    xc = x if x > _LOW else _LOW
    xc = xc if xc < _HIGH else _HIGH
    n = np.floor(xc * _LOG2E + np.float32(0.5))
    r = _fma32(-n, _LN2_HI, xc)
    r = _fma32(-n, _LN2_LO, r)
    p = np.float32(1.0 / 5040.0)
    p = p * r + np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    y = p * _pow2_32(n)
    return y if x > _LOW else np.float32(0.0)


def exp(x):
    """``exp(x)``; inside Numba code it dispatches on the argument type (see the module docstring)."""
    return np.exp(x)


@overload(exp)
def _exp_overload(x):
    if x == types.float32:
        return lambda x: _exp32(x)
    if x == types.float64:
        return lambda x: math.exp(x)
    return None


@njit(cache=True)
def exp_array(x):
    """Elementwise :func:`exp` of a 1-D float array (used by the tests of this helper)."""
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = exp(x[i])
    return out
