"""Affine (uniform) quantization: per tensor, per channel, per group; symmetric and asymmetric; bit packing.

Paper: Benoit Jacob, Skirmantas Kligys, Bo Chen, Menglong Zhu, Matthew Tang, Andrew Howard, Hartwig Adam and Dmitry
Kalenichenko, "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference", CVPR
2018 (arXiv:1712.05877); the group-wise form is the one of the LLM weight and KV-cache quantizers (GPTQ, AWQ,
KIVI); survey section "Quantization" of the surveys in ``shared/surveys``.

Equations. A real ``x`` is mapped to an integer code ``q`` in ``[qmin, qmax]`` with a step ``Δ > 0`` and a zero
point ``z``, and read back as ``x̂``::

    q  = clip(round(x / Δ) + z, qmin, qmax)          x̂ = Δ (q − z)

- **asymmetric** (default): ``qmin = 0``, ``qmax = 2^b − 1``. The range ``[lo, hi] = [min(m, 0), max(M, 0)]`` of
  the group (``m``, ``M`` its minimum and maximum; 0 is included so that it is exactly representable, as in PyTorch's
  observers) gives ``Δ = (hi − lo) / (qmax − qmin)`` and the integer ``z = clip(qmin − round(lo / Δ), qmin, qmax)``.
- **asymmetric with a real zero point** (``zero_point="float"``, the form of KIVI's and HQQ's kernels): the range is
  ``[m, M]`` itself, ``Δ = (M − m) / (2^b − 1)``, and the zero point is stored as the real offset ``m``:
  ``q = clip(round((x − m) / Δ), 0, 2^b − 1)``, ``x̂ = Δ q + m`` (the formula above with ``z = −m / Δ``).
- **symmetric**: ``z = 0``, codes in ``[−(2^(b−1) − 1), 2^(b−1) − 1]`` (the restricted range, so that the grid is
  symmetric about 0), ``Δ = max|x| / (2^(b−1) − 1)``.

A group whose range is empty (every value equal, for the integer forms: all zero) gets ``Δ = 1``, so that nothing
divides by zero and the values are still reproduced exactly. ``round`` is **round half to even** (``np.rint``), and
``x / Δ`` is a true division in ``x``'s precision, so that fast paths can agree bit for bit.

Granularity. ``axis=None``: one ``(Δ, z)`` for the whole tensor. ``axis=a``: elements along axis ``a`` share
parameters, one set per position of the other axes (per channel for a weight ``[out, in]`` with ``axis=1``; per token
for a KV tensor ``[.., T, d]`` with ``axis=-1``; per channel of a KV tensor with ``axis=-2``). ``group_size=g``:
consecutive groups of ``g`` elements along ``axis`` (``g`` divides the axis length) each get their own parameters.

Error bound. For ``x`` inside the representable range ``[Δ (qmin − z), Δ (qmax − z)]`` the rounding moves it by at
most half a step: ``|x − x̂| <= Δ / 2`` (up to the rounding of the division itself). Every value of the group lies
inside it by construction, except when ``round`` carries the range's far end one step beyond ``qmax`` (possible
only for the integer zero point), where the clip costs at most one step.

Packing. :func:`pack` stores codes of ``b`` in {2, 3, 4} bits densely along the last axis as a little-endian bit
stream: code ``i`` occupies bits ``[i b, (i + 1) b)`` of the stream and byte ``j`` holds stream bits
``[8 j, 8 j + 8)`` (bit 0 the lowest). ``n`` codes take ``ceil(n b / 8)`` bytes; :func:`unpack` inverts it. Signed
(symmetric) codes are packed after adding ``2^(b−1)``.

Shape legend:
    x: float array of any shape ``S`` (float16, float32 or float64), finite.
    codes: ``uint8`` (asymmetric) or ``int8`` (symmetric) of shape ``S``.
    scale, zero: ``x.ndim`` dimensions, ``S`` with ``axis`` replaced by the number of groups ``S[axis] / g``
    (all ones per tensor); ``scale`` in ``x``'s dtype; ``zero`` ``uint8`` (integer asymmetric), ``int8`` zeros
    (symmetric), or ``x``'s dtype (``zero_point="float"``).

Deviations from the paper: the paper's asymmetric zero point is nudged so that 0 maps to an integer; here it is
``qmin − round(lo / Δ)``, the same thing. The real zero point and groups along an axis follow the LLM quantizers
rather than the paper. No stochastic rounding.
"""

