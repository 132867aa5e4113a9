"""CalibQuant: 1-bit quantization of the visual tokens' keys and values, with post-scaling and calibration.

Paper: Insu Han, Zeliang Zhang, Zhiyuan Wang, Yifan Zhu, Susan Liang, Jiani Liu, Haiting Lin, Mingjie Zhao,
Chenliang Xu, Kun Wan and Wentian Zhao, "CalibQuant: 1-Bit KV Cache Quantization for Multimodal LLMs", 2025
(arXiv 2502.14882; v1 was titled "From 16-Bit to 1-Bit: Visual KV Cache Quantization for Memory-Efficient
Multimodal Large Language Models"). The algorithm here follows the authors' code, insuhan/calibquant
(``calibquant.py``: the quantizer; ``patch_internvl.py``: the decode attention with post-scaling and calibration).
Survey section: KV-cache quantization.

Only the **visual** tokens are quantized; the text before and after them and every generated token stay in full
precision. Keys and values of the visual tokens are quantized **per channel** (one step per head and channel, over
all visual tokens), asymmetrically with a real zero point, at ``b`` bits (``L = 2^b - 1`` levels), after shrinking
the channel's range by a clipping factor ``γ`` (the authors' ``SCALE_K = 0.5``, ``SCALE_V = 0.3`` at 1 bit, 1 above)::

    lo = γ min_t x[t, c],   hi = γ max_t x[t, c],   Δ[c] = (hi - lo) / L,   z[c] = -lo / Δ[c]   (real, unrounded)
    code[t, c] = round(clip(x[t, c] / Δ[c] + z[c], 0, L))          x̂[t, c] = Δ[c] (code[t, c] - z[c])

At 1 bit a channel's values collapse onto ``{γ m, γ M}``: code 1 where ``x >= γ (m + M) / 2``.

**Post-scaling** (the decode kernel never builds the dequantized keys): with ``q`` the query and ``s = 1/sqrt(d)``,
the visual scores are ``s q·k̂_t = s [ Σ_c (q_c Δk[c]) code_k[t, c]  -  Σ_c q_c Δk[c] zk[c] ]``: the query is scaled
by the step once, multiplied with the 0/1 codes, and one bias per head is subtracted. The value read-out likewise is
``Σ_t w_t v̂_t[c] = Δv[c] Σ_t w_t code_v[t, c]  -  Δv[c] zv[c] Σ_t w_t``.

**Calibration** (the authors apply it when ``b <= 2``): 1-bit keys put every visual score at an extreme of its
range, which spreads the visual scores too far; before the softmax, the visual scores ``u`` of each query head are
mapped linearly from ``[u_min, u_max]`` onto ``[u_min, u_max - τ]`` (the authors' ``τ = 3``)::

    u' = (u - u_min) / (u_max - u_min + 1e-8) * (u_max - τ - u_min) + u_min

The text and new-token scores are left as they are; one softmax runs over all of them.

Shape legend: ``k``, ``v`` ``[Hkv, T, d]`` (the first ``N = n_visual`` tokens visual); ``q`` ``[H, 1, d]`` (``H`` a
multiple of ``Hkv``; head ``h`` reads KV head ``h // (H / Hkv)``); ``k_codes``, ``v_codes`` ``uint8[Hkv, N,
ceil(d b / 8)]`` packed along channels as a little-endian bit stream (:func:`mllm_ref.quant.affine.pack` for
``b >= 2``, the same convention written here for ``b = 1``); ``k_scale``, ``k_zero``, ``v_scale``, ``v_zero``
``[Hkv, 1, d]``; ``k_full``, ``v_full`` ``[Hkv, S - N, d]`` the full-precision tokens; ``k_new``, ``v_new``
``[Hkv, 1, d]`` the decode token (or ``None``). Output ``[H, 1, d]``.

Tiny-VLM setting: the 144 visual tokens come first, then ``<bos>`` and the question (the paper's InternVL puts a
41-token system prompt before the image; here there is none). Calibration is done on the request's own prefill (the
per-channel steps are computed from the visual tokens being stored), as in the paper; there is no offline step.
The authors' InternVL settings (clip 0.5 / 0.3, offset 3) are too strong for 32-channel heads: measured with
``evaluate(load(), 20, n_captions=10, question_after_image=True)`` (plain cache: 931 kB per request, accuracy 99.2%,
captions 100%) they give 25.8%; without calibration 67.5%. The plug's defaults (key clip 1.0, value clip 0.6,
offset 1.0; chosen by a sweep on that same evaluation set, so optimistic) give 98.3% (captions 70%) at 86.5 kB per
request (10.8x smaller); the same clipping without calibration 95.8%; 2 bits with calibration 95.0%.

Deviations from the paper: the 1-bit step is written here (:mod:`mllm_ref.quant.affine` covers 2 to 8 bits with a
rounded or real zero point but without the clipping factor); codes are packed along channels in bytes, not encoded
per 8 tokens for the Triton kernel, and there is no lookup table of unique values (the authors' LUT holds the code
values 0 and 1). A channel whose clipped range is empty gets ``Δ = 1`` (the authors divide by zero). The
calibration offset ``τ`` is a keyword (default the authors' 3) and can be switched off; when the visual scores span
less than ``τ`` the mapping reverses their order, as in the authors' code. Only decode steps read the quantized
cache: the prefill attends over the full-precision keys and values, as the authors' prefill (flash attention on
the unquantized states) does. Bits other than 1 follow the authors' code path (no clipping, calibration at 2 bits)
and are offered only for the chapter's sweeps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mllm_ref import _checks
from mllm_ref.oracle.registry import Technique, register
from mllm_ref.quant import affine
from mllm_ref.tinyvlm.plugs import KVPolicy, Plugs

__all__ = ["CalibQuantCache", "CalibQuantKV", "calibquant_quantize", "calibquant_append", "calibquant_dequantize",
           "calibquant_attention", "calibrate_scores", "pack_bits", "unpack_bits", "make_policy", "BITS",
           "DEFAULT_KEY_CLIP", "DEFAULT_VALUE_CLIP", "DEFAULT_OFFSET", "TINYVLM_KEY_CLIP", "TINYVLM_VALUE_CLIP",
           "TINYVLM_OFFSET"]  # fmt: skip

#: bit widths offered (1 is the paper's; the others follow the authors' code path for the chapter's sweeps)
BITS = (1, 2, 3, 4, 8)
#: the authors' range-clipping factors at 1 bit (``SCALE_K``, ``SCALE_V``); 1 at other widths
DEFAULT_KEY_CLIP = 0.5
DEFAULT_VALUE_CLIP = 0.3
#: the authors' calibration offset (``norm_offset_max = -3``)
DEFAULT_OFFSET = 3.0
#: the tiny-VLM plug's 1-bit settings (module docstring: the authors' 0.5 / 0.3 / 3 are tuned for InternVL)
TINYVLM_KEY_CLIP = 1.0
TINYVLM_VALUE_CLIP = 0.6
TINYVLM_OFFSET = 1.0
_EPS = 1e-8


def _bits(bits) -> int:
    bits = _checks.integer(bits, "bits")
    _checks.choice(bits, "bits", BITS)
    return bits


def packed_length(d: int, bits: int) -> int:
    """Bytes of ``d`` codes of ``bits`` bits packed densely: ``ceil(d b / 8)``."""
    return -(-d * bits // 8)


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack ``uint8`` codes along the last axis (little-endian bit stream; 1 bit here, the others by affine)."""
    if bits == 1:
        return np.packbits(codes.astype(np.uint8), axis=-1, bitorder="little")
    return affine.pack(codes, bits)


