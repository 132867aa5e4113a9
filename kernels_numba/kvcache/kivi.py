"""Numba fast path of :mod:`mllm_ref.kvcache.kivi`: KIVI's prefill quantization, keys and values in one pass each.

Keys: for every head, group of ``G`` tokens and channel, the minimum and maximum over the group's tokens, the step
``Δ = (M − m) / (2^b − 1)`` (1 for an empty range) and the codes, written straight into each token's packed row
(little-endian bit stream along the channels, as :func:`mllm_ref.quant.affine.pack`). Values: per token, in groups
of ``Gv`` channels, with the kernel of :mod:`kernels_numba.kvcache.quant_token`. The reference's float operations in
the input's precision, so codes, steps and minima agree bit for bit. float16 input goes to the reference.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from kernels_numba.kvcache.quant_token import _kernel as _per_token
from mllm_ref import _checks
from mllm_ref.kvcache import kivi as ref
from mllm_ref.kvcache.kivi import KIVICache, _check_params, _empty
from mllm_ref.quant.affine import packed_length


@njit(cache=True)
def _keys(k, g, bits, qmax, one, packed, scale, zero):
    """``k[H, n, d]`` per channel over groups of ``g`` tokens -> packed ``[H, n, nb]``, scale/zero ``[H, n/g, d]``."""
    h, n, d = k.shape
    for a in range(h):
        for t in range(n):
            for j in range(packed.shape[2]):
                packed[a, t, j] = 0
        for grp in range(n // g):
            t0 = grp * g
            for c in range(d):
                lo = k[a, t0, c]
                hi = lo
                for t in range(t0 + 1, t0 + g):
                    x = k[a, t, c]
                    if x < lo:
                        lo = x
                    if x > hi:
                        hi = x
                step = (hi - lo) / qmax
                if not step > 0:
                    step = one
                scale[a, grp, c] = step
                zero[a, grp, c] = lo
                off = c * bits
                byte = off >> 3
                sh = off & 7
                for t in range(t0, t0 + g):
                    q = np.rint((k[a, t, c] - lo) / step)
                    if q < 0:
                        q = 0
                    if q > qmax:
                        q = qmax
                    code = np.int64(q)
                    packed[a, t, byte] |= np.uint8((code << sh) & 0xFF)
                    if sh + bits > 8:
                        packed[a, t, byte + 1] |= np.uint8(code >> (8 - sh))


def kivi_quantize(k: np.ndarray, v: np.ndarray, bits: int = 2, group_size: int = 32, residual: int = 128,
                  value_group_size: int | None = None) -> KIVICache:  # fmt: skip
    """Same contract as :func:`mllm_ref.kvcache.kivi.kivi_quantize`."""
    k = _checks.float_array(k, "k", ndim=3, allow_empty=True)
    v = _checks.float_array(v, "v", ndim=3, allow_empty=True)
    _checks.same_dtype("k", k, "v", v)
    if k.shape != v.shape:
        raise ValueError(f"v must have k's shape {k.shape}, got {v.shape}")
    hkv, t, d = k.shape
    if hkv == 0 or d == 0:
        raise ValueError(f"k must have at least one head and channel, got shape {k.shape}")
    bits, g, r, gv = _check_params(bits, group_size, residual, value_group_size, d)
    if k.dtype == np.float16:
        return ref.kivi_quantize(k, v, bits, group_size, residual, value_group_size)
    dtype = k.dtype  # the reference keeps the input's dtype, byte order included
    kn = np.ascontiguousarray(k, dtype=dtype.newbyteorder("="))
    vn = np.ascontiguousarray(v, dtype=dtype.newbyteorder("="))
    dt = kn.dtype.type
    qmax, one = dt(2**bits - 1), dt(1)
    nb = packed_length(d, bits)
    kc, ks, kz, vc, vs, vz = _empty(hkv, d, bits, gv, dtype)
    nk = t - t % r
    if nk:
        kc = np.empty((hkv, nk, nb), np.uint8)
        ks = np.empty((hkv, nk // g, d), kn.dtype)
        kz = np.empty((hkv, nk // g, d), kn.dtype)
        _keys(kn[:, :nk], g, bits, qmax, one, kc, ks, kz)
        ks, kz = ks.astype(dtype, copy=False), kz.astype(dtype, copy=False)
    nv = max(t - r, 0)
    if nv:
        flat = np.ascontiguousarray(vn[:, :nv]).reshape(hkv * nv, d)
        vc = np.zeros((hkv * nv, nb), np.uint8)
        vs = np.empty((hkv * nv, d // gv), vn.dtype)
        vz = np.empty((hkv * nv, d // gv), vn.dtype)
        _per_token(flat, gv, bits, qmax, one, vc, vs, vz)
        vc = vc.reshape(hkv, nv, nb)
        vs = vs.reshape(hkv, nv, d // gv).astype(dtype, copy=False)
        vz = vz.reshape(hkv, nv, d // gv).astype(dtype, copy=False)
    return KIVICache(kc, ks, kz, k[:, nk:].copy(), vc, vs, vz, v[:, nv:].copy(), bits, g, r, gv)
