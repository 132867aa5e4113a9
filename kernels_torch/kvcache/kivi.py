"""torch fast path of :mod:`mllm_ref.kvcache.kivi`: KIVI's prefill quantization (same signature, NumPy in and out).

The same arithmetic as :func:`mllm_ref.quant.affine.quantize` with ``zero_point="float"`` (``Δ = (M - m)/(2^b - 1)``,
``Δ = 1`` for a constant group, codes ``clip(round_half_even((x - m)/Δ), 0, 2^b - 1)``), in the input's dtype, so
the codes, scales and zeros equal the reference bit for bit; the codes are packed into the same little-endian bit
stream along the channels. Keys: groups of ``G`` tokens per channel; values: groups of ``Gv`` channels per token.
"""

from __future__ import annotations

import numpy as np
import torch

from kernels_torch.nn._convert import as_tensor
from mllm_ref import _checks
from mllm_ref.kvcache.kivi import KIVICache, _check_params, _empty


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``uint8[..., n]`` codes -> ``uint8[..., ceil(n bits / 8)]``, code ``i`` at bit ``i * bits`` (LSB first)."""
    *lead, n = codes.shape
    if 8 % bits == 0:  # whole codes per byte: shift and add
        per = 8 // bits
        c = codes.to(torch.int32)
        if n % per:
            c = torch.nn.functional.pad(c, (0, per - n % per))
        c = c.reshape(*lead, -1, per) << (torch.arange(per, dtype=torch.int32) * bits)
        return c.sum(-1).to(torch.uint8)
    bitpos = torch.arange(bits, dtype=torch.int32)
    stream = ((codes.to(torch.int32)[..., None] >> bitpos) & 1).reshape(*lead, n * bits)
    pad = (-n * bits) % 8
    if pad:
        stream = torch.nn.functional.pad(stream, (0, pad))
    stream = stream.reshape(*lead, -1, 8)
    return (stream << torch.arange(8, dtype=torch.int32)).sum(-1).to(torch.uint8)


def _quant(xg: torch.Tensor, bits: int, dim: int):
    """Asymmetric quantization of ``xg`` with the groups along ``dim`` (float zero point)."""
    lo = xg.amin(dim=dim, keepdim=True)
    hi = xg.amax(dim=dim, keepdim=True)
    qmax = (1 << bits) - 1
    scale = (hi - lo) / torch.tensor(float(qmax), dtype=xg.dtype)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round((xg - lo) / scale), 0, qmax).to(torch.uint8)
    return q, scale.squeeze(dim), lo.squeeze(dim)


def kivi_quantize(k: np.ndarray, v: np.ndarray, bits: int = 2, group_size: int = 32, residual: int = 128,
                  value_group_size: int | None = None) -> KIVICache:  # fmt: skip
    k = _checks.float_array(k, "k", ndim=3, allow_empty=True)
    v = _checks.float_array(v, "v", ndim=3, allow_empty=True)
    _checks.same_dtype("k", k, "v", v)
    if k.shape != v.shape:
        raise ValueError(f"v must have k's shape {k.shape}, got {v.shape}")
    hkv, t, d = k.shape
    if hkv == 0 or d == 0:
        raise ValueError(f"k must have at least one head and channel, got shape {k.shape}")
    bits, g, r, gv = _check_params(bits, group_size, residual, value_group_size, d)
    kc, ks, kz, vc, vs, vz = _empty(hkv, d, bits, gv, k.dtype)
    nk = t - t % r
    if nk:
        kt = as_tensor(np.ascontiguousarray(k[:, :nk])).reshape(hkv, nk // g, g, d)
        q, s, z = _quant(kt, bits, 2)
        kc, ks, kz = _pack(q.reshape(hkv, nk, d), bits).numpy(), s.numpy(), z.numpy()
    nv = max(t - r, 0)
    if nv:
        vt = as_tensor(np.ascontiguousarray(v[:, :nv])).reshape(hkv, nv, d // gv, gv)
        q, s, z = _quant(vt, bits, 3)
        vc, vs, vz = _pack(q.reshape(hkv, nv, d), bits).numpy(), s.numpy(), z.numpy()
    return KIVICache(kc, ks, kz, k[:, nk:].copy(), vc, vs, vz, v[:, nv:].copy(), bits, g, r, gv)