def unpack_bits(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``uint8[..., n]`` codes."""
    if bits == 1:
        return np.unpackbits(packed, axis=-1, count=n, bitorder="little")
    return affine.unpack(packed, bits, n)


def _quantize_channels(x: np.ndarray, bits: int, clip: float):
    """Per-channel (over tokens) asymmetric quantization of ``x`` ``[Hkv, N, d]`` (``N >= 1``) with the range
    shrunk by ``clip``: ``(codes uint8[Hkv, N, d], step [Hkv, 1, d], zero [Hkv, 1, d])``."""
    dt = x.dtype
    levels = 2**bits - 1
    lo = x.min(axis=1, keepdims=True) * dt.type(clip)
    hi = x.max(axis=1, keepdims=True) * dt.type(clip)
    step = (hi - lo) / dt.type(levels)
    step = np.where(step > 0, step, dt.type(1)).astype(dt)
    zero = (-lo / step).astype(dt)
    codes = np.rint(np.clip(x / step + zero, 0, levels)).astype(np.uint8)
    return codes, step, zero


@dataclass(frozen=True)
class CalibQuantCache:
    """One layer's cache: the visual tokens quantized (codes and per-channel steps and zero points), the other
    tokens (text, generated) in full precision after them (module docstring for the shapes)."""

    k_codes: np.ndarray
    k_scale: np.ndarray
    k_zero: np.ndarray
    v_codes: np.ndarray
    v_scale: np.ndarray
    v_zero: np.ndarray
    k_full: np.ndarray
    v_full: np.ndarray
    bits: int

    @property
    def n_visual(self) -> int:
        return int(self.k_codes.shape[1])

    @property
    def length(self) -> int:
        return int(self.k_codes.shape[1] + self.k_full.shape[1])

    def nbytes(self) -> int:
        """Bytes held: packed codes, steps, zero points and the full-precision tokens."""
        return int(sum(getattr(self, f).nbytes for f in ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale",
                                                         "v_zero", "k_full", "v_full")))  # fmt: skip


def _clip_arg(x, name: str) -> float:
    return _checks.real(x, name, low=1e-3, high=1.0)


def calibquant_quantize(k: np.ndarray, v: np.ndarray, n_visual: int, bits: int = 1, key_clip: float | None = None,
                        value_clip: float | None = None) -> CalibQuantCache:  # fmt: skip
    """Quantize the first ``n_visual`` tokens of ``k``, ``v`` ``[Hkv, T, d]`` per channel; keep the rest.

    ``key_clip``/``value_clip``: the range-clipping factors ``γ`` in ``[0.001, 1]`` (default the authors': 0.5 and
    0.3 at 1 bit, 1 at other widths)."""
    k = _checks.float_array(k, "k", ndim=3)
    v = _checks.float_array(v, "v", ndim=3)
    _checks.same_dtype("k", k, "v", v)
    if k.shape != v.shape:
        raise ValueError(f"v must have k's shape {k.shape}, got {v.shape}")
    bits = _bits(bits)
    hkv, t, d = k.shape
    n = _checks.integer(n_visual, "n_visual", low=0, high=t)
    kc = DEFAULT_KEY_CLIP if bits == 1 else 1.0
    vc = DEFAULT_VALUE_CLIP if bits == 1 else 1.0
    kc = kc if key_clip is None else _clip_arg(key_clip, "key_clip")
    vc = vc if value_clip is None else _clip_arg(value_clip, "value_clip")
    nb = packed_length(d, bits)
    if n:
        ck, sk, zk = _quantize_channels(k[:, :n], bits, kc)
        cv, sv, zv = _quantize_channels(v[:, :n], bits, vc)
        ck, cv = pack_bits(ck, bits), pack_bits(cv, bits)
    else:
        ck = cv = np.zeros((hkv, 0, nb), np.uint8)
        sk = zk = sv = zv = np.zeros((hkv, 1, d), k.dtype)
    return CalibQuantCache(ck, sk, zk, cv, sv, zv, k[:, n:].copy(), v[:, n:].copy(), bits)


def calibquant_append(cache: CalibQuantCache, k: np.ndarray, v: np.ndarray) -> CalibQuantCache:
    """Append a generated token's ``k``, ``v`` ``[Hkv, 1, d]`` to the full-precision part."""
    if not isinstance(cache, CalibQuantCache):
        raise TypeError(f"cache must be a CalibQuantCache, got {type(cache).__name__}")
    k = _checks.float_array(k, "k", ndim=3)
    v = _checks.float_array(v, "v", ndim=3)
    hkv, _, d = cache.k_full.shape
    if k.shape != (hkv, 1, d) or v.shape != (hkv, 1, d):
        raise ValueError(f"k and v must have shape [{hkv}, 1, {d}], got {k.shape}, {v.shape}")
    dt = cache.k_full.dtype
    return CalibQuantCache(cache.k_codes, cache.k_scale, cache.k_zero, cache.v_codes, cache.v_scale, cache.v_zero,
                           np.concatenate([cache.k_full, k.astype(dt)], axis=1),
                           np.concatenate([cache.v_full, v.astype(dt)], axis=1), cache.bits)  # fmt: skip


def calibquant_dequantize(cache: CalibQuantCache) -> tuple[np.ndarray, np.ndarray]:
    """``(k̂, v̂)`` ``[Hkv, S, d]``: the visual tokens dequantized (``Δ (code - z)``), then the full-precision ones.

    Attention over these equals :func:`calibquant_attention` with ``calibrate=False`` (post-scaling is exact)."""
    d = cache.k_full.shape[2]
    ck = unpack_bits(cache.k_codes, cache.bits, d).astype(cache.k_scale.dtype)
    cv = unpack_bits(cache.v_codes, cache.bits, d).astype(cache.v_scale.dtype)
    k = cache.k_scale * (ck - cache.k_zero)
    v = cache.v_scale * (cv - cache.v_zero)
    return np.concatenate([k, cache.k_full], axis=1), np.concatenate([v, cache.v_full], axis=1)


def calibrate_scores(u: np.ndarray, offset: float = DEFAULT_OFFSET) -> np.ndarray:
    """The calibration of the visual scores ``u[..., N]`` (last axis): ``[u_min, u_max] -> [u_min, u_max - τ]``."""
    dt = u.dtype
    if u.shape[-1] == 0:
        return u
    lo = u.min(axis=-1, keepdims=True)
    hi = u.max(axis=-1, keepdims=True)
    norm = (u - lo) / (hi - lo + dt.type(_EPS))
    return norm * (hi - dt.type(offset) - lo) + lo


def _validate(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_full, v_full, k_new, v_new, bits, calibrate,
              offset, scale):  # fmt: skip
    q = _checks.float_array(q, "q", ndim=3)
    h, one, d = q.shape
    if one != 1:
        raise ValueError(f"q must have shape [H, 1, d], got {q.shape}")
    bits = _bits(bits)
    if not isinstance(calibrate, (bool, np.bool_)):
        raise TypeError(f"calibrate must be a bool, got {type(calibrate).__name__}")
    offset = _checks.real(offset, "offset", low=-1e6, high=1e6)
    k_full = _checks.float_array(k_full, "k_full", ndim=3, allow_empty=True)
    v_full = _checks.float_array(v_full, "v_full", ndim=3, allow_empty=True)
    hkv = k_full.shape[0]
    if hkv < 1 or h % hkv:
        raise ValueError(f"k_full's head count {hkv} must be >= 1 and divide q's head count {h}")
    named = {"k_full": k_full, "v_full": v_full}
    for name, a in (("k_scale", k_scale), ("k_zero", k_zero), ("v_scale", v_scale), ("v_zero", v_zero)):
        a = _checks.float_array(a, name, ndim=3)
        if a.shape != (hkv, 1, d):
            raise ValueError(f"{name} must have shape [{hkv}, 1, {d}] (KV heads of k_full, channels of q), "
                             f"got {a.shape}")
        named[name] = a
    if k_full.shape[2] != d or v_full.shape[2] != d or v_full.shape[:2] != k_full.shape[:2]:
        raise ValueError(f"k_full and v_full must have shape [{hkv}, S, {d}] alike (channels of q), got "
                         f"{k_full.shape}, {v_full.shape}")
    nb = packed_length(d, bits)
    for name, a in (("k_codes", k_codes), ("v_codes", v_codes)):
        if not isinstance(a, np.ndarray) or a.dtype != np.uint8:
            raise TypeError(f"{name} must be a uint8 array [Hkv, N, ceil(d bits / 8)], got {_checks._describe(a)}")
        if a.ndim != 3 or a.shape[0] != hkv or a.shape[2] != nb:
            raise ValueError(f"{name} must have shape [{hkv}, N, {nb}] ({bits}-bit codes of the {d} channels of q, "
                             f"KV heads of k_full), got {a.shape}")  # fmt: skip
    if v_codes.shape[1] != k_codes.shape[1]:
        raise ValueError(f"v_codes must hold k_codes' {k_codes.shape[1]} visual tokens, got {v_codes.shape[1]}")
    for name, a in (("k_new", k_new), ("v_new", v_new)):
        if a is not None:
            a = _checks.float_array(a, name, ndim=3)
            if a.shape != (hkv, 1, d):
                raise ValueError(f"{name} must have shape [{hkv}, 1, {d}] (KV heads of k_full, channels of q), "
                                 f"got {a.shape}")
            named[name] = a
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new and v_new must be given together")
    for name, a in named.items():
        _checks.same_dtype("q", q, name, a)
    if scale is None:
        scale = 1.0 / np.sqrt(d)
    scale = _checks.real(scale, "scale", low=1e-6, high=1e6)
    return (q, named["k_scale"], named["k_zero"], named["v_scale"], named["v_zero"], k_full, v_full,
            named.get("k_new"), named.get("v_new"), bits, bool(calibrate), offset, scale)  # fmt: skip


def _attend(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_full, v_full, k_new, v_new, bits, calibrate,
            offset, scale):  # fmt: skip
    """The checked computation: ``(out [H, 1, d], weights [H, 1, S (+1)])``."""
    dt = q.dtype
    h, _, d = q.shape
    hkv, n = k_codes.shape[:2]
    grp = h // hkv
    qg = q[:, 0, :].reshape(hkv, grp, d)
    s = dt.type(scale)
    parts = []
    if n:
        ck = unpack_bits(k_codes, bits, d).astype(dt)  # [Hkv, N, d] codes
        qs = qg * k_scale  # post-scaling: the query times the steps, once  [Hkv, g, d]
        bias = np.einsum("kjc,kxc->kj", qs, k_zero)  # Σ_c q_c Δ[c] z[c]
        u = (np.einsum("kjc,ktc->kjt", qs, ck) - bias[..., None]) * s
        if calibrate:
            u = calibrate_scores(u, offset)
        parts.append(u)
    parts.append(np.einsum("kjc,ktc->kjt", qg, k_full) * s)
    if k_new is not None:
        parts.append(np.einsum("kjc,ktc->kjt", qg, k_new) * s)
    scores = np.concatenate(parts, axis=-1)
    w = np.exp(scores - scores.max(axis=-1, keepdims=True))
    w = w / w.sum(axis=-1, keepdims=True)
    out = np.zeros((hkv, grp, d), dtype=dt)
    if n:
        cv = unpack_bits(v_codes, bits, d).astype(dt)
        wv = w[..., :n]
        out += np.einsum("kjt,ktc->kjc", wv, cv) * v_scale  # Δv[c] Σ_t w_t code[t, c]
        out -= (v_scale * v_zero) * wv.sum(axis=-1, keepdims=True)  # Δv[c] z[c] Σ_t w_t
    vf = v_full if v_new is None else np.concatenate([v_full, v_new], axis=1)
    out += np.einsum("kjt,ktc->kjc", w[..., n:], vf)
    return out.reshape(h, 1, d).astype(dt), w.reshape(h, 1, -1).astype(dt)


def calibquant_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_full, v_full, k_new=None,
                         v_new=None, bits: int = 1, calibrate: bool = True, offset: float = DEFAULT_OFFSET,
                         scale: float | None = None) -> np.ndarray:  # fmt: skip
    """Decode attention of one query over a CalibQuant cache, with post-scaling and (optionally) calibration.

    Args:
        q: ``[H, 1, d]`` the rotated decode queries.
        k_codes, k_scale, k_zero, v_codes, v_scale, v_zero: the visual part (see :class:`CalibQuantCache`).
        k_full, v_full: ``[Hkv, S - N, d]`` the full-precision tokens after the visual ones.
        k_new, v_new: ``[Hkv, 1, d]`` the decode token itself, or ``None``.
        bits: code width (1 in the paper).
        calibrate: map the visual scores of each head from ``[min, max]`` onto ``[min, max - offset]``.
        offset: ``τ`` of the calibration, in ``[-1e6, 1e6]``.
        scale: score multiplier, default ``1/sqrt(d)``.

    Returns:
        ``out`` ``[H, 1, d]`` in ``q``'s dtype.
    """
    args = _validate(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_full, v_full, k_new, v_new, bits,
                     calibrate, offset, scale)  # fmt: skip
    q, k_scale, k_zero, v_scale, v_zero, k_full, v_full, k_new, v_new, bits, calibrate, offset, scale = args
    return _attend(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_full, v_full, k_new, v_new, bits,
                   calibrate, offset, scale)[0]


