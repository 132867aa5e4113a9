"""Per-token quantization of a key/value tensor (the baseline KIVI compares against).

Z. Liu, J. Yuan, H. Jin, S. Zhong, Z. Xu, V. Braverman, B. Chen, X. Hu, "KIVI: A Tuning-Free Asymmetric 2bit
Quantization for KV Cache", ICML 2024 (arXiv 2402.02750), section 3 ("per-token quantization", the layout of
FlexGen/Atom-style KV quantizers that KIVI shows fails for keys at 2 bits).

Each token's head vector ``x[.., t, :]`` is cut into groups of ``g`` consecutive channels; each group gets its own
real zero point ``m`` (the group minimum) and step ``Δ = (M - m) / (2^b - 1)``::

    c = clip(round((x - m) / Δ), 0, 2^b - 1)          x̂ = Δ c + m          |x - x̂| <= Δ / 2

(:func:`mllm_ref.quant.affine.quantize` with ``axis=-1``, ``zero_point="float"``: round half to even, a constant
group gets ``Δ = 1``). The codes are packed along the channel axis (:func:`mllm_ref.quant.affine.pack`).

Shapes: ``x`` float ``[.., T, d]``; returns packed codes ``uint8[.., T, ceil(d b / 8)]``, ``scale`` and ``zero`` in
``x``'s dtype ``[.., T, d / g]``.

The tiny-VLM plug :class:`QuantTokenKV` quantizes every cached key and value this way (no full-precision window):
the plain per-token baseline of the KIVI paper.

Deviations from the paper: none in the quantizer (KIVI's ``quant_and_pack_vcache`` is the same arithmetic); the
packing is a little-endian bit stream in bytes rather than KIVI's int32 words.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mllm_ref import _checks
from mllm_ref.oracle.registry import Technique, register
from mllm_ref.quant import affine
from mllm_ref.tinyvlm.plugs import KVPolicy, Plugs

BITS = (2, 3, 4, 8)


def _check(x, bits, group_size):
    x = _checks.float_array(x, "x", min_ndim=2)
    bits = _checks.integer(bits, "bits")
    _checks.choice(bits, "bits", BITS)
    d = x.shape[-1]
    g = d if group_size is None else _checks.integer(group_size, "group_size", low=1)
    if d % g:
        raise ValueError(f"group_size must divide the head size {d} (the last axis of x), got {g}")
    return x, bits, g


def quant_token(x: np.ndarray, bits: int = 4, group_size: int | None = None):
    """Per-token asymmetric quantization of ``x[.., T, d]`` in groups of ``group_size`` channels (None: all ``d``).

    Returns:
        ``(codes, scale, zero)``: packed ``uint8[.., T, ceil(d bits / 8)]``, ``scale`` and ``zero`` ``[.., T, d/g]``
        in ``x``'s dtype.
    """
    x, bits, g = _check(x, bits, group_size)
    codes, scale, zero = affine.quantize(x, bits, axis=-1, group_size=g, zero_point="float")
    return affine.pack(codes, bits), scale, zero


def dequant_token(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int, d: int) -> np.ndarray:
    """Inverse of :func:`quant_token`: ``x̂[.., T, d]`` in ``scale``'s dtype."""
    c = affine.unpack(codes, bits, d)
    g = d // scale.shape[-1]
    return affine.dequantize(c, scale, zero, axis=-1, group_size=g)


# ------------------------------------------------------------------------------------------- the tiny VLM plug
@dataclass(frozen=True)
class TokenQuantCache:
    """One layer's per-token-quantized cache: packed codes ``uint8[Hkv, S, nb]``, scales/zeros ``[Hkv, S, d/g]``."""

    k_codes: np.ndarray
    k_scale: np.ndarray
    k_zero: np.ndarray
    v_codes: np.ndarray
    v_scale: np.ndarray
    v_zero: np.ndarray
    d: int


