"""Fused decode attention over a KIVI-quantized KV cache: scores and outputs computed from the codes.

Z. Liu, J. Yuan, H. Jin, S. Zhong, Z. Xu, V. Braverman, B. Chen, X. Hu, "KIVI: A Tuning-Free Asymmetric 2bit
Quantization for KV Cache", ICML 2024 (arXiv 2402.02750), section 3.3 and the authors' ``cuda_bmm_fA_qB_outer``
kernel (jy-yuan/KIVI, ``quant/matmul.py``): the quantized part of the cache is never dequantized into a copy.

Keys are quantized per channel over groups of ``G`` tokens (``k̂[t, c] = Δ[g, c] c_k[t, c] + m[g, c]``, ``g = t//G``),
values per token over groups of ``Gv`` channels (``v̂[t, c] = Δ[t, e] c_v[t, c] + m[t, e]``, ``e = c//Gv``). For one
decode query ``q`` (scaled by ``s = 1/sqrt(d)``)::

    score_t  = s * ( sum_c (q_c Δ[g, c]) c_k[t, c]  +  sum_c q_c m[g, c] )          quantized keys
    score_t  = s * q . k_full[t]                                                     full-precision keys (+ new)
    w        = softmax(score)
    out_c    = sum_t (w_t Δ[t, e]) c_v[t, c] + sum_t w_t m[t, e]  +  sum_t w_t v_full[t, c]

GQA: query head ``h`` reads cache head ``h // (H / Hkv)``. The key part is ``[quantized keys (Tkq), full keys
(Tkf)]`` and the value part ``[quantized values (Tvq), full values (Tvf)]``; both cover the same ``S`` tokens in
order (``Tkq + Tkf = Tvq + Tvf``), then the new token when ``k_new``/``v_new`` are given.

Shapes: ``q`` ``[H, 1, d]``; ``k_codes`` ``uint8[Hkv, Tkq, ceil(d b/8)]`` (packed along channels), ``k_scale``,
``k_zero`` ``[Hkv, Tkq/G, d]``; ``k_full`` ``[Hkv, Tkf, d]``; ``v_codes`` ``uint8[Hkv, Tvq, ceil(dv b/8)]``,
``v_scale``, ``v_zero`` ``[Hkv, Tvq, dv/Gv]``; ``v_full`` ``[Hkv, Tvf, dv]``; ``k_new`` ``[Hkv, 1, d]``, ``v_new``
``[Hkv, 1, dv]`` or ``None``. Returns ``out`` ``[H, 1, dv]`` in ``q``'s dtype.

Deviations from the paper: the codes are packed along channels in bytes (KIVI packs keys along tokens in int32
words for its CUDA kernel); the arithmetic per group is the same. The NumPy reference unpacks the codes to ``uint8``
and casts them per einsum; the numba path reads the packed bytes directly.
"""

from __future__ import annotations

import numpy as np

from mllm_ref import _checks
from mllm_ref.oracle.registry import Technique, register
from mllm_ref.quant import affine