# ------------------------------------------------------------------------------------------- the tiny VLM plug
class CalibQuantKV(KVPolicy):
    """CalibQuant on the tiny VLM: at the prefill the visual tokens' keys and values are quantized per channel from
    the request's own statistics; decode steps attend with post-scaling and calibration."""

    name = "calibquant"

    def __init__(self, bits: int = 1, key_clip: float | None = TINYVLM_KEY_CLIP,
                 value_clip: float | None = TINYVLM_VALUE_CLIP, calibrate: bool | None = None,
                 offset: float = TINYVLM_OFFSET):  # fmt: skip
        """Defaults: the tiny-VLM settings; ``key_clip``/``value_clip`` ``None`` take the authors' (0.5 / 0.3 at 1
        bit, 1 otherwise); ``calibrate`` ``None``: on when ``bits <= 2``, as the authors do."""
        self.bits = _bits(bits)
        self.key_clip = None if key_clip is None else _clip_arg(key_clip, "key_clip")
        self.value_clip = None if value_clip is None else _clip_arg(value_clip, "value_clip")
        if calibrate is not None and not isinstance(calibrate, bool):
            raise TypeError(f"calibrate must be a bool or None, got {type(calibrate).__name__}")
        self.calibrate = self.bits <= 2 if calibrate is None else calibrate  # the authors: on when bits <= 2
        self.offset = _checks.real(offset, "offset", low=-1e6, high=1e6)

    def store(self, layer, k, v, attn, info, *, positions, n_visual):
        return calibquant_quantize(k, v, n_visual, self.bits, self.key_clip, self.value_clip)

    def extend(self, layer, cache, k, v, attn, *, position):
        return calibquant_append(cache, k, v)

    def read(self, layer, cache):
        k, v = calibquant_dequantize(cache)
        return k.astype(np.float32), v.astype(np.float32)

    def attend(self, layer, cache, q, k, v, *, want_weights):
        c = cache
        out, w = _attend(q, c.k_codes, c.k_scale, c.k_zero, c.v_codes, c.v_scale, c.v_zero, c.k_full, c.v_full, k, v,
                         c.bits, self.calibrate, self.offset, 1.0 / np.sqrt(q.shape[2]))  # fmt: skip
        return out, (w if want_weights else None)

    def length(self, layer, cache):
        return cache.length

    def nbytes(self, cache):
        return cache.nbytes()

    def kept_tokens(self, layer, cache):
        """Every token, in order (nothing is evicted)."""
        return np.tile(np.arange(cache.length, dtype=np.int64), (cache.k_full.shape[0], 1))


