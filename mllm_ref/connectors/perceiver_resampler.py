"""Perceiver Resampler (Flamingo) and MiniCPM-V's single-layer 2-D resampler: a fixed number of learned queries
that read any number of visual tokens.

Papers: J.-B. Alayrac, J. Donahue, P. Luc, A. Miech, I. Barr, Y. Hasson, K. Lenc, A. Mensch, K. Millican,
M. Reynolds, R. Ring, E. Rutherford, S. Cabi, T. Han, Z. Gong, S. Samangooei, M. Monteiro, J. Menick, S. Borgeaud,
A. Brock, A. Nematzadeh, S. Sharifzadeh, M. Binkowski, R. Barreira, O. Vinyals, A. Zisserman, K. Simonyan,
"Flamingo: a Visual Language Model for Few-Shot Learning", NeurIPS 2022 (arXiv:2204.14198); Y. Yao, T. Yu, A. Zhang,
C. Wang, J. Cui, H. Zhu, T. Cai, H. Li, W. Zhao, Z. He, Q. Chen, H. Zhou, Z. Zou, H. Zhang, S. Hu, Z. Zheng, J. Zhou,
J. Cai, X. Han, G. Zeng, D. Li, Z. Liu, M. Sun, "MiniCPM-V: A GPT-4V Level MLLM on Your Phone", arXiv:2408.01800,
2024. Survey: cross-modal connectors, query-based compression (``connectors.perceiver_resampler``).
The reference follows the official implementations: mlfoundations/open_flamingo ``open_flamingo/src/helpers.py``
(``PerceiverAttention``, ``FeedForward``, ``PerceiverResampler``; same structure as lucidrains/flamingo-pytorch) and
MiniCPM-V 2.6's ``resampler.py`` (``Resampler``, ``get_2d_sincos_pos_embed``).

Perceiver Resampler (:func:`perceiver_resampler`). Media ``x[T, N, D]`` (T frames of N tokens), learned frame (time)
embeddings ``e[T_max, D]``, learned latents ``z[Q, D]``::

    X = flatten_{t, n}( x[t, n] + e[t] )                                   [T N, D]
    for each layer l:
        Xn = LN_media(X),  Zn = LN_latents(z)
        q = Zn Wq^T,  [k | v] = concat(Xn, Zn) Wkv^T                       (no biases)
        z = z + Wout MHA(q, k, v)                                          (softmax(q k^T / sqrt(d_head)) v per head)
        z = z + W2 GELU(W1 LN_ff(z))                                       (no biases in W1, W2)
    out = LN_final(z)                                                      [Q, D]

The output has Q rows whatever N and T: that is the point. Each layer normalises the *original* media again
(``norm_media`` of layer l on X; only the latents are updated). Keys and values also include the latents.

MiniCPM-V resampler (:func:`minicpm_resampler`), one cross-attention layer with Q = 64 learned queries over the
``N = h w`` patches of one image slice (``h, w`` = ``tgt_size``)::

    X  = LN_kv(X_in Wkv^T)                          (kv_proj: no bias; identity when kv_dim == D)
    P  = sincos2d(h, w)                             [N, D]: first D/2 dims encode the column, last D/2 the row
    O  = MHA(q = LN_q(query), k = X + P, v = X)     (torch.nn.MultiheadAttention: in-proj with bias, out-proj)
    out = LN_post(O) @ proj                         [Q, D]      (proj is a [D, D] matrix, applied as x @ proj)

``sincos2d``: for a coordinate p and ``D' = D/2`` dims, ``omega_i = 10000^(-i / (D'/2))``, ``i < D'/2``, and
``emb(p) = [sin(p omega), cos(p omega)]``; the official code builds ``meshgrid(w, h)`` so the first half encodes the
column (w) index, the second half the row (h) index, token order row-major ``n = r w + c``.

Weights are dicts with the official parameter names (PyTorch ``state_dict`` keys, Linear weights ``[out, in]``):

- Perceiver (open_flamingo ``PerceiverResampler``): ``latents [Q, D]``, ``frame_embs [T_max, D]`` (optional),
  per layer ``i``: ``layers.{i}.0.norm_media.{weight,bias}``, ``layers.{i}.0.norm_latents.{weight,bias}``,
  ``layers.{i}.0.to_q.weight [H d, D]``, ``layers.{i}.0.to_kv.weight [2 H d, D]`` (keys first, then values),
  ``layers.{i}.0.to_out.weight [D, H d]``, ``layers.{i}.1.0.{weight,bias}`` (the FFN's LayerNorm),
  ``layers.{i}.1.1.weight [F, D]``, ``layers.{i}.1.3.weight [D, F]``; then ``norm.{weight,bias}``.
- MiniCPM-V (``Resampler``): ``query [Q, D]``, ``kv_proj.weight [D, kv_dim]`` (absent: identity),
  ``attn.in_proj_weight [3D, D]``, ``attn.in_proj_bias [3D]``, ``attn.out_proj.{weight [D, D], bias [D]}``,
  ``ln_q.{weight,bias}``, ``ln_kv.{weight,bias}``, ``ln_post.{weight,bias}``, ``proj [D, D]``.

Shape legend:
    x: ``[T, N, D]`` media (T frames, N tokens per frame, D width; ``[N, D]`` is one frame); Q latents; H heads of
    width d (``to_q`` has ``H d`` rows); F the FFN width; returns ``[Q, D]``. MiniCPM: x ``[N, kv_dim]`` with
    ``N = h * w``, returns ``[Q, D]``.

Deviations from the paper: none in the computation (the paper's Fig. 4 pseudo-code and open_flamingo agree).
Batching is left out (one media item per call). open_flamingo's second, per-image ``media_time_embs`` (for several
images in one sample) is not modelled: a call resamples one image or one video. GELU is the exact (erf) form and
LayerNorm eps is 1e-5, PyTorch's defaults used by the code. MiniCPM: one image slice without padding (the official
``key_padding_mask`` only masks padding in a batch); the sincos table is computed in float64 and rounded once to x's
dtype (the code computes it in float32 numpy); ``use_pos_embed=False`` is our switch to study the permutation
invariance, not an official option.
"""

