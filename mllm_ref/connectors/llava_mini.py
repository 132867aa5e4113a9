"""LLaVA-Mini: modality pre-fusion and query-based compression of the visual tokens down to C (= 1) tokens.

Paper: S. Zhang, Q. Fang, Z. Yang, Y. Feng, "LLaVA-Mini: Efficient Image and Video Large Multimodal Models with One
Vision Token", ICLR 2025 (arXiv:2501.03895). Survey: cross-modal connectors, query-based compression
(``connectors.llava_mini``). The reference follows the official code, ictnlp/LLaVA-Mini
``llavamini/model/llavamini_arch.py`` (``Resampler``, ``get_abs_pos``, ``get_2d_sincos_pos_embed``,
``LlavaMiniMetaModel.build_compressor``, ``LlavaMiniMetaForCausalLM.encode_images_mini``).

Inputs: the vision encoder's N patch features ``v[N, Dv]`` (N = g x g, a square grid) and the text embeddings
``e[T, D]`` of the prompt. Steps, as ``encode_images_mini`` does them for one standard-resolution image::

    1. compression (Resampler with C = c x c learned queries, embed width Dv, no kv_proj):
         P_q  = sincos2d(c, c)                                    [C, Dv]   (MAE 2-D sincos table)
         P_k  = bicubic_resize(P_q as a c x c grid -> g x g)      [N, Dv]   (get_abs_pos; a constant when c = 1)
         X    = LN_kv(v)
         h_c  = MHA( q = LN_q(query) + P_q,  k = X + P_k,  v = X )   (nn.MultiheadAttention: in-proj + out-proj)
    2. projection: the LLaVA projector (mlp2x_gelu) on both:  g = Proj(v) [N, D],  c = Proj(h_c) [C, D]
    3. modality pre-fusion: L LLaMA decoder layers (pre-RMSNorm, RoPE causal self-attention, SwiGLU) over the
       sequence  s = [g ; c ; e]  (N + C + T tokens, positions 0 .. N + C + T - 1)
    4. outputs: the fused compressed tokens  s[N : N + C]  and the fused text  s[N + C :]; the LLM then reads
       [compressed ; fused text], C + T tokens instead of N + T.

(The paper's figure feeds the pre-fusion with the visual and text tokens; the code also carries the C compressed
tokens through it, between them, and hands the LLM their fused version: we follow the code.)

``sincos2d`` (the MAE table): ``meshgrid(w, h)`` so the first Dv/2 dims encode the column, the last Dv/2 the row;
each half is ``[sin(p omega), cos(p omega)]``, ``omega_i = 10000^(-i / (Dv/4))``. ``bicubic_resize`` is
``torch.nn.functional.interpolate(mode="bicubic", align_corners=False)``: source coordinate
``(i + 0.5) c / g - 0.5``, Keys' cubic kernel with ``a = -0.75``, indices clamped to the border.

Weights, a dict with the official names (PyTorch state-dict keys under ``model.``, Linear weights ``[out, in]``):
``compressor.query [C, Dv]``, ``compressor.ln_q.{weight,bias}``, ``compressor.ln_kv.{weight,bias}``,
``compressor.attn.in_proj_weight [3 Dv, Dv]``, ``compressor.attn.in_proj_bias [3 Dv]``,
``compressor.attn.out_proj.{weight,bias}``; ``mm_projector.0.{weight [D, Dv], bias}``,
``mm_projector.2.{weight [D, D], bias}``; per pre-fusion layer i ``prefusion_layers.{i}.input_layernorm.weight``,
``prefusion_layers.{i}.self_attn.{q,k,v,o}_proj.weight`` (no biases), ``prefusion_layers.{i}
.post_attention_layernorm.weight``, ``prefusion_layers.{i}.mlp.{gate,up,down}_proj.weight``. The fixed
``compressor.pos_embed`` buffer is recomputed, not taken.

Shape legend:
    image_features: ``[N, Dv]``, N = g^2 patches; text_embeds: ``[T, D]``; C = c^2 compressed tokens (c = 1 by
    default: one query); returns ``(compressed[C, D], fused_text[T, D])`` in the input dtype.

Deviations from the paper: none in the computation, for one standard-resolution image without padding. The
high-resolution path (sub-images), video (per-frame compression), batching and the training-time masking (answer
tokens treated as padding in the pre-fusion) are left out. The pre-fusion layers are written with mllm_ref.nn
pieces (rmsnorm, rope in HF's rotate-half layout, attention, swiglu) and follow LLaMA's ``LlamaDecoderLayer``
(the code reuses the LLM's layer class: the LLM's rms_norm_eps and rope_theta apply; 1e-5 and 10000 are the
defaults, as for Vicuna-7B v1.5); the HF RMSNorm's float32 upcast is not modelled (the reference computes in the
input dtype). The sincos tables are computed in float64 and rounded once.
"""