def _validate(q, k_codes, k_scale, k_zero, k_full, v_codes, v_scale, v_zero, v_full, k_new, v_new, bits, scale):
    q = _checks.float_array(q, "q", ndim=3)
    h, one, d = q.shape
    if one != 1:
        raise ValueError(f"q must have shape [H, 1, d], got {q.shape}")
    bits = _checks.integer(bits, "bits")
    _checks.choice(bits, "bits", (2, 3, 4, 8))
    k_full = _checks.float_array(k_full, "k_full", ndim=3, allow_empty=True)
    v_full = _checks.float_array(v_full, "v_full", ndim=3, allow_empty=True)
    hkv = k_full.shape[0]
    if hkv < 1 or h % hkv:
        raise ValueError(f"k_full's head count {hkv} must divide q's {h}")
    dv = v_full.shape[2]
    for name, a in (("k_codes", k_codes), ("v_codes", v_codes)):
        if not isinstance(a, np.ndarray) or a.dtype != np.uint8 or a.ndim != 3:
            raise TypeError(f"{name} must be a uint8 array [Hkv, T, nbytes], got {_checks._describe(a)}")
    k_scale = _checks.float_array(k_scale, "k_scale", ndim=3, allow_empty=True)
    k_zero = _checks.float_array(k_zero, "k_zero", ndim=3, allow_empty=True)
    v_scale = _checks.float_array(v_scale, "v_scale", ndim=3, allow_empty=True)
    v_zero = _checks.float_array(v_zero, "v_zero", ndim=3, allow_empty=True)
    for name, a in (("k_full", k_full), ("k_scale", k_scale), ("k_zero", k_zero), ("v_full", v_full),
                    ("v_scale", v_scale), ("v_zero", v_zero)):  # fmt: skip
        _checks.same_dtype("q", q, name, a)
    tkq, tvq = k_codes.shape[1], v_codes.shape[1]
    if k_codes.shape != (hkv, tkq, affine.packed_length(d, bits)):
        raise ValueError(f"k_codes must have shape [{hkv}, Tkq, {affine.packed_length(d, bits)}] (Hkv from k_full, "
                         f"d from q, bits), got {k_codes.shape}")  # fmt: skip
    if v_codes.shape != (hkv, tvq, affine.packed_length(dv, bits)):
        raise ValueError(f"v_codes must have shape [{hkv}, Tvq, {affine.packed_length(dv, bits)}] (Hkv from k_full, "
                         f"dv from v_full, bits), got {v_codes.shape}")  # fmt: skip
    nkg = k_scale.shape[1]
    if k_scale.shape[0] != hkv or k_scale.shape[2] != d or (nkg == 0) != (tkq == 0) or (nkg and tkq % nkg):
        raise ValueError(f"k_scale must have shape [{hkv}, Tkq/G, {d}] (d from q) with G dividing Tkq={tkq} of "
                         f"k_codes, got {k_scale.shape}")  # fmt: skip
    if k_zero.shape != k_scale.shape:
        raise ValueError(f"k_zero must have k_scale's shape {k_scale.shape}, got {k_zero.shape}")
    nvg = v_scale.shape[2]
    if v_scale.shape[:2] != (hkv, tvq) or nvg < 1 or dv % nvg:
        raise ValueError(f"v_scale must have shape [{hkv}, {tvq}, dv/Gv] (Tvq from v_codes) with Gv dividing dv={dv} "
                         f"of v_full, got {v_scale.shape}")  # fmt: skip
    if v_zero.shape != v_scale.shape:
        raise ValueError(f"v_zero must have v_scale's shape {v_scale.shape}, got {v_zero.shape}")
    if k_full.shape[2] != d or v_full.shape[0] != hkv:
        raise ValueError(f"k_full must be [{hkv}, Tkf, {d}] (d from q) and v_full [{hkv}, Tvf, dv], got "
                         f"{k_full.shape}, {v_full.shape}")  # fmt: skip
    if tkq + k_full.shape[1] != tvq + v_full.shape[1]:
        raise ValueError(f"the key part ({tkq} + {k_full.shape[1]}) and the value part ({tvq} + {v_full.shape[1]}) "
                         "must cover the same tokens")  # fmt: skip
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new and v_new must be given together")
    if k_new is not None:
        k_new = _checks.float_array(k_new, "k_new", ndim=3)
        v_new = _checks.float_array(v_new, "v_new", ndim=3)
        _checks.same_dtype("q", q, "k_new", k_new)
        _checks.same_dtype("q", q, "v_new", v_new)
        if k_new.shape != (hkv, 1, d) or v_new.shape != (hkv, 1, dv):
            raise ValueError(f"k_new must be [{hkv}, 1, {d}] and v_new [{hkv}, 1, {dv}], got {k_new.shape}, {v_new.shape}")
    if tkq + k_full.shape[1] + (0 if k_new is None else 1) == 0:
        raise ValueError("the cache is empty and no new token is given: nothing to attend to")
    if scale is None:
        scale = 1.0 / np.sqrt(d)
    scale = _checks.real(scale, "scale", low=0.0, low_open=True)
    return (q, k_codes, k_scale, k_zero, k_full, v_codes, v_scale, v_zero, v_full, k_new, v_new, bits, scale)