from __future__ import annotations

import numpy as np

from mllm_ref import _checks
from mllm_ref.nn.activations import gelu
from mllm_ref.nn.attention import attention
from mllm_ref.nn.layernorm import layernorm
from mllm_ref.oracle.registry import Technique, register
from mllm_ref.tinyvlm.variants import tour_variants

__all__ = ["perceiver_resampler", "minicpm_resampler", "sincos_2d", "random_weights", "random_minicpm_weights"]


def _gelu_exact(x: np.ndarray) -> np.ndarray:
    return gelu(x, approximate="none")


#: The NumPy reference ops; the fast paths call the same pipeline with their own attention, layernorm and GELU.
REFERENCE_OPS = {"attention": attention, "layernorm": layernorm, "gelu": _gelu_exact}


# --------------------------------------------------------------------------------------------------------------
# Shared helpers (also used by connectors.cross_attention and connectors.llava_mini).


def float_input(x, name: str, ndim) -> np.ndarray:
    """A finite float32/float64 array (float16 rejected: the references run in float32 or float64)."""
    x = _checks.float_array(x, name, ndim=ndim)
    if x.dtype == np.float16:
        raise TypeError(f"{name} must be float32 or float64, got float16")
    return x.astype(x.dtype.newbyteorder("="), copy=False)


