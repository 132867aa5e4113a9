"""Torch fast path of :mod:`mllm_ref.quant.affine`: affine quantization with torch tensor operations (CPU).

``x`` is viewed as ``[A, G, g, B]`` (the axes before the quantization axis, its groups, the group, the axes after it;
per tensor ``[1, 1, size, 1]``) and reduced over the group dimension. The float operations are the reference's, in
``x``'s precision: ``amin``/``amax`` (and ``abs`` for the symmetric form), the 0-inclusion of the integer form, one
true division for the step by the typed constant, ``Δ = 1`` for an empty range, the true division ``x / Δ`` and
``torch.round``, which rounds half to even like ``np.rint``. Codes, steps and zero points therefore agree bit for bit
with the reference for float32 and float64. float16 input is handed to the reference (torch's CPU half arithmetic is
not guaranteed to round as NumPy's float16 loops do).

:func:`pack` and :func:`unpack` use the reference's little-endian bit stream (bits expanded, then summed eight at a
time).
"""

from __future__ import annotations

import numpy as np
import torch

from mllm_ref.quant import affine as ref


def quantize(x, bits: int = 8, *, symmetric: bool = False, axis: int | None = None, group_size: int | None = None,
             zero_point: str = "integer"):  # fmt: skip
    """Same contract as :func:`mllm_ref.quant.affine.quantize`."""
    x, bits, symmetric, ax, g, zp = ref._validate(x, bits, symmetric, axis, group_size, zero_point)
    if x.dtype == np.float16:
        return ref.quantize(x, bits, symmetric=symmetric, axis=axis, group_size=group_size, zero_point=zero_point)
    out_dtype = x.dtype
    shape = x.shape
    xc = np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("="))
    if not xc.flags.writeable:  # torch shares the memory and wants it writable
        xc = xc.copy()
    if ax is None:
        a, n, b = 1, xc.size, 1
    else:
        a, n, b = int(np.prod(shape[:ax], dtype=np.int64)), shape[ax], int(np.prod(shape[ax + 1 :], dtype=np.int64))
    t = torch.from_numpy(xc).reshape(a, n // g, g, b)
    tdt = t.dtype
    qmin, qmax = ref.code_range(bits, symmetric)
    one = torch.ones((), dtype=tdt)
    pshape = ref._param_shape(shape, ax, g)
    if symmetric:
        amax = t.abs().amax(dim=2, keepdim=True)
        step = amax / torch.tensor(float(qmax), dtype=tdt)
        step = torch.where(step > 0, step, one)
        q = torch.clamp(torch.round(t / step), qmin, qmax).to(torch.int8)
        zero = np.zeros(pshape, dtype=np.int8)
    elif zp == "integer":
        zt = torch.zeros((), dtype=tdt)
        lo = torch.minimum(t.amin(dim=2, keepdim=True), zt)
        hi = torch.maximum(t.amax(dim=2, keepdim=True), zt)
        step = (hi - lo) / torch.tensor(float(qmax - qmin), dtype=tdt)
        step = torch.where(step > 0, step, one)
        z = torch.clamp(qmin - torch.round(lo / step), qmin, qmax)
        q = torch.clamp(torch.round(t / step) + z, qmin, qmax).to(torch.uint8)
        zero = z.to(torch.uint8).numpy().reshape(pshape)
    else:
        lo = t.amin(dim=2, keepdim=True)
        hi = t.amax(dim=2, keepdim=True)
        step = (hi - lo) / torch.tensor(float(qmax), dtype=tdt)
        step = torch.where(step > 0, step, one)
        q = torch.clamp(torch.round((t - lo) / step), 0, qmax).to(torch.uint8)
        zero = lo.numpy().reshape(pshape).astype(out_dtype, copy=False)
    codes = q.numpy().reshape(shape)
    scale = step.numpy().reshape(pshape).astype(out_dtype, copy=False)
    return codes, scale, zero


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
    c = torch.from_numpy(np.ascontiguousarray(codes).reshape(int(np.prod(lead, dtype=np.int64)), n).astype(np.int64))
    rows = c.shape[0]
    nbytes = ref.packed_length(n, bits)
    stream = ((c.unsqueeze(-1) >> torch.arange(bits)) & 1).reshape(rows, n * bits)
    stream = torch.nn.functional.pad(stream, (0, nbytes * 8 - n * bits))
    out = (stream.reshape(rows, nbytes, 8) << torch.arange(8)).sum(-1).to(torch.uint8)
    return out.numpy().reshape(lead + (nbytes,))


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
    lead, nbytes = packed.shape[:-1], packed.shape[-1]
    rows = int(np.prod(lead, dtype=np.int64))
    p = torch.from_numpy(np.ascontiguousarray(packed).reshape(rows, nbytes).astype(np.int64))
    stream = ((p.unsqueeze(-1) >> torch.arange(8)) & 1).reshape(rows, nbytes * 8)[:, : n * bits]
    codes = (stream.reshape(rows, n, bits) << torch.arange(bits)).sum(-1).to(torch.uint8)
    return codes.numpy().reshape(lead + (n,))
