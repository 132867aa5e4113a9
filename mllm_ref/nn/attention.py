"""Scaled dot-product attention with grouped-query heads, a causal mask aligned to the end, and a padding mask.

Papers: Ashish Vaswani, Noam Shazeer, Niki Parmar, Jakob Uszkoreit, Llion Jones, Aidan N. Gomez, Lukasz Kaiser and
Illia Polosukhin, "Attention Is All You Need", NeurIPS 2017 (arXiv:1706.03762); grouped-query attention from
Joshua Ainslie, James Lee-Thorp, Michiel de Jong, Yury Zemlyanskiy, Federico Lebron and Sumit Sanghai, "GQA:
Training Generalized Multi-Query Transformer Models from Multi-Head Checkpoints", EMNLP 2023 (arXiv:2305.13245).
The fast kernels use the blocked online softmax of Tri Dao et al., "FlashAttention", NeurIPS 2022
(arXiv:2205.14135); this reference materialises the score matrix and is the readable definition.

Equations, for query head h of batch element b::

    g          = Hq / Hkv                       (query heads per kv head)
    kv(h)      = h // g                         (query head h reads kv head h // g)
    s_ij       = scale * q[b, h, i] . k[b, kv(h), j]          scale = 1 / sqrt(d) unless given
    allowed_ij = key_mask[b, j]  and  (not causal  or  j <= Tk - Tq + i)
    w_ij       = exp(s_ij - m_i) / sum_{j' allowed} exp(s_ij' - m_i)   over allowed j, 0 elsewhere
    out[b, h, i] = sum_j w_ij v[b, kv(h), j]

``m_i`` is the row maximum over allowed keys (the stable softmax). The causal mask is aligned to the END of the
keys: query i sits at absolute position ``Tk - Tq + i``. With ``Tq == Tk`` this is the usual lower-triangular
prefill mask; with ``Tq == 1`` the single new query sees every cached key, so one decoding step against a KV cache
is ``attention(q_new, cache.k, cache.v, causal=True)``; in between it is a chunked prefill that continues a cache.

A row with no allowed key (its batch element is all padding, or a left-padded prefix under the causal mask, or
``Tq > Tk`` under the causal mask) has all-zero weights and a zero output, never NaN.

Shape legend:
    B batch, Hq query heads, Hkv key/value heads (Hq a multiple of Hkv), Tq queries, Tk keys, d head dimension of
    queries and keys, dv head dimension of values.
    q: ``[B, Hq, Tq, d]``, k: ``[B, Hkv, Tk, d]``, v: ``[B, Hkv, Tk, dv]``, key_mask: bool ``[B, Tk]`` (True = the
    key may be attended; False = padding).
    returns: out ``[B, Hq, Tq, dv]``, and with ``return_weights`` also weights ``[B, Hq, Tq, Tk]``, in q's dtype.

Deviations from the papers: none. (Multi-query attention is the case Hkv = 1; multi-head attention Hkv = Hq.)
"""

from __future__ import annotations

import numpy as np

from mllm_ref import _checks
from mllm_ref.oracle.registry import Technique, register

__all__ = ["attention", "allowed_mask"]


def _flag(x, name: str) -> bool:
    if not isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(x).__name__}")
    return bool(x)


def _validate(q, k, v, causal, key_mask, scale, return_weights, *, finite_kv: bool = True):
    """Shared entry checks (also used by the fast paths). Returns the checked arguments, ``scale`` resolved.

    ``finite_kv=False`` skips the NaN/inf scan of ``k`` and ``v`` (a full pass over the KV cache, as long as the
    decode kernel itself): a fast path that passes it must detect non-finite values itself and raise the same
    ``ValueError``.
    """
    q = _checks.float_array(q, "q", ndim=4)
    k = _checks.float_array(k, "k", ndim=4, allow_nonfinite=not finite_kv)
    v = _checks.float_array(v, "v", ndim=4, allow_nonfinite=not finite_kv)
    _checks.same_dtype("q", q, "k", k)
    _checks.same_dtype("q", q, "v", v)
    b, hq, _, d = q.shape
    _, hkv, tk, _ = k.shape
    _checks.dim("k", k, 0, b, "the batch size of q")
    _checks.dim("k", k, 3, d, "the head dimension of q")
    _checks.dim("v", v, 0, b, "the batch size of q")
    _checks.dim("v", v, 1, hkv, "the kv heads of k")
    _checks.dim("v", v, 2, tk, "the keys of k")
    if hq % hkv != 0:
        raise ValueError(
            f"q has Hq = {hq} heads, which is not a multiple of the Hkv = {hkv} heads of k "
            "(grouped-query attention needs Hq % Hkv == 0)"
        )
    causal = _flag(causal, "causal")
    return_weights = _flag(return_weights, "return_weights")
    if key_mask is not None:
        key_mask = _checks.bool_array(key_mask, "key_mask", shape=(b, tk))
    if scale is None:
        scale = 1.0 / np.sqrt(d)
    else:
        scale = _checks.real(scale, "scale", low=0.0, low_open=True)
        with np.errstate(over="ignore", under="ignore"):
            scale_q = q.dtype.type(scale)  # the value the scores are multiplied by
        if not 0 < scale_q < np.inf:  # 1e300 overflows float32: inf scores give NaN weights
            raise ValueError(f"scale must stay positive and finite in q's dtype {q.dtype}, got {scale}")
    return q, k, v, causal, key_mask, scale, return_weights