def check_weights(weights, required, optional=()) -> dict:
    """``weights`` must be a dict holding every key of ``required`` and nothing outside ``required | optional``."""
    if not isinstance(weights, dict):
        raise TypeError(f"weights must be a dict of named arrays, got {type(weights).__name__}")
    missing = [k for k in required if k not in weights]
    if missing:
        raise ValueError(f"weights is missing {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    extra = sorted(set(weights) - set(required) - set(optional))
    if extra:
        raise ValueError(f"weights has unexpected keys {extra[:4]}{' ...' if len(extra) > 4 else ''}")
    return weights


def weight(weights: dict, key: str, dtype, shape, x_name: str = "x") -> np.ndarray:
    """``weights[key]`` checked: a finite float array of ``shape`` in ``dtype`` (the dtype of ``x_name``).

    An entry of ``shape`` is ``None`` (any length), a size, or ``(size, "where the size comes from")``, named in
    the error so that a wrong input is named along with the weight it disagrees with.
    """
    name = f"weights[{key!r}]"
    arr = _checks.float_array(weights[key], name, ndim=len(shape))
    if arr.dtype != dtype:
        raise TypeError(f"{name} must have the same dtype as {x_name} ({dtype}), got {arr.dtype}")
    for axis, want in enumerate(shape):
        want, source = want if isinstance(want, tuple) else (want, "")
        if want is not None and arr.shape[axis] != want:
            why = f" ({source})" if source else ""
            raise ValueError(f"{name} must have size {want} on axis {axis}{why}, got shape {arr.shape}")
    return arr.astype(arr.dtype.newbyteorder("="), copy=False)


def count_layers(weights: dict, probe: str) -> int:
    """How many consecutive layers ``i = 0, 1, ...`` have the key ``probe.format(i)``."""
    n = 0
    while probe.format(n) in weights:
        n += 1
    return n


def split_heads(t: np.ndarray, heads: int) -> np.ndarray:
    """``[T, H d] -> [1, H, T, d]`` (the ``(h d)`` head-major layout of every code base here)."""
    n, width = t.shape
    return np.ascontiguousarray(t.reshape(n, heads, width // heads).transpose(1, 0, 2))[None]


def merge_heads(t: np.ndarray) -> np.ndarray:
    """``[1, H, T, d] -> [T, H d]``."""
    _, h, n, d = t.shape
    return t[0].transpose(1, 0, 2).reshape(n, h * d)


def heads_arg(heads, inner: int, name: str = "heads") -> int:
    heads = _checks.integer(heads, name, low=1)
    if inner % heads:
        raise ValueError(f"{name} = {heads} must divide the attention width {inner}")
    return heads


# --------------------------------------------------------------------------------------------------------------
# Perceiver Resampler.


def _layer_keys(i: int) -> list[str]:
    p = f"layers.{i}."
    return [
        p + "0.norm_media.weight", p + "0.norm_media.bias", p + "0.norm_latents.weight", p + "0.norm_latents.bias",
        p + "0.to_q.weight", p + "0.to_kv.weight", p + "0.to_out.weight",
        p + "1.0.weight", p + "1.0.bias", p + "1.1.weight", p + "1.3.weight",
    ]  # fmt: skip


def _validate(x, weights, heads, eps):
    """Shared entry checks (also used by the fast paths). Returns ``(x[T, N, D], weights, heads, eps, depth)``."""
    x = float_input(x, "x", (2, 3))
    if x.ndim == 2:
        x = x[None]
    if not isinstance(weights, dict):
        raise TypeError(f"weights must be a dict of named arrays, got {type(weights).__name__}")
    depth = count_layers(weights, "layers.{}.0.to_q.weight")
    if depth == 0:
        raise ValueError("weights must hold at least one layer ('layers.0.0.to_q.weight' is missing)")
    required = ["latents", "norm.weight", "norm.bias"] + [k for i in range(depth) for k in _layer_keys(i)]
    check_weights(weights, required, ("frame_embs",))
    t, _, d0 = x.shape
    d = (d0, "the width D of x")
    dt = x.dtype
    w = {"latents": weight(weights, "latents", dt, (None, d))}
    if "frame_embs" in weights:
        w["frame_embs"] = weight(weights, "frame_embs", dt, (None, d))
        if w["frame_embs"].shape[0] < t:
            raise ValueError(
                f"x has {t} frames but weights['frame_embs'] only {w['frame_embs'].shape[0]} time embeddings"
            )
    inner = weight(weights, "layers.0.0.to_q.weight", dt, (None, d)).shape[0]
    for i in range(depth):
        p = f"layers.{i}."
        for k in ("0.norm_media", "0.norm_latents", "1.0"):
            w[p + k + ".weight"] = weight(weights, p + k + ".weight", dt, (d,))
            w[p + k + ".bias"] = weight(weights, p + k + ".bias", dt, (d,))
        w[p + "0.to_q.weight"] = weight(weights, p + "0.to_q.weight", dt, (inner, d))
        w[p + "0.to_kv.weight"] = weight(weights, p + "0.to_kv.weight", dt, (2 * inner, d))
        w[p + "0.to_out.weight"] = weight(weights, p + "0.to_out.weight", dt, (d, inner))
        w[p + "1.1.weight"] = weight(weights, p + "1.1.weight", dt, (None, d))
        ff = w[p + "1.1.weight"].shape[0]
        w[p + "1.3.weight"] = weight(weights, p + "1.3.weight", dt, (d, ff))
    w["norm.weight"] = weight(weights, "norm.weight", dt, (d,))
    w["norm.bias"] = weight(weights, "norm.bias", dt, (d,))
    heads = heads_arg(heads, inner)
    eps = _checks.real(eps, "eps", low=0.0, low_open=True)
    if not dt.type(eps) > 0:
        raise ValueError(f"eps must stay positive in x's dtype {dt}, got {eps}")
    return x, w, heads, eps, depth


def resample(x, w, heads, eps, depth, ops) -> np.ndarray:
    """The Perceiver Resampler on checked inputs, with ``ops["attention"]``, ``ops["layernorm"]`` and ``ops["gelu"]``."""
    attn, ln = ops["attention"], ops["layernorm"]
    t, n, d = x.shape
    if "frame_embs" in w:
        x = x + w["frame_embs"][:t, None, :]
    media = x.reshape(t * n, d)
    z = w["latents"]
    for i in range(depth):
        p = f"layers.{i}."
        xn = ln(media, w[p + "0.norm_media.weight"], w[p + "0.norm_media.bias"], eps)
        zn = ln(z, w[p + "0.norm_latents.weight"], w[p + "0.norm_latents.bias"], eps)
        q = zn @ w[p + "0.to_q.weight"].T
        kv = np.concatenate([xn, zn], axis=0) @ w[p + "0.to_kv.weight"].T
        inner = q.shape[1]
        k, v = kv[:, :inner], kv[:, inner:]
        o = merge_heads(attn(split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)))
        z = o @ w[p + "0.to_out.weight"].T + z
        h = ln(z, w[p + "1.0.weight"], w[p + "1.0.bias"], eps) @ w[p + "1.1.weight"].T
        z = ops["gelu"](h) @ w[p + "1.3.weight"].T + z
    return ln(z, w["norm.weight"], w["norm.bias"], eps)


def perceiver_resampler(x: np.ndarray, weights: dict, *, heads: int = 8, eps: float = 1e-5) -> np.ndarray:
    """Flamingo's Perceiver Resampler: ``Q`` learned latents read the media tokens of every frame.

    Args:
        x: ``float[T, N, D]`` media tokens (T frames of N tokens) or ``float[N, D]`` (one frame).
        weights: open_flamingo ``PerceiverResampler`` state dict (see the module docstring); the number of layers
            is the number of ``layers.{i}.0.to_q.weight`` keys; ``frame_embs`` is optional (``T <= T_max``).
        heads: attention heads H (``to_q`` has ``H * d_head`` rows); the paper's default 8.
        eps: LayerNorm epsilon (PyTorch default 1e-5).

    Returns:
        ``float[Q, D]`` in ``x``'s dtype, Q = the number of latents, independent of ``T`` and ``N``.
    """
    x, w, heads, eps, depth = _validate(x, weights, heads, eps)
    return resample(x, w, heads, eps, depth, REFERENCE_OPS)


# --------------------------------------------------------------------------------------------------------------
# MiniCPM-V resampler.


def sincos_2d(embed_dim: int, h: int, w: int) -> np.ndarray:
    """MiniCPM-V's 2-D sincos table ``[h * w, embed_dim]`` (float64), row-major tokens.

    ``embed_dim`` must be divisible by 4. The first ``embed_dim / 2`` dims encode the column index, the last the row
    index (the official ``meshgrid(grid_w, grid_h)`` puts ``w`` first); each half is ``[sin(p omega), cos(p omega)]``
    with ``omega_i = 10000^(-i / (embed_dim / 4))``.
    """
    embed_dim = _checks.integer(embed_dim, "embed_dim", low=4)
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4 for the 2-D sincos embedding, got {embed_dim}")
    h = _checks.integer(h, "h", low=1)
    w = _checks.integer(w, "w", low=1)
    quarter = embed_dim // 4
    omega = 1.0 / 10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")

    def one_d(pos):
        out = pos.reshape(-1)[:, None] * omega[None, :]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(cols), one_d(rows)], axis=1)


