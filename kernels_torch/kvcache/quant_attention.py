"""torch fast path of :mod:`mllm_ref.kvcache.quant_attention` (same signature, NumPy in and out).

The packed bytes are unpacked with shifts and masks into ``uint8`` codes; the scores are the per-group identity
``(q Δ) . c + q . m`` as batched matmuls over the codes, and the output ``(w Δ) c + w m`` likewise: the float
``Δ c + m`` of the cache is never formed (the codes are cast to ``q``'s dtype block by block inside the matmul
operands). Deviation from the numba path: the unpacked codes of a call exist once as ``uint8`` (a quarter of a
float32 copy).
"""

from __future__ import annotations

import numpy as np
import torch

from kernels_torch.nn._convert import as_tensor
from mllm_ref.kvcache.quant_attention import _validate


def _unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Little-endian bit stream (as :func:`mllm_ref.quant.affine.pack`) -> ``uint8[..., n]``."""
    off = torch.arange(n) * bits
    byte, sh = off // 8, (off % 8).to(torch.int32)
    lo = packed[..., byte].to(torch.int32) >> sh
    nxt = torch.clamp(byte + 1, max=packed.shape[-1] - 1)
    hi = torch.where(sh + bits > 8, packed[..., nxt].to(torch.int32) << (8 - sh), torch.zeros_like(lo))
    return ((lo | hi) & ((1 << bits) - 1)).to(torch.uint8)


def quant_attention(q, k_codes, k_scale, k_zero, k_full, v_codes, v_scale, v_zero, v_full, k_new=None, v_new=None,
                    bits: int = 2, scale: float | None = None) -> np.ndarray:  # fmt: skip
    (q, kc, ks, kz, kf, vc, vs, vz, vf, kn, vn, bits, scale) = _validate(
        q, k_codes, k_scale, k_zero, k_full, v_codes, v_scale, v_zero, v_full, k_new, v_new, bits, scale)
    t = as_tensor
    dt = torch.float64 if q.dtype == np.float64 else torch.float32
    h, _, d = q.shape
    hkv, tkq = kc.shape[:2]
    dv = vf.shape[2]
    grp = h // hkv
    qg = t(np.ascontiguousarray(q[:, 0, :])).to(dt).reshape(hkv, grp, d)
    parts = []
    if tkq:
        nkg = ks.shape[1]
        ck = _unpack(t(kc), bits, d).reshape(hkv, nkg, tkq // nkg, d)
        ksd, kzd = t(ks).to(dt), t(kz).to(dt)
        a = qg[:, :, None, :] * ksd[:, None, :, :]  # [Hkv, g, nkg, d]
        bias = torch.einsum("kjc,kgc->kjg", qg, kzd)
        s = torch.einsum("kjgc,kgtc->kjgt", a, ck.to(dt)) + bias[..., None]
        parts.append(s.reshape(hkv, grp, tkq))
    parts.append(torch.einsum("kjc,ktc->kjt", qg, t(kf).to(dt)))
    if kn is not None:
        parts.append(torch.einsum("kjc,ktc->kjt", qg, t(kn).to(dt)))
    w = torch.softmax(torch.cat(parts, dim=-1) * scale, dim=-1)
    tvq = vc.shape[1]
    out = torch.zeros((hkv, grp, dv), dtype=dt)
    if tvq:
        nvg = vs.shape[2]
        cv = _unpack(t(vc), bits, dv).reshape(hkv, tvq, nvg, dv // nvg)
        wq = w[..., :tvq]
        ws = wq[..., None] * t(vs).to(dt)[:, None]  # [Hkv, g, Tvq, nvg]
        out += torch.einsum("kjte,ktec->kjec", ws, cv.to(dt)).reshape(hkv, grp, dv)
        out += torch.einsum("kjt,kte->kje", wq, t(vz).to(dt)).repeat_interleave(dv // nvg, dim=-1)
    vfull = t(vf).to(dt) if vn is None else torch.cat([t(vf).to(dt), t(vn).to(dt)], dim=1)
    out += torch.einsum("kjt,ktc->kjc", w[..., tvq:], vfull)
    return out.reshape(h, 1, dv).numpy().astype(q.dtype)
