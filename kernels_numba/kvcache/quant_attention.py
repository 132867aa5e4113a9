"""Numba fast path of :mod:`mllm_ref.kvcache.quant_attention`: decode attention read from the packed codes.

One pass per cache head: each token's packed key row is unpacked into a small buffer and dotted with the
``G``-group's pre-scaled query ``q_c Δ[g, c]`` for every query head of the GQA group (the bytes are read once for all
of them); the softmax follows; then each packed value row is unpacked once and accumulated with ``w_t Δ[t, e]``.
No dequantized copy of the cache exists. Accumulation in float64; the output in ``q``'s dtype.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from mllm_ref.kvcache.quant_attention import _validate


@njit(cache=True, inline="always")
def _unpack_row(row, bits, n, out):
    mask = (1 << bits) - 1
    for i in range(n):
        off = i * bits
        byte = off >> 3
        sh = off & 7
        val = np.int64(row[byte]) >> sh
        if sh + bits > 8:
            val |= np.int64(row[byte + 1]) << (8 - sh)
        out[i] = val & mask


@njit(cache=True)
def _kernel(q, kc, ks, kz, kf, vc, vs, vz, vf, kn, vn, has_new, bits, scale, out):
    h, d = q.shape
    hkv, tkq = kc.shape[0], kc.shape[1]
    tkf = kf.shape[1]
    tvq = vc.shape[1]
    dv = vf.shape[2]
    grp = h // hkv
    nkg = ks.shape[1]
    gk = tkq // nkg if nkg > 0 else 1
    nvg = vs.shape[2]
    gv = dv // nvg
    s_tot = tkq + tkf + (1 if has_new else 0)
    cbuf = np.empty(max(d, dv), np.float64)
    a = np.empty((grp, d), np.float64)
    bias = np.empty(grp, np.float64)
    sc = np.empty((grp, s_tot), np.float64)
    acc = np.empty((grp, dv), np.float64)
    for kh in range(hkv):
        h0 = kh * grp
        for t in range(tkq):
            if t % gk == 0:
                gi = t // gk
                for j in range(grp):
                    b = 0.0
                    for c in range(d):
                        qv = np.float64(q[h0 + j, c])
                        a[j, c] = qv * ks[kh, gi, c]
                        b += qv * kz[kh, gi, c]
                    bias[j] = b
            _unpack_row(kc[kh, t], bits, d, cbuf)
            for j in range(grp):
                s = bias[j]
                for c in range(d):
                    s += a[j, c] * cbuf[c]
                sc[j, t] = s * scale
        for t in range(tkf):
            for j in range(grp):
                s = 0.0
                for c in range(d):
                    s += np.float64(q[h0 + j, c]) * kf[kh, t, c]
                sc[j, tkq + t] = s * scale
        if has_new:
            for j in range(grp):
                s = 0.0
                for c in range(d):
                    s += np.float64(q[h0 + j, c]) * kn[kh, 0, c]
                sc[j, s_tot - 1] = s * scale
        for j in range(grp):
            m = sc[j, 0]
            for t in range(1, s_tot):
                if sc[j, t] > m:
                    m = sc[j, t]
            tot = 0.0
            for t in range(s_tot):
                e = np.exp(sc[j, t] - m)
                sc[j, t] = e
                tot += e
            for t in range(s_tot):
                sc[j, t] /= tot
            for c in range(dv):
                acc[j, c] = 0.0
        for t in range(tvq):
            _unpack_row(vc[kh, t], bits, dv, cbuf)
            for j in range(grp):
                w = sc[j, t]
                for e in range(nvg):
                    ws = w * vs[kh, t, e]
                    wz = w * vz[kh, t, e]
                    for c in range(e * gv, (e + 1) * gv):
                        acc[j, c] += ws * cbuf[c] + wz
        for t in range(vf.shape[1]):
            for j in range(grp):
                w = sc[j, tvq + t]
                for c in range(dv):
                    acc[j, c] += w * vf[kh, t, c]
        if has_new:
            for j in range(grp):
                w = sc[j, s_tot - 1]
                for c in range(dv):
                    acc[j, c] += w * vn[kh, 0, c]
        for j in range(grp):
            for c in range(dv):
                out[h0 + j, 0, c] = acc[j, c]


def quant_attention(q, k_codes, k_scale, k_zero, k_full, v_codes, v_scale, v_zero, v_full, k_new=None, v_new=None,
                    bits: int = 2, scale: float | None = None) -> np.ndarray:  # fmt: skip
    (q, kc, ks, kz, kf, vc, vs, vz, vf, kn, vn, bits, scale) = _validate(
        q, k_codes, k_scale, k_zero, k_full, v_codes, v_scale, v_zero, v_full, k_new, v_new, bits, scale)
    has_new = kn is not None
    if not has_new:
        kn = np.zeros((kf.shape[0], 1, kf.shape[2]), q.dtype)
        vn = np.zeros((vf.shape[0], 1, vf.shape[2]), q.dtype)
    out = np.empty((q.shape[0], 1, vf.shape[2]), q.dtype)
    c = np.ascontiguousarray
    _kernel(c(q[:, 0, :]), c(kc), c(ks), c(kz), c(kf), c(vc), c(vs), c(vz), c(vf), c(kn), c(vn), has_new, bits,
            float(scale), out)  # fmt: skip
    return out
