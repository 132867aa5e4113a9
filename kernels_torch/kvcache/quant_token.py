"""Torch fast path of :mod:`mllm_ref.kvcache.quant_token`: per-token quantization with torch tensor operations.

The same float operations as the reference in the input's precision (``amin``/``amax`` per group, one true
division for the step, ``torch.round``, which rounds half to even like ``np.rint``), so the codes, steps and minima
agree bit for bit; the codes are packed with the reference's little-endian bit order (bits expanded, then summed
eight at a time). float16 input is handed to the reference (its CPU arithmetic differs).
"""

from __future__ import annotations

import numpy as np
import torch

from mllm_ref.kvcache import quant_token as ref


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``int64[n, d]`` codes -> ``uint8[n, ceil(d bits / 8)]`` (code i in stream bits [i b, (i+1) b))."""
    n, d = codes.shape
    if 8 % bits == 0 and d * bits % 8 == 0:  # whole codes per byte: shift and add (code i of a byte at bits i b)
        per = 8 // bits
        return (codes.reshape(n, d // per, per) << torch.arange(0, 8, bits, dtype=codes.dtype)).sum(-1).to(torch.uint8)
    stream = (codes.unsqueeze(-1) >> torch.arange(bits)) & 1  # [n, d, bits]
    stream = stream.reshape(n, d * bits)
    nbytes = -(-d * bits // 8)
    stream = torch.nn.functional.pad(stream, (0, nbytes * 8 - d * bits))
    return (stream.reshape(n, nbytes, 8) << torch.arange(8)).sum(-1).to(torch.uint8)


def quant_token(x: np.ndarray, bits: int = 4, group_size: int | None = None):
    """Same contract as :func:`mllm_ref.kvcache.quant_token.quant_token`."""
    x, bits, g = ref._check(x, bits, group_size)
    if x.dtype == np.float16:
        return ref.quant_token(x, bits, group_size)
    lead, d = x.shape[:-1], x.shape[-1]
    out_dtype = x.dtype  # the reference returns the input's dtype, byte order included
    x = np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("="))
    if not x.flags.writeable:  # torch shares the memory and wants it writable
        x = x.copy()
    t = torch.from_numpy(x.reshape(-1, d // g, g))
    lo = t.amin(dim=-1, keepdim=True)
    hi = t.amax(dim=-1, keepdim=True)
    step = (hi - lo) / torch.tensor(2**bits - 1, dtype=t.dtype)
    step = torch.where(step > 0, step, torch.ones((), dtype=t.dtype))
    codes = torch.clamp(torch.round((t - lo) / step), 0, 2**bits - 1).to(torch.int32).reshape(-1, d)
    packed = _pack(codes, bits).numpy()
    shape = lead + (d // g,)
    return (packed.reshape(lead + (packed.shape[1],)), step[..., 0].numpy().reshape(shape).astype(out_dtype),
            lo[..., 0].numpy().reshape(shape).astype(out_dtype))  # fmt: skip