class QuantTokenKV(KVPolicy):
    """Keys and values both quantized per token to ``bits`` bits in groups of ``group`` channels."""

    name = "quant-token"

    def __init__(self, bits: int = 4, group: int = 32):
        self.bits = _checks.integer(bits, "bits")
        _checks.choice(self.bits, "bits", BITS)
        self.group = _checks.integer(group, "group", low=1)

    def _q(self, x):
        return quant_token(x, self.bits, min(self.group, x.shape[-1]))

    def store(self, layer, k, v, attn, info, *, positions, n_visual):
        return TokenQuantCache(*self._q(k), *self._q(v), int(k.shape[-1]))

    def extend(self, layer, cache, k, v, attn, *, position):
        kc, vc = self._q(k), self._q(v)
        old = (cache.k_codes, cache.k_scale, cache.k_zero, cache.v_codes, cache.v_scale, cache.v_zero)
        new = [np.concatenate([a, b], axis=1) for a, b in zip(old, kc + vc)]
        return TokenQuantCache(*new, cache.d)

    def read(self, layer, cache):
        k = dequant_token(cache.k_codes, cache.k_scale, cache.k_zero, self.bits, cache.d)
        v = dequant_token(cache.v_codes, cache.v_scale, cache.v_zero, self.bits, cache.d)
        return k.astype(np.float32), v.astype(np.float32)

    def length(self, layer, cache):
        return int(cache.k_codes.shape[1])

    def nbytes(self, cache):
        return int(sum(a.nbytes for a in (cache.k_codes, cache.k_scale, cache.k_zero, cache.v_codes,
                                          cache.v_scale, cache.v_zero)))  # fmt: skip


DEFAULT_BITS = 4
DEFAULT_GROUP = 32


def make_policy(bits: int, group: int = DEFAULT_GROUP) -> QuantTokenKV:
    """Per-token quantization of keys and values at ``bits`` bits (the chapter's sweep knob)."""
    return QuantTokenKV(bits, group)

# ----------------------------------------------------------------------------------------------- registration
_SIZES = {"tiny": (1, 3, 8, 4), "small": (2, 17, 32, 16), "tinyvlm": (2, 160, 32, 32), "llama": (32, 4096, 128, 32)}


def _case(size: str, rng: np.random.Generator) -> dict:
    name, _, b = size.partition("-")
    h, t, d, g = _SIZES[name]
    return {"x": rng.standard_normal((h, t, d)).astype(np.float32), "bits": int(b or 4), "group_size": g}


def _cost(kw):
    x = kw["x"]
    d = x.shape[-1]
    n = x.size // d
    g = kw["group_size"] or d
    out = n * (-(-d * kw["bits"] // 8)) + 2 * n * (d // g) * x.itemsize
    return {"flops": float(3 * x.size), "bytes": float(x.nbytes + out)}


def _strategy():
    from hypothesis import strategies as st

    @st.composite
    def cases(draw):
        h, t = draw(st.integers(1, 3)), draw(st.integers(1, 9))
        g = draw(st.sampled_from([1, 2, 4, 8]))
        d = g * draw(st.integers(1, 4))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        dt = draw(st.sampled_from([np.float32, np.float64]))
        return {"x": rng.standard_normal((h, t, d)).astype(dt), "bits": draw(st.sampled_from(BITS)), "group_size": g}

    return cases()


register(
    Technique(
        id="kvcache.quant_token",
        reference=quant_token,
        make_case=_case,
        paper=("Z. Liu, J. Yuan, H. Jin, S. Zhong, Z. Xu, V. Braverman, B. Chen, X. Hu, KIVI: A Tuning-Free "
               "Asymmetric 2bit Quantization for KV Cache, ICML 2024 (arXiv 2402.02750)"),  # fmt: skip
        test_sizes=("tiny", "small", "small-2", "tinyvlm-2"),
        bench_sizes=("llama-4", "llama-2"),
        compare="exact",
        strategy=_strategy,
        cost=_cost,
        chapter="book/04-kv-cache.md",
        model_level=True,
        notes="per-token keys and values (KIVI's baseline); exact compare: codes, scales and zeros are discrete "
        "functions of the input with a fixed order of float ops",
        extra={
            "question_after_image": True,
            "plugs": lambda model: Plugs(kv_policy=QuantTokenKV(DEFAULT_BITS, DEFAULT_GROUP)),
            "setting": f"{DEFAULT_BITS}-bit per token, group {DEFAULT_GROUP}",
            "rows": lambda model: [(f"{b}-bit per token, group {DEFAULT_GROUP}", Plugs(kv_policy=QuantTokenKV(b, DEFAULT_GROUP)))
                                   for b in (4, 2)],  # fmt: skip
        },
    )
)
