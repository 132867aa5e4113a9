"""How one exercise task is graded: a student's function against the oracle, in this process.

A task of ``exercises/<NN>-<name>/exercise.json`` names a ``technique_id``. A registered technique
(``"nn.softmax"``) is graded on its own seeded test cases and tolerance, exactly like ``mllm-ref check``. An id
under ``grading.`` names a task-only technique defined here, built from the references (no second copy of a
solution): ``grading.kv_decode_step`` and ``grading.kv_decode`` check step-by-step cached decoding against full
causal attention (:mod:`mllm_ref.nn.attention`, :mod:`mllm_ref.nn.kvcache`); ``grading.fastv_scores`` checks
FastV's scoring step alone (:mod:`mllm_ref.tokens.fastv`); ``grading.qformer_mha`` checks the multi-head attention
of the Q-Former's queries over the image tokens (heads split, scaled dot-product attention under an image mask,
heads merged) and ``grading.qformer_cross_attention`` one whole cross-attention block of a Q-Former layer, both
composed from the pieces that :mod:`mllm_ref.connectors.qformer` itself uses; ``grading.kivi_quantize_keys``,
``grading.kivi_quantize_values`` and their ``dequantize`` twins check KIVI's two groupings of the KV cache, built on
:mod:`mllm_ref.quant.affine` (the quantizer :mod:`mllm_ref.kvcache.kivi` uses); ``grading.speculative_exactness``
runs a speculative sampling step many times and tests that the first emitted token follows the target's
distribution (a chi-square test, :func:`speculative_exactness_judge`); ``grading.calm_margin_exit`` and
``grading.calm_copy_kv`` check CALM's softmax-margin exit and the keys and values an exited token leaves in the layers
it skipped (:mod:`mllm_ref.dynamic.early_exit`).

:func:`grade_callable` is used both by the sandboxed worker (:mod:`mllm_ref.oracle.grade_worker`, on a student's
submission) and by the self-check of the test suite (on the references themselves).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from mllm_ref.oracle import registry
from mllm_ref.oracle.check import judge_case, summarize
from mllm_ref.oracle.tolerance import Verdict

__all__ = ["GRADING_TECHNIQUES", "technique_for", "grade_callable", "first_failure"]


# ---------------------------------------------------------------- KV-cache decoding


def decode_step_reference(cache_k, cache_v, q_new, k_new, v_new):
    """One decoding step: append ``k_new``/``v_new`` (one token) to the cache and attend ``q_new`` over it.

    Returns ``(out[B, Hq, 1, dv], new_cache_k[B, Hkv, T+1, d], new_cache_v[B, Hkv, T+1, dv])``.
    """
    from mllm_ref.nn.attention import attention
    from mllm_ref.nn.kvcache import KVCache, append

    cache = append(KVCache(cache_k, cache_v), k_new, v_new)
    return attention(q_new, cache.k, cache.v, causal=True), cache.k, cache.v


def decode_reference(q_steps, k_steps, v_steps):
    """Cached decoding of T steps equals full causal attention: ``attention(q, k, v, causal=True)``."""
    from mllm_ref.nn.attention import attention

    return attention(q_steps, k_steps, v_steps, causal=True)


# size -> (B, Hq, Hkv, T cached, d, dv)
_STEP_SIZES = {
    "empty_cache": (1, 2, 2, 0, 4, 4),
    "one_cached": (1, 1, 1, 1, 3, 5),
    "gqa": (2, 4, 2, 6, 8, 8),
    "mqa_long": (1, 6, 1, 23, 16, 8),
}


def _step_case(size: str, rng: np.random.Generator) -> dict:
    b, hq, hkv, t, d, dv = _STEP_SIZES[size]

    def arr(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    return {
        "cache_k": arr(b, hkv, t, d),
        "cache_v": arr(b, hkv, t, dv),
        "q_new": arr(b, hq, 1, d),
        "k_new": arr(b, hkv, 1, d),
        "v_new": arr(b, hkv, 1, dv),
    }


# size -> (B, Hq, Hkv, T steps, d, dv)
_DECODE_SIZES = {
    "one_step": (1, 1, 1, 1, 4, 4),
    "mha": (2, 3, 3, 7, 5, 6),
    "gqa": (1, 4, 2, 12, 8, 8),
    "mqa": (2, 4, 1, 17, 16, 8),
}


def _decode_case(size: str, rng: np.random.Generator) -> dict:
    b, hq, hkv, t, d, dv = _DECODE_SIZES[size]
    return {
        "q_steps": rng.standard_normal((b, hq, t, d)).astype(np.float32),
        "k_steps": rng.standard_normal((b, hkv, t, d)).astype(np.float32),
        "v_steps": rng.standard_normal((b, hkv, t, dv)).astype(np.float32),
    }


# ---------------------------------------------------------------- FastV's scores


def fastv_scores_reference(attn, visual_start, n_visual, scoring="last"):
    """FastV's image-token scores (:func:`mllm_ref.tokens.fastv.fastv_scores`), graded on the cases of
    ``tokens.fastv`` without the hidden states and the ratio."""
    from mllm_ref.tokens.fastv import fastv_scores

    return fastv_scores(attn, visual_start, n_visual, scoring)


def _fastv_scores_case(size: str, rng: np.random.Generator) -> dict:
    kw = registry.get("tokens.fastv").make_case(size, rng)
    return {k: kw[k] for k in ("attn", "visual_start", "n_visual", "scoring")}


# ---------------------------------------------------------------- BLIP-2 Q-Former cross-attention


def _qformer_heads_attention(q, k, v, num_heads, key_mask):
    """``[Q, H], [N, H], [N, H] -> [Q, H]``: exactly the cross-attention step of
    :func:`mllm_ref.connectors.qformer.forward` (its head split and merge around :func:`mllm_ref.nn.attention`)."""
    from mllm_ref import _checks
    from mllm_ref.connectors.qformer import _heads, _merge_heads
    from mllm_ref.nn.attention import attention

    num_heads = _checks.integer(num_heads, "num_heads", low=1)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if np.ndim(x) != 2 or np.shape(x)[1] % num_heads:
            raise ValueError(f"{name} must be [T, H] with num_heads = {num_heads} dividing H, got {np.shape(x)}")
    if key_mask is not None:
        key_mask = _checks.bool_array(key_mask, "key_mask", shape=(np.shape(k)[0],))
        if not key_mask.any():
            raise ValueError("key_mask must allow at least one key (all False)")
        key_mask = key_mask[None]
    return _merge_heads(attention(_heads(q, num_heads), _heads(k, num_heads), _heads(v, num_heads), key_mask=key_mask))


def qformer_mha_reference(q, k, v, num_heads, key_mask=None):
    """Multi-head attention of ``q [Q, H]`` over ``k, v [N, H]``: split ``H`` into ``num_heads`` heads of
    ``d = H / num_heads``, ``softmax(q_h k_h^T / sqrt(d))`` over the keys allowed by ``key_mask`` (bool ``[N]``,
    True = may be attended, None = all), times ``v_h``, heads concatenated in order: ``[Q, H]``."""
    return _qformer_heads_attention(q, k, v, num_heads, key_mask)


#: The parameters of one cross-attention block, named relative to ``encoder.layer.<i>.crossattention.``.
QFORMER_CROSS_NAMES = tuple(
    f"{m}.{p}" for m in ("attention.query", "attention.key", "attention.value", "output.dense", "output.LayerNorm")
    for p in ("weight", "bias")
)


def qformer_cross_attention_reference(query_states, image_embeds, weights, num_heads, eps=1e-12, image_mask=None):
    """One Q-Former cross-attention block, as :func:`mllm_ref.connectors.qformer.forward` runs it on a
    cross-attention layer: ``LN(q + dense(MHA(q Wq + bq, img Wk + bk, img Wv + bv)))`` with ``q = query_states
    [Q, H]``, ``img = image_embeds [N, E]``, ``weights`` the block's Hugging Face parameters
    (:data:`QFORMER_CROSS_NAMES`, Linear ``[out, in]``). Returns ``[Q, H]``."""
    from mllm_ref.nn.layernorm import layernorm
    from mllm_ref.nn.linear import linear

    if not isinstance(weights, dict):
        raise TypeError(f"weights must be a dict of parameter names -> arrays, got {type(weights).__name__}")
    missing = [n for n in QFORMER_CROSS_NAMES if n not in weights]
    if missing:
        raise ValueError(f"weights is missing the key(s) {missing}")
    w = weights

    def lin(x, name):
        return linear(x, w[name + ".weight"], w[name + ".bias"])

    ctx = _qformer_heads_attention(
        lin(query_states, "attention.query"), lin(image_embeds, "attention.key"), lin(image_embeds, "attention.value"),
        num_heads, image_mask,
    )  # fmt: skip
    residual = lin(ctx, "output.dense") + query_states
    return layernorm(residual, w["output.LayerNorm.weight"], w["output.LayerNorm.bias"], eps)


def _masked(n: int, masked: int, rng: np.random.Generator) -> np.ndarray | None:
    if not masked:
        return None
    mask = np.ones(n, dtype=bool)
    mask[rng.choice(n, size=min(masked, n - 1), replace=False)] = False
    return mask


# size -> (Q queries, N keys, H width, heads, masked keys, dtype)
_QF_MHA_SIZES = {
    "one_head": (3, 5, 4, 1, 0, np.float32),
    "heads": (4, 7, 12, 3, 0, np.float32),
    "key_mask": (5, 9, 16, 4, 3, np.float32),
    "more_queries": (8, 3, 8, 2, 1, np.float32),
    "blip2_like": (32, 40, 64, 8, 6, np.float32),
    "float64": (6, 11, 10, 2, 2, np.float64),
}


def _qformer_mha_case(size: str, rng: np.random.Generator) -> dict:
    q, n, h, heads, masked, dtype = _QF_MHA_SIZES[size]
    return {
        "q": rng.standard_normal((q, h)).astype(dtype),
        "k": rng.standard_normal((n, h)).astype(dtype),
        "v": rng.standard_normal((n, h)).astype(dtype),
        "num_heads": heads,
        "key_mask": _masked(n, masked, rng),
    }


# size -> (Q queries, H width, heads, E image width, N image tokens, masked image tokens, dtype)
_QF_CROSS_SIZES = {
    "one_head": (4, 8, 1, 6, 5, 0, np.float32),
    "heads": (6, 16, 4, 12, 9, 0, np.float32),
    "image_mask": (5, 12, 3, 10, 8, 3, np.float32),
    "more_queries": (9, 8, 2, 5, 3, 1, np.float32),
    "blip2_like": (32, 64, 8, 48, 40, 5, np.float32),
    "float64": (3, 6, 2, 7, 4, 1, np.float64),
}


def _qformer_cross_case(size: str, rng: np.random.Generator) -> dict:
    """The block's weights are those of layer 0 of a random Q-Former (:func:`~mllm_ref.connectors.qformer.
    random_weights`: LayerNorm gains and shifts away from (1, 0), so that every parameter matters)."""
    from mllm_ref.connectors.qformer import random_weights, strip_prefix

    q, h, heads, e, n, masked, dtype = _QF_CROSS_SIZES[size]
    full = random_weights(rng, hidden=h, intermediate=2 * h, encoder_hidden=e, n_layers=1, dtype=dtype)
    weights = strip_prefix(full, "encoder.layer.0.crossattention.")
    return {
        "query_states": rng.standard_normal((q, h)).astype(dtype),
        "image_embeds": rng.standard_normal((n, e)).astype(dtype),
        "weights": {name: weights[name] for name in QFORMER_CROSS_NAMES},
        "num_heads": heads,
        "eps": 1e-12,
        "image_mask": _masked(n, masked, rng),
    }


# ---------------------------------------------------------------- KIVI's key and value quantizers


def kivi_quantize_keys_reference(k, bits, group_size):
    """KIVI's keys: per channel, groups of ``group_size`` consecutive tokens, real zero point (the group minimum):
    ``k[T, d] -> (codes uint8[T, d], scale[T/G, d], minimum[T/G, d])`` (:mod:`mllm_ref.quant.affine`, ``axis=0``)."""
    from mllm_ref.quant.affine import quantize

    return quantize(k, bits, axis=0, group_size=group_size, zero_point="float")


def kivi_quantize_values_reference(v, bits, group_size):
    """KIVI's values: per token, groups of ``group_size`` consecutive channels, real zero point:
    ``v[T, d] -> (codes uint8[T, d], scale[T, d/G], minimum[T, d/G])`` (``axis=-1``)."""
    from mllm_ref.quant.affine import quantize

    return quantize(v, bits, axis=-1, group_size=group_size, zero_point="float")


def kivi_dequantize_keys_reference(codes, scale, minimum, group_size):
    """``k̂ = scale * codes + minimum``, each group's parameters repeated over its ``group_size`` tokens."""
    from mllm_ref.quant.affine import dequantize

    return dequantize(codes, scale, minimum, axis=0, group_size=group_size)


def kivi_dequantize_values_reference(codes, scale, minimum, group_size):
    """``v̂ = scale * codes + minimum``, each group's parameters repeated over its ``group_size`` channels."""
    from mllm_ref.quant.affine import dequantize

    return dequantize(codes, scale, minimum, axis=-1, group_size=group_size)


# size -> (T tokens, d channels, bits, group size, dtype)
_KIVI_SIZES = {
    "one_group": (4, 4, 2, 4, np.float32),
    "two_bits": (16, 8, 2, 8, np.float32),
    "three_bits": (12, 12, 3, 4, np.float32),
    "four_bits": (32, 32, 4, 16, np.float32),
    "float64": (6, 6, 4, 3, np.float64),
    "constant_group": (8, 4, 2, 4, np.float32),
}


def _kivi_data(size: str, rng: np.random.Generator) -> tuple[np.ndarray, int, int]:
    t, d, bits, g, dtype = _KIVI_SIZES[size]
    # channels of very different magnitude and offset, as KIVI observed in keys
    x = rng.standard_normal((t, d)) * np.exp(rng.uniform(-2, 2, d)) + rng.standard_normal(d) * 3
    if size == "constant_group":
        x[:g, 0] = 1.5  # one key group with an empty range (step 1 by convention)
        x[0, :g] = -2.0  # one value group likewise
    return x.astype(dtype), bits, g


def _kivi_keys_case(size: str, rng: np.random.Generator) -> dict:
    x, bits, g = _kivi_data(size, rng)
    return {"k": x, "bits": bits, "group_size": g}


def _kivi_values_case(size: str, rng: np.random.Generator) -> dict:
    x, bits, g = _kivi_data(size, rng)
    return {"v": x, "bits": bits, "group_size": g}


def _kivi_dequant_keys_case(size: str, rng: np.random.Generator) -> dict:
    x, bits, g = _kivi_data(size, rng)
    codes, scale, minimum = kivi_quantize_keys_reference(x, bits, g)
    return {"codes": codes, "scale": scale, "minimum": minimum, "group_size": g}


def _kivi_dequant_values_case(size: str, rng: np.random.Generator) -> dict:
    x, bits, g = _kivi_data(size, rng)
    codes, scale, minimum = kivi_quantize_values_reference(x, bits, g)
    return {"codes": codes, "scale": scale, "minimum": minimum, "group_size": g}


_KIVI_PAPER = (
    "Z. Liu, J. Yuan, H. Jin, S. Zhong, Z. Xu, V. Braverman, B. Chen, X. Hu, KIVI: A Tuning-Free Asymmetric 2bit "
    "Quantization for KV Cache, ICML 2024 (arXiv:2402.02750)"
)

_BLIP2_PAPER = (
    "J. Li, D. Li, S. Savarese, S. Hoi, BLIP-2: Bootstrapping Language-Image Pre-training with Frozen Image "
    "Encoders and Large Language Models, ICML 2023 (arXiv:2301.12597)"
)

_KV_PAPER = "Ashish Vaswani et al., Attention Is All You Need, NeurIPS 2017 (arXiv:1706.03762)"

# ---------------------------------------------------------------- speculative sampling's exactness

#: draws of the exactness test, and its false-alarm rate
EXACTNESS_DRAWS = 20000
EXACTNESS_ALPHA = 1e-6


def _chi_square_critical(df: int, alpha: float) -> float:
    """Upper ``alpha`` quantile of chi-square with ``df`` degrees of freedom (Wilson-Hilferty approximation)."""
    import math

    lo, hi = 0.0, 10.0
    for _ in range(100):  # the standard normal's upper alpha quantile by bisection
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 0.5 * math.erfc(mid / math.sqrt(2)) > alpha else (lo, mid)
    c = 2.0 / (9.0 * max(df, 1))
    return max(df, 1) * (1 - c + lo * math.sqrt(c)) ** 3


def speculative_exactness_judge(fn: Callable, kwargs: dict) -> tuple[bool, str]:
    """Run a student's ``speculative_step`` (k = 1) :data:`EXACTNESS_DRAWS` times with a fixed seed: draft ``x ~ q``,
    uniforms from the generator. The first emitted token must follow ``p``: a chi-square test at false-alarm rate
    :data:`EXACTNESS_ALPHA` over the tokens ``p`` gives mass to, and no token outside them. A second row of ``p``
    (the bonus distribution) is a one-hot on a token of its own, so a bonus emitted in place of the first token is
    caught too."""
    p, q = np.asarray(kwargs["p"], dtype=np.float64), np.asarray(kwargs["q"], dtype=np.float64)
    v = p.size
    bonus = np.zeros(v)
    bonus[-1] = 1.0
    rng = np.random.default_rng(12345)
    counts = np.zeros(v)
    for _ in range(EXACTNESS_DRAWS):
        x = int(rng.choice(v, p=q))
        out = fn(p=np.stack([p, bonus]), q=q[None].copy(), draft=np.array([x], dtype=np.int64),
                 u=rng.random(1), u_sample=float(rng.random()))  # fmt: skip
        out = np.asarray(out).reshape(-1)
        if out.size == 0 or out.size > 2:
            return False, f"one step with one draft token must emit 1 or 2 tokens, got {out.tolist()}"
        counts[int(out[0])] += 1
    n = EXACTNESS_DRAWS
    outside = counts[p == 0].sum()
    if outside:
        bad = np.flatnonzero((p == 0) & (counts > 0)).tolist()
        return False, (f"the first emitted token was {bad} (expected probability 0 under the target p) in {int(outside)} of "
                       f"{n} steps: on rejection, draw from norm(max(0, p - q)), not from q or p")  # fmt: skip
    keep = p > 0
    expected = n * p[keep]
    stat = float(np.sum((counts[keep] - expected) ** 2 / expected))
    limit = _chi_square_critical(int(keep.sum()) - 1, EXACTNESS_ALPHA)
    if stat > limit:
        freq = np.round(counts / n, 3).tolist()
        return False, (f"the emitted tokens do not follow the target: frequencies {freq}, expected p = "
                       f"{np.round(p, 3).tolist()} (chi-square {stat:.1f} > {limit:.1f}, false-alarm rate "
                       f"{EXACTNESS_ALPHA:g})")  # fmt: skip
    return True, ""


def _speculative_step(p, q, draft, u, u_sample):
    """The reference step (:func:`mllm_ref.decoding.speculative.speculative_step`), imported when called."""
    from mllm_ref.decoding.speculative import speculative_step

    return speculative_step(p, q, draft, u, u_sample)


_EXACT_SIZES = ("dirichlet", "q_with_zeros", "p_equals_q", "q_one_hot")


def _exactness_case(size: str, rng: np.random.Generator) -> dict:
    v = 4
    p = rng.dirichlet(np.full(v, 0.8))
    p[1] = 0.0  # a token the target never emits
    p /= p.sum()
    q = rng.dirichlet(np.full(v, 0.8))
    if size == "q_with_zeros":
        q[[0, 2]] = 0.0  # the drafter never proposes tokens the target wants
        q /= q.sum()
    elif size == "p_equals_q":
        q = p.copy()
    elif size == "q_one_hot":
        q = np.eye(v)[3]
    return {"p": p, "q": q}


# ---------------------------------------------------------------- CALM: softmax-margin exit and KV copying


def calm_margin_exit_reference(logits, threshold, min_layer):
    """CALM's softmax-response exit: the first layer ``l >= min_layer`` whose top-1 minus top-2 probability is at
    least ``threshold``, else the last layer (:func:`mllm_ref.dynamic.early_exit.exit_layer`, ``measure="margin"``).
    ``logits``: ``float[L, V]`` the exit heads' logits of one token."""
    from mllm_ref.dynamic.early_exit import exit_layer

    z = np.asarray(logits)
    return exit_layer(z, np.zeros((z.shape[0], 1), dtype=z.dtype), np.zeros(z.shape[0], dtype=z.dtype),
                      measure="margin", threshold=threshold, min_layer=min_layer)  # fmt: skip


def calm_copy_kv_reference(hidden, norm_weight, k_weight, v_weight, position, kv_heads, theta, eps):
    """CALM's state propagation (:func:`mllm_ref.dynamic.early_exit.copy_kv`)."""
    from mllm_ref.dynamic.early_exit import copy_kv

    return copy_kv(hidden, norm_weight, k_weight, v_weight, position=position, kv_heads=kv_heads, theta=theta, eps=eps)


_MARGIN_SIZES = {"one_layer": (1, 4), "tiny": (4, 5), "tinyvlm": (12, 42), "late": (8, 30), "never": (6, 10)}


def _margin_case(size: str, rng: np.random.Generator) -> dict:
    n, v = _MARGIN_SIZES[size]
    scale = np.linspace(0.3, 8.0, n)[:, None] if size != "never" else np.full((n, 1), 0.05)
    logits = (rng.standard_normal((n, v)) * scale).astype(np.float32)
    logits[:, 0] += 1e4 if size == "tinyvlm" else 0.0  # large logits: the softmax must be stable
    return {"logits": logits, "threshold": {"late": 0.95, "never": 0.99}.get(size, 0.5), "min_layer": 2 if size == "late" else 1}


_COPY_SIZES = {"one_layer": (1, 8, 2, 4), "tinyvlm": (7, 128, 2, 32), "gqa8": (3, 64, 4, 16)}


def _copy_case(size: str, rng: np.random.Generator) -> dict:
    s, d, hkv, hd = _COPY_SIZES[size]
    return {
        "hidden": (rng.standard_normal(d) * 3).astype(np.float32),
        "norm_weight": (1 + 0.2 * rng.standard_normal((s, d))).astype(np.float32),
        "k_weight": (rng.standard_normal((s, hkv * hd, d)) / np.sqrt(d)).astype(np.float32),
        "v_weight": (rng.standard_normal((s, hkv * hd, d)) / np.sqrt(d)).astype(np.float32),
        "position": int(rng.integers(1, 200)), "kv_heads": hkv, "theta": 10000.0, "eps": 1e-6,
    }  # fmt: skip


_CALM_PAPER = (
    "T. Schuster, A. Fisch, J. Gupta, M. Dehghani, D. Bahri, V. Q. Tran, Y. Tay, D. Metzler, Confident Adaptive "
    "Language Modeling, NeurIPS 2022 (arXiv 2207.07061)"
)

_SPEC_PAPER = (
    "Y. Leviathan, M. Kalman, Y. Matias, Fast Inference from Transformers via Speculative Decoding, ICML 2023 "
    "(arXiv 2211.17192)"
)

#: Task-only techniques (not in the registry: they are exercises, not techniques of the library). A technique with
#: ``extra["judge"]`` is graded by ``judge(fn, kwargs) -> (passed, message)`` on each case instead of a comparison
#: of one call's output (a statistical test that calls the submission many times).
GRADING_TECHNIQUES: dict[str, registry.Technique] = {
    "grading.kivi_quantize_keys": registry.Technique(
        id="grading.kivi_quantize_keys",
        reference=kivi_quantize_keys_reference,
        make_case=_kivi_keys_case,
        paper=_KIVI_PAPER,
        test_sizes=tuple(_KIVI_SIZES),
        compare="exact",
    ),
    "grading.kivi_quantize_values": registry.Technique(
        id="grading.kivi_quantize_values",
        reference=kivi_quantize_values_reference,
        make_case=_kivi_values_case,
        paper=_KIVI_PAPER,
        test_sizes=tuple(_KIVI_SIZES),
        compare="exact",
    ),
    "grading.kivi_dequantize_keys": registry.Technique(
        id="grading.kivi_dequantize_keys",
        reference=kivi_dequantize_keys_reference,
        make_case=_kivi_dequant_keys_case,
        paper=_KIVI_PAPER,
        test_sizes=tuple(_KIVI_SIZES),
        compare="tolerance",
    ),
    "grading.kivi_dequantize_values": registry.Technique(
        id="grading.kivi_dequantize_values",
        reference=kivi_dequantize_values_reference,
        make_case=_kivi_dequant_values_case,
        paper=_KIVI_PAPER,
        test_sizes=tuple(_KIVI_SIZES),
        compare="tolerance",
    ),
    "grading.kv_decode_step": registry.Technique(
        id="grading.kv_decode_step",
        reference=decode_step_reference,
        make_case=_step_case,
        paper=_KV_PAPER,
        test_sizes=tuple(_STEP_SIZES),
        compare="tolerance",
    ),
    "grading.kv_decode": registry.Technique(
        id="grading.kv_decode",
        reference=decode_reference,
        make_case=_decode_case,
        paper=_KV_PAPER,
        test_sizes=tuple(_DECODE_SIZES),
        compare="tolerance",
    ),
    "grading.fastv_scores": registry.Technique(
        id="grading.fastv_scores",
        reference=fastv_scores_reference,
        make_case=_fastv_scores_case,
        paper="L. Chen et al., An Image is Worth 1/2 Tokens After Layer 2, ECCV 2024 (arXiv 2403.06764)",
        test_sizes=("tiny", "small", "small-mean", "tinyvlm"),
        compare="tolerance",
    ),
    "grading.qformer_mha": registry.Technique(
        id="grading.qformer_mha",
        reference=qformer_mha_reference,
        make_case=_qformer_mha_case,
        paper=_BLIP2_PAPER,
        test_sizes=tuple(_QF_MHA_SIZES),
        compare="tolerance",
    ),
    "grading.qformer_cross_attention": registry.Technique(
        id="grading.qformer_cross_attention",
        reference=qformer_cross_attention_reference,
        make_case=_qformer_cross_case,
        paper=_BLIP2_PAPER,
        test_sizes=tuple(_QF_CROSS_SIZES),
        compare="tolerance",
    ),
    "grading.calm_margin_exit": registry.Technique(
        id="grading.calm_margin_exit",
        reference=calm_margin_exit_reference,
        make_case=_margin_case,
        paper=_CALM_PAPER,
        test_sizes=tuple(_MARGIN_SIZES),
        compare="exact",
    ),
    "grading.calm_copy_kv": registry.Technique(
        id="grading.calm_copy_kv",
        reference=calm_copy_kv_reference,
        make_case=_copy_case,
        paper=_CALM_PAPER,
        test_sizes=tuple(_COPY_SIZES),
        compare="tolerance",
    ),
    "grading.speculative_exactness": registry.Technique(
        id="grading.speculative_exactness",
        reference=_speculative_step,  # the solution; the judge tests the distribution of what a step emits
        make_case=_exactness_case,
        paper=_SPEC_PAPER,
        test_sizes=_EXACT_SIZES,
        compare="tolerance",
        extra={"judge": speculative_exactness_judge},
    ),
}


def technique_for(technique_id: str) -> registry.Technique:
    """The registered technique, or the task-only one of :data:`GRADING_TECHNIQUES`."""
    if technique_id in GRADING_TECHNIQUES:
        return GRADING_TECHNIQUES[technique_id]
    return registry.get(technique_id)


def grade_callable(technique_id: str, fn: Callable, *, seed: int = 0) -> Verdict:
    """Judge ``fn`` on every seeded test case of ``technique_id`` (the verdict of ``check``)."""
    technique = technique_for(technique_id)
    verdict, failed_cases = Verdict(), 0
    judge = technique.extra.get("judge")
    for size, kwargs in technique.cases("test", seed):
        if judge is None:
            case = judge_case(technique, fn, kwargs, f"case {size!r}, ")
        else:
            try:
                passed, message = judge(fn, kwargs)
            except Exception as exc:  # the submission raised: its fault, reported like any failed case
                passed, message = False, f"the function raised {type(exc).__name__}: {exc}"
            case = Verdict(passed=bool(passed), message="" if passed else f"case {size!r}, {message}")
            case.cases = 1
        failed_cases += not case.passed
        verdict = verdict.merge(case)
    return summarize(technique_id, verdict, failed_cases)


def first_failure(message: str) -> str:
    """The headline and the first failing case of a merged verdict message (the other cases are counted)."""
    lines = message.splitlines()
    if not lines:
        return message
    keep, first, current = [lines[0]], None, None
    for line in lines[1:]:
        if line.startswith("case "):
            current = line.split(",", 1)[0]  # "case 'decode'": one case may fail on several outputs
            first = first or current
        if current == first:
            keep.append(line)
    rest = len(lines) - len(keep)
    return "\n".join(keep + ([f"... ({rest} more lines about the other failing cases)"] if rest else []))