def make_policy(bits: int = 1) -> CalibQuantKV:
    """The tiny-VLM CalibQuant policy at ``bits`` bits (1 is the paper's; 2, 3, 4, 8 follow the authors' code with
    the tiny-VLM clipping at 1 bit and none above)."""
    bits = _bits(bits)
    if bits == 1:
        return CalibQuantKV(1)
    return CalibQuantKV(bits, 1.0, 1.0, offset=TINYVLM_OFFSET)


# ----------------------------------------------------------------------------------------------- registration
# size -> (H, Hkv, d, T, N)
_SIZES = {"tiny": (2, 1, 8, 9, 5), "small": (4, 2, 16, 30, 20), "tinyvlm": (4, 2, 32, 160, 144),
          "internvl": (32, 8, 128, 2600, 2560)}  # fmt: skip


def _case(size: str, rng: np.random.Generator) -> dict:
    name, _, b = size.partition("-")
    h, hkv, d, t, n = _SIZES[name]
    bits = int(b or 1)
    k = rng.standard_normal((hkv, t, d)).astype(np.float32)
    v = rng.standard_normal((hkv, t, d)).astype(np.float32)
    c = calibquant_quantize(k, v, n, bits)
    return {"q": rng.standard_normal((h, 1, d)).astype(np.float32), "k_codes": c.k_codes, "k_scale": c.k_scale,
            "k_zero": c.k_zero, "v_codes": c.v_codes, "v_scale": c.v_scale, "v_zero": c.v_zero, "k_full": c.k_full,
            "v_full": c.v_full, "k_new": rng.standard_normal((hkv, 1, d)).astype(np.float32),
            "v_new": rng.standard_normal((hkv, 1, d)).astype(np.float32), "bits": bits, "calibrate": bits <= 2,
            "offset": DEFAULT_OFFSET}  # fmt: skip