_MINICPM_KEYS = (
    "query", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias",
    "ln_q.weight", "ln_q.bias", "ln_kv.weight", "ln_kv.bias", "ln_post.weight", "ln_post.bias", "proj",
)  # fmt: skip


def _validate_minicpm(x, weights, tgt_size, heads, use_pos_embed, eps):
    x = float_input(x, "x", 2)
    check_weights(weights, _MINICPM_KEYS, ("kv_proj.weight",))
    dt = x.dtype
    q = weight(weights, "query", dt, (None, None))
    d = q.shape[1]
    w = {"query": q}
    if "kv_proj.weight" in weights:
        w["kv_proj.weight"] = weight(weights, "kv_proj.weight", dt, (d, (x.shape[1], "the width of x")))
    elif x.shape[1] != d:
        raise ValueError(f"x must have width {d} (the queries' width; no kv_proj.weight given), got shape {x.shape}")
    w["attn.in_proj_weight"] = weight(weights, "attn.in_proj_weight", dt, (3 * d, d))
    w["attn.in_proj_bias"] = weight(weights, "attn.in_proj_bias", dt, (3 * d,))
    w["attn.out_proj.weight"] = weight(weights, "attn.out_proj.weight", dt, (d, d))
    w["attn.out_proj.bias"] = weight(weights, "attn.out_proj.bias", dt, (d,))
    for k in ("ln_q", "ln_kv", "ln_post"):
        w[k + ".weight"] = weight(weights, k + ".weight", dt, (d,))
        w[k + ".bias"] = weight(weights, k + ".bias", dt, (d,))
    w["proj"] = weight(weights, "proj", dt, (d, d))
    if not isinstance(tgt_size, (tuple, list)) or len(tgt_size) != 2:
        raise TypeError(f"tgt_size must be a pair (h, w), got {tgt_size!r}")
    gh = _checks.integer(tgt_size[0], "tgt_size[0]", low=1)
    gw = _checks.integer(tgt_size[1], "tgt_size[1]", low=1)
    if gh * gw != x.shape[0]:
        raise ValueError(f"tgt_size {gh} x {gw} must multiply to the {x.shape[0]} tokens of x")
    heads = heads_arg(heads, d)
    if not isinstance(use_pos_embed, (bool, np.bool_)):
        raise TypeError(f"use_pos_embed must be a bool, got {type(use_pos_embed).__name__}")
    if use_pos_embed and d % 4:
        raise ValueError(f"the query width {d} must be divisible by 4 for the 2-D sincos embedding")
    eps = _checks.real(eps, "eps", low=0.0, low_open=True)
    return x, w, (gh, gw), heads, bool(use_pos_embed), eps