from __future__ import annotations

import math

import numpy as np

from mllm_ref import _checks
from mllm_ref.connectors.perceiver_resampler import (
    check_weights,
    count_layers,
    float_input,
    heads_arg,
    merge_heads,
    sincos_2d,
    split_heads,
    weight,
)
from mllm_ref.nn.activations import gelu
from mllm_ref.nn.attention import attention
from mllm_ref.nn.layernorm import layernorm
from mllm_ref.nn.mlp import swiglu
from mllm_ref.nn.rmsnorm import rmsnorm
from mllm_ref.nn.rope import rope
from mllm_ref.oracle.registry import Technique, register

__all__ = ["llava_mini", "compress", "bicubic_resize", "random_weights"]

_COMPRESSOR_KEYS = (
    "compressor.query", "compressor.ln_q.weight", "compressor.ln_q.bias", "compressor.ln_kv.weight",
    "compressor.ln_kv.bias", "compressor.attn.in_proj_weight", "compressor.attn.in_proj_bias",
    "compressor.attn.out_proj.weight", "compressor.attn.out_proj.bias",
)  # fmt: skip
_PROJ_KEYS = ("mm_projector.0.weight", "mm_projector.0.bias", "mm_projector.2.weight", "mm_projector.2.bias")
_LAYER_SUFFIXES = (
    "input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
    "self_attn.o_proj.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)  # fmt: skip


def _weight(weights: dict, key: str, dtype, shape) -> np.ndarray:
    return weight(weights, key, dtype, shape, "image_features")


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """PyTorch's bicubic coefficients for fractional offsets ``t``: ``[len(t), 4]`` for taps ``-1, 0, 1, 2``."""

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def _resize_axis(x: np.ndarray, out: int, axis: int) -> np.ndarray:
    size = x.shape[axis]
    src = (np.arange(out, dtype=np.float64) + 0.5) * (size / out) - 0.5
    base = np.floor(src)
    coef = _cubic_weights(src - base)  # [out, 4]
    idx = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3)[None, :], 0, size - 1)  # [out, 4]
    m = np.zeros((out, size))
    np.add.at(m, (np.repeat(np.arange(out), 4), idx.reshape(-1)), coef.reshape(-1))
    return np.moveaxis(np.tensordot(m, np.moveaxis(x, axis, 0), axes=(1, 0)), 0, axis)