def _strategy():
    from hypothesis import strategies as st

    @st.composite
    def cases(draw):
        hkv = draw(st.integers(1, 2))
        h = hkv * draw(st.integers(1, 2))
        d = draw(st.sampled_from([4, 8, 12]))
        t = draw(st.integers(1, 20))
        n = draw(st.integers(0, t))
        bits = draw(st.sampled_from(BITS))
        dt = draw(st.sampled_from([np.float32, np.float64]))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        k = rng.standard_normal((hkv, t, d)).astype(dt)
        v = rng.standard_normal((hkv, t, d)).astype(dt)
        c = calibquant_quantize(k, v, n, bits)
        new = draw(st.booleans())
        return {"q": rng.standard_normal((h, 1, d)).astype(dt), "k_codes": c.k_codes, "k_scale": c.k_scale,
                "k_zero": c.k_zero, "v_codes": c.v_codes, "v_scale": c.v_scale, "v_zero": c.v_zero,
                "k_full": c.k_full, "v_full": c.v_full,
                "k_new": rng.standard_normal((hkv, 1, d)).astype(dt) if new else None,
                "v_new": rng.standard_normal((hkv, 1, d)).astype(dt) if new else None, "bits": bits,
                "calibrate": draw(st.booleans()), "offset": draw(st.sampled_from([0.0, 1.0, DEFAULT_OFFSET]))}

    return cases()