def allowed_mask(batch: int, tq: int, tk: int, causal: bool, key_mask: np.ndarray | None) -> np.ndarray:
    """Which (query, key) pairs may attend: bool ``[B, 1, Tq, Tk]`` (broadcasts over heads).

    Causal is aligned to the end of the keys: query i sees keys ``j <= Tk - Tq + i``.
    """
    allowed = np.ones((batch, 1, tq, tk), dtype=bool)
    if causal:
        query_pos = (tk - tq) + np.arange(tq)[:, None]  # absolute position of each query
        allowed &= np.arange(tk)[None, :] <= query_pos
    if key_mask is not None:
        allowed &= key_mask[:, None, None, :]
    return allowed


def attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    causal: bool = False,
    key_mask: np.ndarray | None = None,
    scale: float | None = None,
    return_weights: bool = False,
):
    """Softmax attention of ``q`` over ``k``/``v``, grouped-query, causal aligned to the end, padding-masked.

    Args:
        q: ``[B, Hq, Tq, d]`` float, finite.
        k: ``[B, Hkv, Tk, d]``, same dtype; Hq must be a multiple of Hkv.
        v: ``[B, Hkv, Tk, dv]``, same dtype.
        causal: mask keys after each query's absolute position ``Tk - Tq + i``.
        key_mask: bool ``[B, Tk]`` or None; True = may be attended, False = padding.
        scale: score multiplier > 0; default ``1 / sqrt(d)``.
        return_weights: also return the attention weights.

    Returns:
        ``out[B, Hq, Tq, dv]``, or ``(out, weights[B, Hq, Tq, Tk])`` if ``return_weights``. Rows with no allowed
        key are zero in both.
    """
    q, k, v, causal, key_mask, scale, return_weights = _validate(q, k, v, causal, key_mask, scale, return_weights)
    b, hq, tq, d = q.shape
    _, hkv, tk, dv = v.shape
    group = hq // hkv

    # Grouped-query attention without copying k and v: view the query heads as [Hkv, group] so that the group
    # members of kv head j (query heads j*group .. j*group + group-1) share k[:, j] through broadcasting.
    qg = q.reshape(b, hkv, group, tq, d)
    scores = qg @ np.swapaxes(k, -1, -2)[:, :, None]  # [B, Hkv, group, Tq, Tk]
    scores = scores.reshape(b, hq, tq, tk) * q.dtype.type(scale)

    allowed = allowed_mask(b, tq, tk, causal, key_mask)  # [B, 1, Tq, Tk]
    scores = np.where(allowed, scores, -np.inf)
    row_max = np.max(scores, axis=-1, keepdims=True)
    # A row with no allowed key has max -inf; shift it by 0 instead so that exp(-inf - 0) = 0 (no NaN).
    row_max = np.where(np.isfinite(row_max), row_max, q.dtype.type(0))
    e = np.exp(scores - row_max)  # exactly 0 at masked positions
    denom = np.sum(e, axis=-1, keepdims=True)
    weights = e / np.where(denom > 0, denom, q.dtype.type(1))  # all-masked rows stay all-zero

    out = weights.reshape(b, hkv, group, tq, tk) @ v[:, :, None]  # [B, Hkv, group, Tq, dv]
    out = out.reshape(b, hq, tq, dv)
    return (out, weights) if return_weights else out


# --------------------------------------------------------------------------------------------------------------
# Registration.

# size -> (B, Hq, Hkv, Tq, Tk, d, dv, causal, padding, return_weights, scale)
_SIZES = {
    "one": (1, 1, 1, 1, 1, 1, 1, True, False, False, None),  # every length 1
    "prefill_odd": (2, 3, 3, 7, 7, 5, 6, False, False, False, None),  # odd everything, dv != d
    "prefill_causal_gqa": (1, 6, 2, 13, 13, 8, 8, True, False, False, None),
    "prefill_padded": (3, 4, 2, 11, 11, 8, 8, True, True, False, None),  # left padding: some rows see nothing
    "prefill_padded_full": (2, 2, 1, 9, 9, 4, 3, False, True, False, 0.3),  # MQA, custom scale
    "weights": (2, 4, 2, 5, 5, 8, 8, True, True, True, None),  # return_weights
    "chunk": (1, 4, 4, 5, 37, 16, 16, True, False, False, None),  # chunked prefill continuing a cache
    "decode": (2, 8, 2, 1, 97, 16, 16, True, True, False, None),  # one new token against a padded cache
    "bench_prefill": (1, 8, 8, 576, 576, 64, 64, True, False, False, None),
    "bench_decode": (1, 8, 8, 1, 4096, 64, 64, True, False, False, None),
}