def bicubic_resize(grid: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """``F.interpolate(grid, (out_h, out_w), mode="bicubic", align_corners=False)`` of ``grid[h, w, D]`` (float64)."""
    grid = _checks.float_array(grid, "grid", ndim=3).astype(np.float64)
    out_h = _checks.integer(out_h, "out_h", low=1)
    out_w = _checks.integer(out_w, "out_w", low=1)
    return _resize_axis(_resize_axis(grid, out_h, 0), out_w, 1)


def _square_side(n: int, name: str, what: str) -> int:
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{name} must hold a square number of {what}, got {n}")
    return side


def _validate_compressor(v, weights, compressor_heads):
    """Checks of the ``compressor.*`` weights against ``v[N, Dv]``: ``(w, g, c, compressor_heads)``."""
    n, dv0 = v.shape
    dv = (dv0, "the width Dv of image_features")
    dt = v.dtype
    g = _square_side(n, "image_features", "patches (a g x g grid)")
    w = {"compressor.query": _weight(weights, "compressor.query", dt, (None, dv))}
    c = _square_side(w["compressor.query"].shape[0], "weights['compressor.query']", "queries (a c x c grid)")
    if dv0 % 4:
        raise ValueError(f"image_features width {dv0} must be divisible by 4 (2-D sincos embedding)")
    for k in ("ln_q", "ln_kv"):
        for s in ("weight", "bias"):
            w[f"compressor.{k}.{s}"] = _weight(weights, f"compressor.{k}.{s}", dt, (dv,))
    w["compressor.attn.in_proj_weight"] = _weight(weights, "compressor.attn.in_proj_weight", dt, ((3 * dv0, dv[1]), dv))
    w["compressor.attn.in_proj_bias"] = _weight(weights, "compressor.attn.in_proj_bias", dt, ((3 * dv0, dv[1]),))
    w["compressor.attn.out_proj.weight"] = _weight(weights, "compressor.attn.out_proj.weight", dt, (dv, dv))
    w["compressor.attn.out_proj.bias"] = _weight(weights, "compressor.attn.out_proj.bias", dt, (dv,))
    return w, g, c, heads_arg(compressor_heads, dv0, "compressor_heads")


def _validate(image_features, text_embeds, weights, compressor_heads, heads, kv_heads, rms_eps, rope_theta):
    v = float_input(image_features, "image_features", 2)
    e = float_input(text_embeds, "text_embeds", 2)
    _checks.same_dtype("image_features", v, "text_embeds", e)
    if not isinstance(weights, dict):
        raise TypeError(f"weights must be a dict of named arrays, got {type(weights).__name__}")
    depth = count_layers(weights, "prefusion_layers.{}.input_layernorm.weight")
    required = list(_COMPRESSOR_KEYS + _PROJ_KEYS) + [
        f"prefusion_layers.{i}.{s}" for i in range(depth) for s in _LAYER_SUFFIXES
    ]
    check_weights(weights, required)
    dv = (v.shape[1], "the width Dv of image_features")
    d0 = e.shape[1]
    d = (d0, "the width D of text_embeds")
    dt = v.dtype
    w, g, c, compressor_heads = _validate_compressor(v, weights, compressor_heads)
    w["mm_projector.0.weight"] = _weight(weights, "mm_projector.0.weight", dt, (d, dv))
    w["mm_projector.0.bias"] = _weight(weights, "mm_projector.0.bias", dt, (d,))
    w["mm_projector.2.weight"] = _weight(weights, "mm_projector.2.weight", dt, (d, d))
    w["mm_projector.2.bias"] = _weight(weights, "mm_projector.2.bias", dt, (d,))
    heads = _checks.integer(heads, "heads", low=1)
    if d0 % heads:
        raise ValueError(f"heads = {heads} must divide the text width {d0}")
    head_dim = d0 // heads
    kv_heads = heads if kv_heads is None else _checks.integer(kv_heads, "kv_heads", low=1)
    if heads % kv_heads:
        raise ValueError(f"kv_heads = {kv_heads} must divide heads = {heads}")
    if depth and head_dim % 2:
        raise ValueError(f"the head width d / heads = {head_dim} must be even for RoPE")
    for i in range(depth):
        p = f"prefusion_layers.{i}."
        w[p + "input_layernorm.weight"] = _weight(weights, p + "input_layernorm.weight", dt, (d,))
        w[p + "post_attention_layernorm.weight"] = _weight(weights, p + "post_attention_layernorm.weight", dt, (d,))
        w[p + "self_attn.q_proj.weight"] = _weight(weights, p + "self_attn.q_proj.weight", dt, (d, d))
        for k in ("k", "v"):
            key = p + f"self_attn.{k}_proj.weight"
            w[key] = _weight(weights, key, dt, ((kv_heads * head_dim, "kv_heads x the head width D / heads"), d))
        w[p + "self_attn.o_proj.weight"] = _weight(weights, p + "self_attn.o_proj.weight", dt, (d, d))
        w[p + "mlp.gate_proj.weight"] = _weight(weights, p + "mlp.gate_proj.weight", dt, (None, d))
        f = w[p + "mlp.gate_proj.weight"].shape[0]
        w[p + "mlp.up_proj.weight"] = _weight(weights, p + "mlp.up_proj.weight", dt, (f, d))
        w[p + "mlp.down_proj.weight"] = _weight(weights, p + "mlp.down_proj.weight", dt, (d, f))
    rms_eps = _checks.real(rms_eps, "rms_eps", low=0.0, low_open=True)
    if not dt.type(rms_eps) > 0:
        raise ValueError(f"rms_eps must stay positive in the input dtype {dt}, got {rms_eps}")
    rope_theta = _checks.real(rope_theta, "rope_theta", low=0.0, low_open=True)
    return v, e, w, g, c, depth, compressor_heads, heads, kv_heads, rms_eps, rope_theta


def _gelu_exact(x: np.ndarray) -> np.ndarray:
    return gelu(x, approximate="none")


#: The NumPy reference ops; the fast paths run the same pipeline with their backend's kernels.
REFERENCE_OPS = {"attention": attention, "layernorm": layernorm, "rmsnorm": rmsnorm, "rope": rope,
                 "gelu": _gelu_exact}  # fmt: skip


def _compress(v, w, g, c, heads, ops=REFERENCE_OPS):
    """The Resampler on checked inputs: ``[C, Dv]`` (before the projector)."""
    layernorm, attention = ops["layernorm"], ops["attention"]
    dv = v.shape[1]
    dt = v.dtype
    pos_q = sincos_2d(dv, c, c)  # [C, Dv] float64
    pos_k = pos_q if c == g else bicubic_resize(pos_q.reshape(c, c, dv), g, g).reshape(g * g, dv)
    x = layernorm(v, w["compressor.ln_kv.weight"], w["compressor.ln_kv.bias"], 1e-5)
    q = layernorm(w["compressor.query"], w["compressor.ln_q.weight"], w["compressor.ln_q.bias"], 1e-5)
    q = q + pos_q.astype(dt)
    k = x + pos_k.astype(dt)
    wi, bi = w["compressor.attn.in_proj_weight"], w["compressor.attn.in_proj_bias"]
    qp = q @ wi[:dv].T + bi[:dv]
    kp = k @ wi[dv : 2 * dv].T + bi[dv : 2 * dv]
    vp = x @ wi[2 * dv :].T + bi[2 * dv :]
    o = merge_heads(attention(split_heads(qp, heads), split_heads(kp, heads), split_heads(vp, heads)))
    return o @ w["compressor.attn.out_proj.weight"].T + w["compressor.attn.out_proj.bias"]


def _project(x, w, ops=REFERENCE_OPS):
    h = ops["gelu"](x @ w["mm_projector.0.weight"].T + w["mm_projector.0.bias"])
    return h @ w["mm_projector.2.weight"].T + w["mm_projector.2.bias"]


def _decoder_layer(s, w, p, heads, kv_heads, eps, theta, ops=REFERENCE_OPS):
    """LLaMA's decoder layer (pre-RMSNorm, RoPE causal attention, SwiGLU) on ``s[L, D]``."""
    rmsnorm, rope, attention = ops["rmsnorm"], ops["rope"], ops["attention"]
    positions = np.arange(s.shape[0], dtype=np.int64)
    h = rmsnorm(s, w[p + "input_layernorm.weight"], eps)
    q = split_heads(h @ w[p + "self_attn.q_proj.weight"].T, heads)
    k = split_heads(h @ w[p + "self_attn.k_proj.weight"].T, kv_heads)
    v = split_heads(h @ w[p + "self_attn.v_proj.weight"].T, kv_heads)
    q, k = rope(q, positions, theta), rope(k, positions, theta)
    s = s + merge_heads(attention(q, k, v, causal=True)) @ w[p + "self_attn.o_proj.weight"].T
    h = rmsnorm(s, w[p + "post_attention_layernorm.weight"], eps)
    return s + swiglu(h, w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"], w[p + "mlp.down_proj.weight"])


def llava_mini(
    image_features: np.ndarray,
    text_embeds: np.ndarray,
    weights: dict,
    *,
    compressor_heads: int = 8,
    heads: int,
    kv_heads: int | None = None,
    rms_eps: float = 1e-5,
    rope_theta: float = 10000.0,
) -> tuple[np.ndarray, np.ndarray]:
    """LLaVA-Mini's connector: compress the image to C tokens and pre-fuse the visual tokens into the text.

    Args:
        image_features: ``float[N, Dv]`` vision-encoder patches, N = g^2 (row-major grid).
        text_embeds: ``float[T, D]`` the prompt's token embeddings.
        weights: the official state dict (module docstring); C = rows of ``compressor.query`` (a square; 1 in the
            paper's main setting), L pre-fusion layers = the ``prefusion_layers.{i}`` present (4 in the paper; 0
            gives the compression alone and the raw text).
        compressor_heads: heads of the compressor's ``nn.MultiheadAttention`` (8 in the code).
        heads, kv_heads: attention heads of the pre-fusion (LLaMA) layers; kv_heads defaults to heads.
        rms_eps, rope_theta: the LLM's RMSNorm epsilon and RoPE base.

    Returns:
        ``(compressed[C, D], fused_text[T, D])`` in the input dtype: what the LLM reads instead of the N visual
        tokens and the raw text.
    """
    checked = _validate(image_features, text_embeds, weights, compressor_heads, heads, kv_heads, rms_eps, rope_theta)
    return run(checked, REFERENCE_OPS)


def run(checked: tuple, ops: dict) -> tuple[np.ndarray, np.ndarray]:
    """:func:`llava_mini` on the output of its validation, with ``ops`` (attention, layernorm, rmsnorm, rope, gelu
    with the signatures of :mod:`mllm_ref.nn`; the fast paths pass their backend's kernels)."""
    v, e, w, g, c, depth, ch, heads, kv_heads, eps, theta = checked
    comp = _project(_compress(v, w, g, c, ch, ops), w, ops)  # [C, D]
    glob = _project(v, w, ops)  # [N, D]
    s = np.concatenate([glob, comp, e], axis=0)
    for i in range(depth):
        s = _decoder_layer(s, w, f"prefusion_layers.{i}.", heads, kv_heads, eps, theta, ops)
    n, cc = glob.shape[0], comp.shape[0]
    return s[n : n + cc].copy(), s[n + cc :].copy()


def compress(image_features: np.ndarray, weights: dict, *, compressor_heads: int = 8) -> np.ndarray:
    """The compression alone (step 1, before the projector): ``float[C, Dv]`` from ``image_features[N, Dv]``.

    Only the ``compressor.*`` entries of ``weights`` are read (the others are ignored).
    """
    v = float_input(image_features, "image_features", 2)
    if not isinstance(weights, dict):
        raise TypeError(f"weights must be a dict of named arrays, got {type(weights).__name__}")
    weights = check_weights({k: a for k, a in weights.items() if k.startswith("compressor.")}, _COMPRESSOR_KEYS)
    w, g, c, ch = _validate_compressor(v, weights, compressor_heads)
    return _compress(v, w, g, c, ch)


# --------------------------------------------------------------------------------------------------------------
# Random weights, registration.


def random_weights(
    dv: int, d: int, *, queries: int = 1, layers: int = 1, heads: int = 2, kv_heads: int | None = None,
    ffn: int | None = None, rng: np.random.Generator, dtype=np.float32,
) -> dict:  # fmt: skip
    """LLaVA-Mini connector weights with the official names, scaled like ``1 / sqrt(fan_in)``."""
    kv_heads = heads if kv_heads is None else kv_heads
    ffn = 3 * d if ffn is None else ffn
    hd = d // heads

    def lin(o, i):
        return (rng.standard_normal((o, i)) / np.sqrt(i)).astype(dtype)

    def vec(n, loc=0.0, scale=0.1):
        return (loc + scale * rng.standard_normal(n)).astype(dtype)

    w = {
        "compressor.query": (0.5 * rng.standard_normal((queries, dv))).astype(dtype),
        "compressor.ln_q.weight": vec(dv, 1.0), "compressor.ln_q.bias": vec(dv),
        "compressor.ln_kv.weight": vec(dv, 1.0), "compressor.ln_kv.bias": vec(dv),
        "compressor.attn.in_proj_weight": lin(3 * dv, dv), "compressor.attn.in_proj_bias": vec(3 * dv),
        "compressor.attn.out_proj.weight": lin(dv, dv), "compressor.attn.out_proj.bias": vec(dv),
        "mm_projector.0.weight": lin(d, dv), "mm_projector.0.bias": vec(d),
        "mm_projector.2.weight": lin(d, d), "mm_projector.2.bias": vec(d),
    }  # fmt: skip
    for i in range(layers):
        p = f"prefusion_layers.{i}."
        w[p + "input_layernorm.weight"] = vec(d, 1.0)
        w[p + "self_attn.q_proj.weight"] = lin(d, d)
        w[p + "self_attn.k_proj.weight"] = lin(kv_heads * hd, d)
        w[p + "self_attn.v_proj.weight"] = lin(kv_heads * hd, d)
        w[p + "self_attn.o_proj.weight"] = lin(d, d)
        w[p + "post_attention_layernorm.weight"] = vec(d, 1.0)
        w[p + "mlp.gate_proj.weight"] = lin(ffn, d)
        w[p + "mlp.up_proj.weight"] = lin(ffn, d)
        w[p + "mlp.down_proj.weight"] = lin(d, ffn)
    return w


_SIZES = {  # N patches, Dv, T text, D, C queries, layers, compressor heads, heads, kv heads
    "tiny": (4, 8, 3, 8, 1, 1, 2, 2, 2),
    "grid": (16, 16, 5, 16, 4, 2, 4, 4, 2),
    "wide": (36, 16, 7, 24, 1, 2, 2, 4, 1),
    "no_fusion": (9, 8, 4, 12, 1, 0, 2, 2, 2),
    "bench_llava": (576, 1024, 64, 1024, 1, 4, 8, 8, 8),
}


def _case(size: str, rng: np.random.Generator) -> dict:
    n, dv, t, d, c, layers, ch, h, kvh = _SIZES[size]
    w = random_weights(dv, d, queries=c, layers=layers, heads=h, kv_heads=kvh, rng=rng)
    return {
        "image_features": rng.standard_normal((n, dv)).astype(np.float32),
        "text_embeds": rng.standard_normal((t, d)).astype(np.float32),
        "weights": w,
        "compressor_heads": ch,
        "heads": h,
        "kv_heads": kvh,
    }


def _cost(kwargs: dict) -> dict:
    v, e, w = kwargs["image_features"], kwargs["text_embeds"], kwargs["weights"]
    n, dv = v.shape
    t, d = e.shape
    c = w["compressor.query"].shape[0]
    depth = count_layers(w, "prefusion_layers.{}.input_layernorm.weight")
    length = n + c + t
    comp = 2.0 * (c * dv * dv + 2 * n * dv * dv + 2 * c * n * dv + c * dv * dv)
    proj = 2.0 * (n + c) * (dv * d + d * d)
    flops = comp + proj
    if depth:
        kvw = w["prefusion_layers.0.self_attn.k_proj.weight"].shape[0]
        f = w["prefusion_layers.0.mlp.gate_proj.weight"].shape[0]
        per = 2.0 * length * (2 * d * d + 2 * d * kvw + 3 * d * f) + 2.0 * length * (length + 1) * d
        flops += depth * per
    nbytes = v.nbytes + 2 * e.nbytes + sum(a.nbytes for a in w.values())
    return {"flops": flops, "bytes": float(nbytes)}


register(
    Technique(
        id="connectors.llava_mini",
        reference=llava_mini,
        make_case=_case,
        paper=(
            "S. Zhang, Q. Fang, Z. Yang, Y. Feng, LLaVA-Mini: Efficient Image and Video Large Multimodal Models "
            "with One Vision Token, ICLR 2025 (arXiv:2501.03895)"
        ),
        test_sizes=("tiny", "grid", "wide", "no_fusion"),
        bench_sizes=("bench_llava",),
        compare="tolerance",
        cost=_cost,
        chapter="book/03-connectors.md",
        notes=(
            "official names; standard-resolution image, no batch/padding; pre-fusion = LLaMA layers from mllm_ref.nn; "
            "compressed tokens also pass the pre-fusion, as in the code"
        ),
    )
)