def _cost(kw):
    h, _, d = kw["q"].shape
    s = kw["k_codes"].shape[1] + kw["k_full"].shape[1] + 1
    moved = sum(kw[f].nbytes for f in ("k_codes", "v_codes", "k_full", "v_full", "k_scale", "k_zero", "v_scale",
                                       "v_zero"))  # fmt: skip
    return {"flops": float(4 * h * s * d), "bytes": float(moved + 2 * kw["q"].nbytes)}


register(
    Technique(
        id="kvcache.calibquant",
        reference=calibquant_attention,
        make_case=_case,
        paper=("I. Han, Z. Zhang, Z. Wang, Y. Zhu, S. Liang, J. Liu, H. Lin, M. Zhao, C. Xu, K. Wan, W. Zhao, "
               "CalibQuant: 1-Bit KV Cache Quantization for Multimodal LLMs, 2025 (arXiv 2502.14882)"),  # fmt: skip
        test_sizes=("tiny", "small", "small-2", "tinyvlm"),
        bench_sizes=("internvl",),
        compare="tolerance",
        float_args=("q", "k_scale", "k_zero", "v_scale", "v_zero", "k_full", "v_full", "k_new", "v_new"),
        strategy=_strategy,
        cost=_cost,
        chapter="book/04-kv-cache.md",
        model_level=True,
        notes="decode attention over 1-bit per-channel visual keys/values with post-scaling and score calibration; "
        "tolerance compare on the attention output",
        extra={
            "plugs": lambda model: Plugs(kv_policy=CalibQuantKV(1)),
            "setting": f"1-bit visual K/V per channel, clip K {TINYVLM_KEY_CLIP:g} V {TINYVLM_VALUE_CLIP:g}, "
            f"calibration offset {TINYVLM_OFFSET:g}",
            "question_after_image": True,
        },
    )
)