def minicpm_resampler(
    x: np.ndarray,
    weights: dict,
    *,
    tgt_size: tuple[int, int],
    heads: int,
    use_pos_embed: bool = True,
    eps: float = 1e-6,
) -> np.ndarray:
    """MiniCPM-V's resampler: one cross-attention of ``Q`` (64) learned queries over an image slice's patches.

    Args:
        x: ``float[N, kv_dim]`` patch features of one slice, row-major, ``N = h * w``.
        weights: MiniCPM-V ``Resampler`` state dict (module docstring); ``kv_proj.weight`` absent = identity.
        tgt_size: ``(h, w)`` the patch grid of the slice.
        heads: attention heads of ``attn`` (``D // 128`` in MiniCPM-V 2.6).
        use_pos_embed: add the 2-D sincos embedding to the keys (the official model always does).
        eps: LayerNorm epsilon (the official 1e-6).

    Returns:
        ``float[Q, D]`` in ``x``'s dtype.
    """
    x, w, (gh, gw), heads, use_pos, eps = _validate_minicpm(x, weights, tgt_size, heads, use_pos_embed, eps)
    d = w["query"].shape[1]
    dt = x.dtype
    if "kv_proj.weight" in w:
        x = x @ w["kv_proj.weight"].T
    xk = layernorm(x, w["ln_kv.weight"], w["ln_kv.bias"], eps)
    keys_in = xk + sincos_2d(d, gh, gw).astype(dt) if use_pos else xk
    qn = layernorm(w["query"], w["ln_q.weight"], w["ln_q.bias"], eps)
    wi, bi = w["attn.in_proj_weight"], w["attn.in_proj_bias"]
    q = qn @ wi[:d].T + bi[:d]
    k = keys_in @ wi[d : 2 * d].T + bi[d : 2 * d]
    v = xk @ wi[2 * d :].T + bi[2 * d :]
    o = merge_heads(attention(split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)))
    o = o @ w["attn.out_proj.weight"].T + w["attn.out_proj.bias"]
    return layernorm(o, w["ln_post.weight"], w["ln_post.bias"], eps) @ w["proj"]