from __future__ import annotations

import numpy as np

from mllm_ref import _checks
from mllm_ref.oracle.registry import Technique, register

__all__ = ["quantize", "dequantize", "pack", "unpack", "code_range", "packed_length", "ZERO_POINTS"]

ZERO_POINTS = ("integer", "float")
PACK_BITS = (2, 3, 4, 8)


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """``(qmin, qmax)`` of ``bits``-bit codes: ``(0, 2^b − 1)``, or ``(−(2^(b−1) − 1), 2^(b−1) − 1)`` symmetric."""
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _validate(x, bits, symmetric, axis, group_size, zero_point, *, check_values: bool = True):
    """Entry checks shared with the fast paths; returns ``(x, bits, symmetric, axis, group_size, zero_point)`` with
    ``axis`` non-negative (or ``None``) and ``group_size`` resolved to the group length."""
    x = _checks.float_array(x, "x", allow_empty=False, allow_nonfinite=not check_values)
    bits = _checks.integer(bits, "bits", low=2, high=8)
    if not isinstance(symmetric, (bool, np.bool_)):
        raise TypeError(f"symmetric must be a bool, got {type(symmetric).__name__}")
    symmetric = bool(symmetric)
    zero_point = _checks.choice(zero_point, "zero_point", ZERO_POINTS)
    if symmetric and zero_point == "float":
        raise ValueError("zero_point='float' is an asymmetric form; symmetric quantization has z = 0")
    if axis is None:
        if group_size is not None:
            raise ValueError("group_size needs an axis to group along (axis is None: one scale per tensor)")
        return x, bits, symmetric, None, int(x.size), zero_point
    axis = _checks.integer(axis, "axis")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis ({axis}) must index one of the {x.ndim} axes of x (shape {x.shape})")
    axis %= x.ndim
    n = x.shape[axis]
    if group_size is None:
        return x, bits, symmetric, axis, n, zero_point
    group_size = _checks.integer(group_size, "group_size", low=1)
    if n % group_size:
        raise ValueError(f"group_size ({group_size}) must divide the length of axis {axis} of x ({n})")
    return x, bits, symmetric, axis, group_size, zero_point