def _case(size: str, rng: np.random.Generator) -> dict:
    b, hq, hkv, tq, tk, d, dv, causal, padding, return_weights, scale = _SIZES[size]
    q = rng.standard_normal((b, hq, tq, d)).astype(np.float32)
    k = rng.standard_normal((b, hkv, tk, d)).astype(np.float32)
    v = rng.standard_normal((b, hkv, tk, dv)).astype(np.float32)
    key_mask = None
    if padding:
        # Left padding of a different length per batch element (element 0 is not padded).
        key_mask = np.ones((b, tk), dtype=bool)
        for i in range(1, b):
            key_mask[i, : int(rng.integers(1, max(2, tk // 2)))] = False
    return {
        "q": q,
        "k": k,
        "v": v,
        "causal": causal,
        "key_mask": key_mask,
        "scale": scale,
        "return_weights": return_weights,
    }


def _visible_pairs(tq: int, tk: int, causal: bool) -> int:
    """Number of (query, key) pairs that the causal mask allows (all of them when not causal)."""
    if not causal:
        return tq * tk
    first = tk - tq + 1  # keys seen by query 0
    return int(sum(min(tk, max(0, first + i)) for i in range(tq)))


def _cost(kwargs: dict) -> dict:
    q, k, v = kwargs["q"], kwargs["k"], kwargs["v"]
    b, hq, tq, d = q.shape
    tk, dv = v.shape[2], v.shape[3]
    pairs = b * hq * _visible_pairs(tq, tk, kwargs.get("causal", False))
    flops = 2.0 * pairs * (d + dv) + 4.0 * pairs  # QK^T and PV multiply-adds, plus the softmax
    nbytes = q.nbytes + k.nbytes + v.nbytes + b * hq * tq * dv * q.itemsize
    if kwargs.get("return_weights", False):
        nbytes += b * hq * tq * tk * q.itemsize
    return {"flops": flops, "bytes": float(nbytes)}


def _strategy():
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp

    @st.composite
    def cases(draw):
        b = draw(st.integers(1, 2))
        hkv = draw(st.integers(1, 3))
        hq = hkv * draw(st.integers(1, 3))
        tq = draw(st.integers(1, 9))
        tk = draw(st.one_of(st.just(tq), st.integers(1, 17)))  # prefill (Tq == Tk) or cache/decode shapes
        d = draw(st.integers(1, 9))
        dv = draw(st.integers(1, 9))
        dtype = draw(st.sampled_from([np.float32, np.float64]))
        elements = st.floats(-4, 4, width=32)
        q = draw(hnp.arrays(dtype, (b, hq, tq, d), elements=elements))
        k = draw(hnp.arrays(dtype, (b, hkv, tk, d), elements=elements))
        v = draw(hnp.arrays(dtype, (b, hkv, tk, dv), elements=elements))
        key_mask = draw(st.one_of(st.none(), hnp.arrays(np.bool_, (b, tk))))
        return {
            "q": q,
            "k": k,
            "v": v,
            "causal": draw(st.booleans()),
            "key_mask": key_mask,
            "scale": draw(st.one_of(st.none(), st.floats(0.05, 2.0))),
            "return_weights": draw(st.booleans()),
        }

    return cases()


register(
    Technique(
        id="nn.attention",
        reference=attention,
        make_case=_case,
        paper=(
            "Ashish Vaswani et al., Attention Is All You Need, NeurIPS 2017 (arXiv:1706.03762); Joshua Ainslie et "
            "al., GQA: Training Generalized Multi-Query Transformer Models from Multi-Head Checkpoints, EMNLP 2023 "
            "(arXiv:2305.13245)"
        ),
        test_sizes=(
            "one",
            "prefill_odd",
            "prefill_causal_gqa",
            "prefill_padded",
            "prefill_padded_full",
            "weights",
            "chunk",
            "decode",
        ),
        bench_sizes=("bench_prefill", "bench_decode"),
        compare="tolerance",
        float_args=("q", "k", "v"),
        strategy=_strategy,
        cost=_cost,
        chapter="book/01-tiny-vlm.md",
        exercise="exercises/01-softmax-attention",
        notes="GQA, causal aligned to the end of the keys, padding mask; all-masked rows give zeros",
    )
)