# --------------------------------------------------------------------------------------------------------------
# Random weights, registration.


def _ln(rng, d, dtype):
    return (1.0 + 0.1 * rng.standard_normal(d)).astype(dtype), (0.1 * rng.standard_normal(d)).astype(dtype)


def random_weights(
    d: int, *, latents: int, depth: int, heads: int, dim_head: int, ff_mult: int = 4, frames: int | None = None,
    rng: np.random.Generator, dtype=np.float32,
) -> dict:  # fmt: skip
    """Perceiver Resampler weights with the official names, scaled like ``1 / sqrt(fan_in)``."""
    inner, ff = heads * dim_head, ff_mult * d
    w = {"latents": rng.standard_normal((latents, d)).astype(dtype)}
    if frames is not None:
        w["frame_embs"] = (0.5 * rng.standard_normal((frames, d))).astype(dtype)
    for i in range(depth):
        p = f"layers.{i}."
        w[p + "0.norm_media.weight"], w[p + "0.norm_media.bias"] = _ln(rng, d, dtype)
        w[p + "0.norm_latents.weight"], w[p + "0.norm_latents.bias"] = _ln(rng, d, dtype)
        w[p + "0.to_q.weight"] = (rng.standard_normal((inner, d)) / np.sqrt(d)).astype(dtype)
        w[p + "0.to_kv.weight"] = (rng.standard_normal((2 * inner, d)) / np.sqrt(d)).astype(dtype)
        w[p + "0.to_out.weight"] = (rng.standard_normal((d, inner)) / np.sqrt(inner)).astype(dtype)
        w[p + "1.0.weight"], w[p + "1.0.bias"] = _ln(rng, d, dtype)
        w[p + "1.1.weight"] = (rng.standard_normal((ff, d)) / np.sqrt(d)).astype(dtype)
        w[p + "1.3.weight"] = (rng.standard_normal((d, ff)) / np.sqrt(ff)).astype(dtype)
    w["norm.weight"], w["norm.bias"] = _ln(rng, d, dtype)
    return w