def _grouped(x: np.ndarray, axis: int | None, g: int) -> np.ndarray:
    """``x`` as ``[..., G, g]``: the quantization axis moved last and split into groups."""
    if axis is None:
        return x.reshape(1, 1, -1)
    xm = np.moveaxis(x, axis, -1)
    return xm.reshape(xm.shape[:-1] + (xm.shape[-1] // g, g))


def _param_shape(shape: tuple, axis: int | None, g: int) -> tuple:
    if axis is None:
        return (1,) * len(shape)
    out = list(shape)
    out[axis] = shape[axis] // g
    return tuple(out)


def _ungroup(a: np.ndarray, shape: tuple, axis: int | None) -> np.ndarray:
    """Inverse of :func:`_grouped` for an array of ``x``'s shape in grouped layout."""
    if axis is None:
        return a.reshape(shape)
    moved = tuple(np.delete(np.array(shape), axis)) + (shape[axis],)
    return np.moveaxis(a.reshape(moved), -1, axis)


def _params_to_grouped(p: np.ndarray, axis: int | None) -> np.ndarray:
    """A ``scale``/``zero`` array (``x.ndim`` dims) as ``[..., G, 1]`` matching :func:`_grouped`."""
    if axis is None:
        return p.reshape(1, 1, 1)
    return np.moveaxis(p, axis, -1)[..., None]


def quantize(x, bits: int = 8, *, symmetric: bool = False, axis: int | None = None, group_size: int | None = None,
             zero_point: str = "integer"):  # fmt: skip
    """Quantize ``x`` to ``bits``-bit codes with one ``(Δ, z)`` per group (module docstring).

    Args:
        x: float array, finite, not empty.
        bits: 2 .. 8.
        symmetric: ``z = 0`` and signed codes (restricted range).
        axis: ``None`` per tensor; else the axis along which elements share parameters.
        group_size: ``None`` (the whole axis) or a divisor of ``x.shape[axis]``.
        zero_point: ``"integer"`` (``z`` an integer code) or ``"float"`` (the group minimum as a real offset).

    Returns:
        ``(codes, scale, zero)``: ``codes`` of ``x``'s shape (``uint8``, or ``int8`` symmetric); ``scale`` and
        ``zero`` of shape ``x.shape`` with ``axis`` replaced by the group count (see the shape legend).
    """
    x, bits, symmetric, axis, g, zero_point = _validate(x, bits, symmetric, axis, group_size, zero_point)
    qmin, qmax = code_range(bits, symmetric)
    dt = x.dtype.type
    xg = _grouped(x, axis, g)
    one = dt(1)
    if symmetric:
        amax = np.max(np.abs(xg), axis=-1, keepdims=True)
        scale = amax / dt(qmax)
        scale = np.where(scale > 0, scale, one).astype(x.dtype)
        q = np.clip(np.rint(xg / scale), qmin, qmax).astype(np.int8)
        zero = np.zeros(scale.shape, dtype=np.int8)
    elif zero_point == "integer":
        lo = np.minimum(np.min(xg, axis=-1, keepdims=True), dt(0))
        hi = np.maximum(np.max(xg, axis=-1, keepdims=True), dt(0))
        scale = (hi - lo) / dt(qmax - qmin)
        scale = np.where(scale > 0, scale, one).astype(x.dtype)
        z = np.clip(qmin - np.rint(lo / scale), qmin, qmax)
        q = np.clip(np.rint(xg / scale) + z, qmin, qmax).astype(np.uint8)
        zero = z.astype(np.uint8)
    else:
        lo = np.min(xg, axis=-1, keepdims=True)
        hi = np.max(xg, axis=-1, keepdims=True)
        scale = (hi - lo) / dt(qmax)
        scale = np.where(scale > 0, scale, one).astype(x.dtype)
        q = np.clip(np.rint((xg - lo) / scale), 0, qmax).astype(np.uint8)
        zero = lo.astype(x.dtype)
    pshape = _param_shape(x.shape, axis, g)
    scale_out = _ungroup_params(scale[..., 0], x.shape, axis, pshape)
    zero_out = _ungroup_params(zero[..., 0], x.shape, axis, pshape)
    return _ungroup(q, x.shape, axis), scale_out, zero_out


def _ungroup_params(p: np.ndarray, shape: tuple, axis: int | None, pshape: tuple) -> np.ndarray:
    if axis is None:
        return p.reshape(pshape)
    return np.ascontiguousarray(np.moveaxis(p, -1, axis)).reshape(pshape)


def _validate_dequant(codes, scale, zero, axis, group_size):
    codes = np.asarray(codes)
    if codes.dtype not in (np.uint8, np.int8):
        raise TypeError(f"codes must be uint8 or int8, got {codes.dtype}")
    if codes.size == 0:
        raise ValueError("codes must not be empty")
    scale = _checks.float_array(scale, "scale", ndim=codes.ndim)
    zero = np.asarray(zero)
    if zero.shape != scale.shape:
        raise ValueError(f"zero must have the shape of scale {scale.shape}, got {zero.shape}")
    if axis is None:
        if group_size is not None:
            raise ValueError("group_size needs an axis to group along (axis is None: one scale per tensor)")
        g = codes.size
    else:
        axis = _checks.integer(axis, "axis")
        if not -codes.ndim <= axis < codes.ndim:
            raise ValueError(f"axis ({axis}) must index one of the {codes.ndim} axes of codes (shape {codes.shape})")
        axis %= codes.ndim
        g = codes.shape[axis] if group_size is None else _checks.integer(group_size, "group_size", low=1)
        if codes.shape[axis] % g:
            raise ValueError(f"group_size ({g}) must divide the length of axis {axis} of codes ({codes.shape[axis]})")
    expected = _param_shape(codes.shape, axis, g)
    if scale.shape != expected:
        raise ValueError(f"scale must have shape {expected} for codes {codes.shape}, axis {axis}, group {g}; "
                         f"got {scale.shape}")  # fmt: skip
    if np.issubdtype(zero.dtype, np.floating):
        _checks.same_dtype("scale", scale, "zero", zero)
    elif not np.issubdtype(zero.dtype, np.integer):
        raise TypeError(f"zero must be an integer or float array, got {zero.dtype}")
    return codes, scale, zero, axis, g


def dequantize(codes, scale, zero, *, axis: int | None = None, group_size: int | None = None) -> np.ndarray:
    """``x̂ = Δ (q − z)`` (integer ``zero``) or ``x̂ = Δ q + m`` (float ``zero``), in ``scale``'s dtype.

    Args:
        codes, scale, zero: as :func:`quantize` returned them.
        axis, group_size: as given to :func:`quantize`.
    """
    codes, scale, zero, axis, g = _validate_dequant(codes, scale, zero, axis, group_size)
    dt = scale.dtype
    qg = _grouped(codes, axis, g)
    sg = _params_to_grouped(scale, axis)
    zg = _params_to_grouped(zero, axis)
    if np.issubdtype(zero.dtype, np.floating):
        out = qg.astype(dt) * sg + zg
    else:
        out = (qg.astype(dt) - zg.astype(dt)) * sg
    return _ungroup(out.astype(dt), codes.shape, axis)


def packed_length(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take packed: ``ceil(n * bits / 8)``."""
    return -(-int(n) * int(bits) // 8)


def pack(codes, bits: int) -> np.ndarray:
    """Pack unsigned ``bits``-bit codes densely along the last axis (little-endian bit stream, module docstring).

    Args:
        codes: ``uint8[..., n]``, every code ``< 2^bits``.
        bits: 2, 3, 4 or 8 (8: a copy).

    Returns:
        ``uint8[..., ceil(n * bits / 8)]``.
    """
    codes = np.asarray(codes)
    if codes.dtype != np.uint8:
        raise TypeError(f"codes must be uint8 (add 2^(bits-1) to signed codes first), got {codes.dtype}")
    if codes.ndim < 1:
        raise ValueError("codes must have at least one axis (codes are packed along the last)")
    bits = _checks.choice(bits, "bits", PACK_BITS)
    if codes.size and int(codes.max()) >= 2**bits:
        raise ValueError(f"codes must be < 2^bits = {2**bits}, got a code {int(codes.max())}")
    if bits == 8:
        return codes.copy()
    n = codes.shape[-1]
    stream = ((codes[..., None] >> np.arange(bits, dtype=np.uint8)) & 1).astype(np.uint8)
    stream = stream.reshape(codes.shape[:-1] + (n * bits,))
    return np.packbits(stream, axis=-1, bitorder="little")


def unpack(packed, bits: int, n: int) -> np.ndarray:
    """The ``n`` codes of ``bits`` bits in each row of ``packed`` (the inverse of :func:`pack`).

    Args:
        packed: ``uint8[..., ceil(n * bits / 8)]``.
        bits: 2, 3, 4 or 8.
        n: codes per row, >= 0.

    Returns:
        ``uint8[..., n]``.
    """
    packed = np.asarray(packed)
    if packed.dtype != np.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    if packed.ndim < 1:
        raise ValueError("packed must have at least one axis")
    bits = _checks.choice(bits, "bits", PACK_BITS)
    n = _checks.integer(n, "n", low=0)
    if packed.shape[-1] != packed_length(n, bits):
        raise ValueError(f"packed must hold ceil({n} * {bits} / 8) = {packed_length(n, bits)} bytes per row, got "
                         f"{packed.shape[-1]}")  # fmt: skip
    if bits == 8:
        return packed.copy()
    stream = np.unpackbits(packed, axis=-1, bitorder="little")[..., : n * bits]
    stream = stream.reshape(packed.shape[:-1] + (n, bits)).astype(np.uint8)
    return np.sum(stream << np.arange(bits, dtype=np.uint8), axis=-1, dtype=np.uint8)


# ----------------------------------------------------------------------------------------------- registration
_SIZES = {
    # name: (shape, bits, symmetric, axis, group_size, zero_point, dtype)
    "tensor-8": ((5, 7), 8, False, None, None, "integer", np.float32),
    "channel-4": ((6, 16), 4, False, 1, None, "integer", np.float32),
    "group-2": ((3, 4, 32), 2, False, -1, 8, "integer", np.float64),
    "group-3-sym": ((4, 24), 3, True, 1, 8, "integer", np.float32),
    "token-4-float": ((2, 9, 32), 4, False, -1, 16, "float", np.float32),
    "channel-2-float": ((2, 32, 8), 2, False, -2, 16, "float", np.float32),
    "sym-8": ((17,), 8, True, 0, None, "integer", np.float64),
    "bench-weight": ((4096, 4096), 4, False, 1, 128, "integer", np.float32),
    "bench-kv": ((32, 4096, 128), 2, False, -1, 32, "float", np.float32),
}


def _case(size: str, rng: np.random.Generator) -> dict:
    shape, bits, sym, axis, g, zp, dt = _SIZES[size]
    x = rng.standard_normal(shape) * np.exp(rng.uniform(-3, 3, shape[-1:]))  # channels of different magnitude
    if x.ndim > 1:
        x = x + rng.standard_normal(shape[-1:]) * 2  # and offsets, where asymmetric ranges help
    return {"x": x.astype(dt), "bits": bits, "symmetric": sym, "axis": axis, "group_size": g, "zero_point": zp}


def _strategy():
    """Hypothesis cases: shapes of 1 to 3 axes, per tensor / channel / group, the three forms, bits 2 to 8, float32
    and float64, with ties (values on half steps) and constant groups drawn on purpose."""
    from hypothesis import strategies as st

    @st.composite
    def cases(draw):
        ndim = draw(st.integers(1, 3))
        shape = tuple(draw(st.integers(1, 4)) * draw(st.sampled_from([1, 2, 4])) for _ in range(ndim))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        dt = draw(st.sampled_from([np.float32, np.float64]))
        x = rng.standard_normal(shape) * 10.0 ** draw(st.integers(-3, 3)) + draw(st.sampled_from([0.0, 0.0, 3.0]))
        kind = draw(st.sampled_from(["normal", "halves", "constant"]))
        if kind == "halves":
            x = np.round(x * 4) / 4
        elif kind == "constant":
            x = np.full(shape, x.flat[0])
        sym = draw(st.booleans())
        zp = "integer" if sym else draw(st.sampled_from(ZERO_POINTS))
        axis = draw(st.sampled_from([None] + list(range(-ndim, ndim))))
        g = None
        if axis is not None:
            n = shape[axis]
            g = draw(st.sampled_from([None] + [d for d in range(1, n + 1) if n % d == 0]))
        return {"x": x.astype(dt), "bits": draw(st.integers(2, 8)), "symmetric": sym, "axis": axis,
                "group_size": g, "zero_point": zp}  # fmt: skip

    return cases()


def _cost(kw: dict) -> dict:
    x = kw["x"]
    return {"flops": float(4 * x.size), "bytes": float(x.nbytes + x.size)}


register(
    Technique(
        id="quant.affine",
        reference=quantize,
        make_case=_case,
        paper=(
            "B. Jacob, S. Kligys, B. Chen, M. Zhu, M. Tang, A. Howard, H. Adam, D. Kalenichenko, Quantization and "
            "Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference, CVPR 2018 "
            "(arXiv 1712.05877)"
        ),
        test_sizes=("tensor-8", "channel-4", "group-2", "group-3-sym", "token-4-float", "channel-2-float", "sym-8"),
        bench_sizes=("bench-weight", "bench-kv"),
        compare="exact",
        strategy=_strategy,
        cost=_cost,
        chapter="book/04-kv-cache.md",
        notes="round half to even; integer zero point (0 in range) or KIVI's real zero point; 2-8 bits; packing of "
        "2/3/4-bit codes as a little-endian bit stream",
    )
)