def quant_attention(q, k_codes, k_scale, k_zero, k_full, v_codes, v_scale, v_zero, v_full, k_new=None, v_new=None,
                    bits: int = 2, scale: float | None = None) -> np.ndarray:  # fmt: skip
    """Attention of one decode query over the quantized cache, the full-precision part and the new token.

    Returns:
        ``out`` ``[H, 1, dv]`` in ``q``'s dtype (module docstring).
    """
    (q, k_codes, k_scale, k_zero, k_full, v_codes, v_scale, v_zero, v_full, k_new, v_new, bits, scale) = _validate(
        q, k_codes, k_scale, k_zero, k_full, v_codes, v_scale, v_zero, v_full, k_new, v_new, bits, scale)
    dt = q.dtype
    h, _, d = q.shape
    hkv, tkq = k_codes.shape[:2]
    dv = v_full.shape[2]
    grp = h // hkv
    qg = q[:, 0, :].reshape(hkv, grp, d)  # [Hkv, g, d]
    parts = []
    if tkq:
        nkg = k_scale.shape[1]
        ck = affine.unpack(k_codes, bits, d).reshape(hkv, nkg, tkq // nkg, d)
        a = np.einsum("kjc,kgc->kjgc", qg, k_scale)  # q_c Δ[g, c]
        bias = np.einsum("kjc,kgc->kjg", qg, k_zero)  # sum_c q_c m[g, c]
        s = np.einsum("kjgc,kgtc->kjgt", a, ck.astype(dt)) + bias[..., None]
        parts.append(s.reshape(hkv, grp, tkq))
    parts.append(np.einsum("kjc,ktc->kjt", qg, k_full))
    if k_new is not None:
        parts.append(np.einsum("kjc,ktc->kjt", qg, k_new))
    scores = np.concatenate(parts, axis=-1) * dt.type(scale)
    w = np.exp(scores - scores.max(axis=-1, keepdims=True))
    w = w / w.sum(axis=-1, keepdims=True)
    tvq = v_codes.shape[1]
    out = np.zeros((hkv, grp, dv), dtype=dt)
    if tvq:
        nvg = v_scale.shape[2]
        cv = affine.unpack(v_codes, bits, dv).reshape(hkv, tvq, nvg, dv // nvg)
        wq = w[..., :tvq]
        ws = np.einsum("kjt,kte->kjte", wq, v_scale)  # w_t Δ[t, e]
        out += np.einsum("kjte,ktec->kjec", ws, cv.astype(dt)).reshape(hkv, grp, dv)
        out += np.repeat(np.einsum("kjt,kte->kje", wq, v_zero), dv // nvg, axis=-1)
    vf = v_full if v_new is None else np.concatenate([v_full, v_new], axis=1)
    out += np.einsum("kjt,ktc->kjc", w[..., tvq:], vf)
    return out.reshape(h, 1, dv).astype(dt)


# ----------------------------------------------------------------------------------------------- registration
_SIZES = {
    # name: (H, Hkv, d, S, G, R)
    "tiny": (2, 1, 8, 11, 4, 4),
    "small": (4, 2, 16, 37, 8, 8),
    "tinyvlm": (4, 2, 32, 170, 32, 32),
    "4k": (32, 8, 128, 4096, 32, 128),
    "8k": (32, 8, 128, 8192, 32, 128),
}


def _case(size: str, rng: np.random.Generator) -> dict:
    from mllm_ref.kvcache.kivi import kivi_quantize

    name, _, b = size.partition("-")
    h, hkv, d, s, g, r = _SIZES[name]
    bits = int(b or 4)
    k = rng.standard_normal((hkv, s, d)).astype(np.float32)
    k += 2.0 * rng.standard_normal((hkv, 1, d)).astype(np.float32)  # outlier channels, as in real keys
    v = rng.standard_normal((hkv, s, d)).astype(np.float32)
    c = kivi_quantize(k, v, bits=bits, group_size=g, residual=r)
    return {
        "q": rng.standard_normal((h, 1, d)).astype(np.float32),
        "k_codes": c.k_codes, "k_scale": c.k_scale, "k_zero": c.k_zero, "k_full": c.k_full,
        "v_codes": c.v_codes, "v_scale": c.v_scale, "v_zero": c.v_zero, "v_full": c.v_full,
        "k_new": rng.standard_normal((hkv, 1, d)).astype(np.float32),
        "v_new": rng.standard_normal((hkv, 1, d)).astype(np.float32),
        "bits": bits,
    }  # fmt: skip


def _cost(kw: dict) -> dict:
    h, _, d = kw["q"].shape
    total = sum(a.nbytes for a in kw.values() if isinstance(a, np.ndarray))
    s = kw["k_codes"].shape[1] + kw["k_full"].shape[1] + 1
    return {"flops": float(4 * h * s * d), "bytes": float(total)}


def _strategy():
    from hypothesis import strategies as st

    @st.composite
    def cases(draw):
        from mllm_ref.kvcache.kivi import kivi_quantize

        hkv = draw(st.integers(1, 2))
        h = hkv * draw(st.integers(1, 3))
        g = draw(st.sampled_from([2, 4]))
        r = g * draw(st.integers(1, 3))
        d = g * draw(st.integers(1, 3))
        s = draw(st.integers(0, 30))
        bits = draw(st.sampled_from([2, 4, 8]))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        dt = draw(st.sampled_from([np.float32, np.float64]))
        c = kivi_quantize(rng.standard_normal((hkv, s, d)).astype(dt), rng.standard_normal((hkv, s, d)).astype(dt),
                          bits=bits, group_size=g, residual=r)  # fmt: skip
        return {"q": rng.standard_normal((h, 1, d)).astype(dt), "k_codes": c.k_codes, "k_scale": c.k_scale,
                "k_zero": c.k_zero, "k_full": c.k_full, "v_codes": c.v_codes, "v_scale": c.v_scale,
                "v_zero": c.v_zero, "v_full": c.v_full, "k_new": rng.standard_normal((hkv, 1, d)).astype(dt),
                "v_new": rng.standard_normal((hkv, 1, d)).astype(dt), "bits": bits}  # fmt: skip

    return cases()


register(
    Technique(
        id="kvcache.quant_attention",
        reference=quant_attention,
        make_case=_case,
        paper=("Z. Liu, J. Yuan, H. Jin, S. Zhong, Z. Xu, V. Braverman, B. Chen, X. Hu, KIVI: A Tuning-Free "
               "Asymmetric 2bit Quantization for KV Cache, ICML 2024 (arXiv 2402.02750)"),  # fmt: skip
        test_sizes=("tiny", "small", "small-2", "tinyvlm-2"),
        bench_sizes=("4k-4", "4k-2", "8k-4", "8k-2"),
        compare="tolerance",
        strategy=_strategy,
        cost=_cost,
        chapter="book/04-kv-cache.md",
        notes="decode attention from the codes (KIVI's fused q.(Δc+m) per group); GQA",
    )
)