def random_minicpm_weights(
    d: int, *, queries: int, kv_dim: int | None, rng: np.random.Generator, dtype=np.float32
) -> dict:
    """MiniCPM-V ``Resampler`` weights with the official names (``kv_proj`` only when ``kv_dim`` differs)."""
    w = {"query": rng.standard_normal((queries, d)).astype(dtype)}
    if kv_dim is not None and kv_dim != d:
        w["kv_proj.weight"] = (rng.standard_normal((d, kv_dim)) / np.sqrt(kv_dim)).astype(dtype)
    w["attn.in_proj_weight"] = (rng.standard_normal((3 * d, d)) / np.sqrt(d)).astype(dtype)
    w["attn.in_proj_bias"] = (0.1 * rng.standard_normal(3 * d)).astype(dtype)
    w["attn.out_proj.weight"] = (rng.standard_normal((d, d)) / np.sqrt(d)).astype(dtype)
    w["attn.out_proj.bias"] = (0.1 * rng.standard_normal(d)).astype(dtype)
    for k in ("ln_q", "ln_kv", "ln_post"):
        w[k + ".weight"], w[k + ".bias"] = _ln(rng, d, dtype)
    w["proj"] = (rng.standard_normal((d, d)) / np.sqrt(d)).astype(dtype)
    return w


_SIZES = {  # T frames, N tokens, D, Q latents, depth, heads, dim_head, frame_embs
    "tiny": (1, 5, 8, 3, 1, 2, 4, False),
    "video": (3, 7, 16, 4, 2, 2, 8, True),
    "small": (2, 24, 32, 8, 2, 4, 8, True),
    "bench_flamingo": (1, 256, 1024, 64, 6, 8, 64, True),
    "bench_video": (8, 256, 512, 64, 2, 8, 64, True),
}


def _case(size: str, rng: np.random.Generator) -> dict:
    t, n, d, q, depth, heads, dim_head, frames = _SIZES[size]
    x = rng.standard_normal((t, n, d)).astype(np.float32)
    w = random_weights(
        d, latents=q, depth=depth, heads=heads, dim_head=dim_head, frames=(t + 1) if frames else None, rng=rng
    )
    return {"x": x, "weights": w, "heads": heads}


def _cost(kwargs: dict) -> dict:
    x, w = kwargs["x"], kwargs["weights"]
    t, n, d = x.shape if x.ndim == 3 else (1, *x.shape)
    q = w["latents"].shape[0]
    depth = count_layers(w, "layers.{}.0.to_q.weight")
    inner = w["layers.0.0.to_q.weight"].shape[0]
    ff = w["layers.0.1.1.weight"].shape[0]
    m = t * n + q
    per_layer = 2.0 * (q * d * inner + m * d * 2 * inner + 2 * q * m * inner + q * inner * d + 2 * q * d * ff)
    nbytes = x.nbytes + sum(v.nbytes for v in w.values()) + q * d * x.itemsize
    return {"flops": depth * per_layer, "bytes": float(nbytes)}


register(
    Technique(
        id="connectors.perceiver_resampler",
        reference=perceiver_resampler,
        make_case=_case,
        paper=(
            "J.-B. Alayrac et al., Flamingo: a Visual Language Model for Few-Shot Learning, NeurIPS 2022 "
            "(arXiv:2204.14198)"
        ),
        test_sizes=("tiny", "video", "small"),
        bench_sizes=("bench_flamingo", "bench_video"),
        compare="tolerance",
        cost=_cost,
        chapter="book/03-connectors.md",
        model_level=True,
        extra={"variants": tour_variants({"resampler32": "32 latents, 2 layers (trained, base frozen)"})},
        notes="open_flamingo parameter names; one media item per call (no batch, no per-image media_time_embs)",
    )
)
