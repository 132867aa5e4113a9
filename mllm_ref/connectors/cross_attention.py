"""Flamingo's GATED XATTN-DENSE layer: tanh-gated cross-attention to the media, inserted before a frozen LM layer,
with Flamingo's per-image media masking; and the FLOPs of inserting it every k LM layers.

Paper: J.-B. Alayrac, J. Donahue, P. Luc, A. Miech, I. Barr, Y. Hasson, K. Lenc, A. Mensch, K. Millican,
M. Reynolds, R. Ring, E. Rutherford, S. Cabi, T. Han, Z. Gong, S. Samangooei, M. Monteiro, J. Menick, S. Borgeaud,
A. Brock, A. Nematzadeh, S. Sharifzadeh, M. Binkowski, R. Barreira, O. Vinyals, A. Zisserman, K. Simonyan,
"Flamingo: a Visual Language Model for Few-Shot Learning", NeurIPS 2022 (arXiv:2204.14198). Survey: cross-modal
connectors, cross-attention fusion (``connectors.cross_attention``). The reference follows the official-style code
of mlfoundations/open_flamingo ``open_flamingo/src/helpers.py`` (``MaskedCrossAttention``,
``GatedCrossAttentionBlock``, ``FeedForward``; the same rule as lucidrains/flamingo-pytorch).

Equations (text ``x[T, D]``, media ``m[M, n, Dv]``: M images, each n tokens, e.g. Perceiver Resampler outputs)::

    a = Wout MHA( q = LN(x) Wq^T,  [k | v] = flatten(m) Wkv^T,  mask )      (no biases)
    y = x + tanh(alpha_attn) * a
    y = y + tanh(alpha_ffw) * W2 GELU(W1 LN_ff(y))                           (no biases in W1, W2)

The gates ``alpha`` are initialised to 0 (``attn_gate``, ``ff_gate``), so at initialisation the layer is the
identity and the frozen LM is unchanged; training opens them gradually.

Media masking (``media_locations``, bool ``[T]``: True at the text position of each ``<image>`` token).
``text_time[i] = sum_{j <= i} media_locations[j]`` counts the images at or before token i (the ``<image>``
token itself counts its own image); image ``j`` (0-based) has ``media_time = j + 1``. Token i may attend image j's
n tokens when

- ``only_attend_immediate_media=True`` (Flamingo's default): ``text_time[i] == j + 1`` (only the latest image);
  a token before the first image (``text_time == 0``) has its attention weights zeroed: **no cross-attention
  contribution at all** (a = 0, only the gated FFN acts);
- ``only_attend_immediate_media=False``: ``text_time[i] >= j + 1`` (every previous image). As in the official
  code, a token before the first image then has *every* key masked by the same finite ``-max`` and is not zeroed,
  so its softmax is uniform: it gets the mean of the values of all media tokens (a quirk of the code, kept for
  parity; it differs from the paper's description).

``media_locations=None`` means no mask: every token attends every media token.

Cost (:func:`xattn_dense_flops`): per inserted layer with T text tokens, M n media tokens, width D, media width
Dv, H heads of width d, FFN width f D::

    2 T D (H d)  [q]  +  2 (M n) Dv (2 H d)  [k, v]  +  4 T (M n) (H d)  [scores, values]  +  2 T (H d) D  [out]
    +  4 T D f D  [FFN]  +  ~9 T D  [two LayerNorms]  +  ~10 T f D  [GELU]  +  4 T D  [gates, residuals]

times ``n_layers // every`` inserted layers (open_flamingo inserts one before every ``every``-th LM layer:
``cross_attn_every_n_layers``).

Weights: a dict with open_flamingo's ``GatedCrossAttentionBlock`` names: ``attn.norm.{weight,bias}``,
``attn.to_q.weight [H d, D]``, ``attn.to_kv.weight [2 H d, Dv]`` (keys first, then values),
``attn.to_out.weight [D, H d]``, ``attn_gate [1]``, ``ff.0.{weight,bias}`` (LayerNorm), ``ff.1.weight [f D, D]``,
``ff.3.weight [D, f D]``, ``ff_gate [1]``.

Shape legend:
    x: ``[T, D]`` text hidden states; media: ``[M, n, Dv]`` (M images of n tokens) or ``[n, Dv]`` (one image);
    media_locations: bool ``[T]`` or None; returns ``[T, D]`` in x's dtype.

Deviations from the paper: none in the computation; batching and ``use_cached_media`` (decoding with cached media,
where every new token sees the last image) are left out. More ``<image>`` tokens than media items is rejected
(the official code would then give those tokens a uniform attention over all media). GELU exact (erf), LayerNorm
eps 1e-5 (PyTorch defaults used by the code).
"""

from __future__ import annotations

import numpy as np

from mllm_ref import _checks
from mllm_ref.connectors.perceiver_resampler import (
    check_weights,
    float_input,
    heads_arg,
    merge_heads,
    split_heads,
    weight,
)
from mllm_ref.nn.activations import gelu
from mllm_ref.nn.attention import attention
from mllm_ref.nn.layernorm import layernorm
from mllm_ref.oracle.registry import Technique, register

__all__ = ["gated_xattn_dense", "media_mask", "xattn_dense_flops", "random_weights", "WEIGHT_KEYS"]


def _gelu_exact(x: np.ndarray) -> np.ndarray:
    return gelu(x, approximate="none")


#: The NumPy reference ops; the fast paths call the same pipeline with their own attention, layernorm and GELU.
REFERENCE_OPS = {"attention": attention, "layernorm": layernorm, "gelu": _gelu_exact}


WEIGHT_KEYS = (
    "attn.norm.weight", "attn.norm.bias", "attn.to_q.weight", "attn.to_kv.weight", "attn.to_out.weight",
    "attn_gate", "ff.0.weight", "ff.0.bias", "ff.1.weight", "ff.3.weight", "ff_gate",
)  # fmt: skip


def _validate(x, media, weights, media_locations, heads, only_attend_immediate_media, eps):
    """Shared entry checks (also used by the fast paths)."""
    x = float_input(x, "x", 2)
    media = float_input(media, "media", (2, 3))
    if media.ndim == 2:
        media = media[None]
    _checks.same_dtype("x", x, "media", media)
    check_weights(weights, WEIGHT_KEYS)
    t, d0 = x.shape
    d = (d0, "the width D of x")
    dv = (media.shape[2], "the width Dv of media")
    dt = x.dtype
    w = {"attn.to_q.weight": weight(weights, "attn.to_q.weight", dt, (None, d))}
    inner = w["attn.to_q.weight"].shape[0]
    w["attn.norm.weight"] = weight(weights, "attn.norm.weight", dt, (d,))
    w["attn.norm.bias"] = weight(weights, "attn.norm.bias", dt, (d,))
    w["attn.to_kv.weight"] = weight(weights, "attn.to_kv.weight", dt, (2 * inner, dv))
    w["attn.to_out.weight"] = weight(weights, "attn.to_out.weight", dt, (d, inner))
    w["attn_gate"] = weight(weights, "attn_gate", dt, (1,))
    w["ff.0.weight"] = weight(weights, "ff.0.weight", dt, (d,))
    w["ff.0.bias"] = weight(weights, "ff.0.bias", dt, (d,))
    w["ff.1.weight"] = weight(weights, "ff.1.weight", dt, (None, d))
    w["ff.3.weight"] = weight(weights, "ff.3.weight", dt, (d, w["ff.1.weight"].shape[0]))
    w["ff_gate"] = weight(weights, "ff_gate", dt, (1,))
    heads = heads_arg(heads, inner)
    if not isinstance(only_attend_immediate_media, (bool, np.bool_)):
        raise TypeError(
            f"only_attend_immediate_media must be a bool, got {type(only_attend_immediate_media).__name__}"
        )
    if media_locations is not None:
        media_locations = _checks.bool_array(media_locations, "media_locations", shape=(None,))
        if media_locations.shape[0] != t:
            raise ValueError(
                f"media_locations must have one entry per token of x ({t}), got shape {media_locations.shape}"
            )
        if int(media_locations.sum()) > media.shape[0]:
            raise ValueError(
                f"media_locations marks {int(media_locations.sum())} <image> tokens but media holds only "
                f"{media.shape[0]} images"
            )
    eps = _checks.real(eps, "eps", low=0.0, low_open=True)
    if not dt.type(eps) > 0:
        raise ValueError(f"eps must stay positive in x's dtype {dt}, got {eps}")
    return x, media, w, media_locations, heads, bool(only_attend_immediate_media), eps


def media_mask(media_locations: np.ndarray, n_media: int, *, only_attend_immediate_media: bool = True) -> np.ndarray:
    """Which image each text token may attend: bool ``[T, M]`` (expand each image to its n tokens for the keys).

    ``text_time = cumsum(media_locations)``; image j (0-based) is allowed when ``text_time == j + 1``
    (immediate) or ``text_time >= j + 1`` (all previous). Rows of tokens before the first image are all False.
    """
    loc = _checks.bool_array(media_locations, "media_locations", shape=(None,))
    n_media = _checks.integer(n_media, "n_media", low=1)
    if int(loc.sum()) > n_media:
        raise ValueError(f"media_locations marks {int(loc.sum())} images but there are n_media={n_media}")
    text_time = np.cumsum(loc.astype(np.int64))
    media_time = np.arange(1, n_media + 1)
    if only_attend_immediate_media:
        return text_time[:, None] == media_time[None, :]
    return text_time[:, None] >= media_time[None, :]


def cross_attend(x, media, w, media_locations, heads, immediate, eps, ops) -> np.ndarray:
    """``Wout MHA(LN(x), media)`` with the media mask (the block's attention branch, before its gate)."""
    attn, ln = ops["attention"], ops["layernorm"]
    t = x.shape[0]
    n_media, n, dv = media.shape
    q = ln(x, w["attn.norm.weight"], w["attn.norm.bias"], eps) @ w["attn.to_q.weight"].T
    kv = media.reshape(n_media * n, dv) @ w["attn.to_kv.weight"].T
    inner = q.shape[1]
    qh, kh, vh = split_heads(q, heads), split_heads(kv[:, :inner], heads), split_heads(kv[:, inner:], heads)
    if media_locations is None:
        out = merge_heads(attn(qh, kh, vh))
    else:
        # The allowed keys depend on text_time only: one attention call per distinct text_time value.
        text_time = np.cumsum(media_locations.astype(np.int64))
        out = np.zeros((t, inner), dtype=x.dtype)
        for tt in np.unique(text_time):
            rows = np.flatnonzero(text_time == tt)
            if tt == 0:
                if immediate:
                    continue  # the official code zeroes the attention of text without preceding media
                # every key masked by the same finite value: a uniform softmax over all media tokens
                out[rows] = merge_heads(vh.mean(axis=2, keepdims=True))
                continue
            allowed_img = (np.arange(1, n_media + 1) == tt) if immediate else (np.arange(1, n_media + 1) <= tt)
            key_mask = np.repeat(allowed_img, n)[None, :]
            out[rows] = merge_heads(attn(np.ascontiguousarray(qh[:, :, rows]), kh, vh, key_mask=key_mask))
    return out @ w["attn.to_out.weight"].T


def gated_layer(x, media, w, media_locations, heads, immediate, eps, ops) -> np.ndarray:
    """The GATED XATTN-DENSE block on checked inputs."""
    a = cross_attend(x, media, w, media_locations, heads, immediate, eps, ops)
    y = a * np.tanh(w["attn_gate"]) + x
    h = ops["layernorm"](y, w["ff.0.weight"], w["ff.0.bias"], eps) @ w["ff.1.weight"].T
    f = ops["gelu"](h) @ w["ff.3.weight"].T
    return f * np.tanh(w["ff_gate"]) + y


def gated_xattn_dense(
    x: np.ndarray,
    media: np.ndarray,
    weights: dict,
    *,
    media_locations: np.ndarray | None = None,
    heads: int = 8,
    only_attend_immediate_media: bool = True,
    eps: float = 1e-5,
) -> np.ndarray:
    """Flamingo's GATED XATTN-DENSE layer (to run before a frozen LM layer).

    Args:
        x: ``float[T, D]`` the text hidden states entering the LM layer.
        media: ``float[M, n, Dv]`` the visual tokens of M images (e.g. Perceiver Resampler outputs), or ``[n, Dv]``.
        weights: open_flamingo ``GatedCrossAttentionBlock`` state dict (module docstring); ``attn_gate`` and
            ``ff_gate`` are ``[1]`` arrays (0 at initialisation: the layer is then the identity).
        media_locations: bool ``[T]``, True at each ``<image>`` token, or None (attend every media token).
        heads: attention heads (``to_q`` has ``heads * d_head`` rows).
        only_attend_immediate_media: attend only the latest image (True, Flamingo) or all previous images.
        eps: LayerNorm epsilon.

    Returns:
        ``float[T, D]`` in ``x``'s dtype.
    """
    x, media, w, loc, heads, immediate, eps = _validate(
        x, media, weights, media_locations, heads, only_attend_immediate_media, eps
    )
    return gated_layer(x, media, w, loc, heads, immediate, eps, REFERENCE_OPS)


def xattn_dense_flops(
    n_text: int,
    n_media_tokens: int,
    d_model: int,
    *,
    d_visual: int | None = None,
    heads: int = 8,
    dim_head: int = 64,
    ff_mult: int = 4,
    n_layers: int = 1,
    every: int = 1,
) -> float:
    """FLOPs of the GATED XATTN-DENSE layers inserted before every ``every``-th of ``n_layers`` LM layers.

    One layer: ``2 T D Hd + 4 N Dv Hd + 4 T N Hd + 2 T Hd D + 4 f T D^2 + 9 T D + 10 f T D + 4 T D`` with
    ``T = n_text``, ``N = n_media_tokens`` (all images' tokens, the dense-mask upper bound: masked scores are
    computed too), ``Hd = heads * dim_head``, ``f = ff_mult``; multiplied by ``n_layers // every``. A
    multiply-add counts 2; LayerNorm about 9 per element (mean, variance, normalise, scale, shift), exact GELU
    about 10 per element (an erf), gates and residuals 2 + 2 per element.
    """
    t = _checks.integer(n_text, "n_text", low=0)
    n = _checks.integer(n_media_tokens, "n_media_tokens", low=0)
    d = _checks.integer(d_model, "d_model", low=1)
    dv = d if d_visual is None else _checks.integer(d_visual, "d_visual", low=1)
    hd = _checks.integer(heads, "heads", low=1) * _checks.integer(dim_head, "dim_head", low=1)
    f = _checks.integer(ff_mult, "ff_mult", low=1)
    layers = _checks.integer(n_layers, "n_layers", low=0)
    every = _checks.integer(every, "every", low=1)
    per_layer = (
        2.0 * t * d * hd + 4.0 * n * dv * hd + 4.0 * t * n * hd + 2.0 * t * hd * d
        + 4.0 * f * t * d * d + 9.0 * t * d + 10.0 * f * t * d + 4.0 * t * d
    )  # fmt: skip
    return float(layers // every) * per_layer


# --------------------------------------------------------------------------------------------------------------
# Random weights, registration.


def random_weights(
    d: int, dv: int, *, heads: int, dim_head: int, ff_mult: int = 4, gates: tuple[float, float] = (0.0, 0.0),
    rng: np.random.Generator, dtype=np.float32,
) -> dict:  # fmt: skip
    """Block weights with the official names, scaled like ``1 / sqrt(fan_in)``; ``gates`` = (alpha_attn, alpha_ffw)."""
    inner, ff = heads * dim_head, ff_mult * d
    return {
        "attn.norm.weight": (1.0 + 0.1 * rng.standard_normal(d)).astype(dtype),
        "attn.norm.bias": (0.1 * rng.standard_normal(d)).astype(dtype),
        "attn.to_q.weight": (rng.standard_normal((inner, d)) / np.sqrt(d)).astype(dtype),
        "attn.to_kv.weight": (rng.standard_normal((2 * inner, dv)) / np.sqrt(dv)).astype(dtype),
        "attn.to_out.weight": (rng.standard_normal((d, inner)) / np.sqrt(inner)).astype(dtype),
        "attn_gate": np.array([gates[0]], dtype=dtype),
        "ff.0.weight": (1.0 + 0.1 * rng.standard_normal(d)).astype(dtype),
        "ff.0.bias": (0.1 * rng.standard_normal(d)).astype(dtype),
        "ff.1.weight": (rng.standard_normal((ff, d)) / np.sqrt(d)).astype(dtype),
        "ff.3.weight": (rng.standard_normal((d, ff)) / np.sqrt(ff)).astype(dtype),
        "ff_gate": np.array([gates[1]], dtype=dtype),
    }


_SIZES = {  # T, D, M images, n tokens, Dv, heads, dim_head, image positions (None: no mask), immediate
    "tiny": (4, 8, 1, 3, 6, 2, 4, None, True),
    "immediate": (12, 16, 3, 4, 12, 2, 8, (2, 5, 9), True),
    "all_previous": (12, 16, 3, 4, 12, 2, 8, (2, 5, 9), False),
    "first_is_image": (9, 16, 2, 5, 16, 4, 4, (0, 4), True),
    "bench_flamingo": (512, 1024, 4, 64, 1024, 8, 64, (0, 100, 250, 400), True),
}


def _case(size: str, rng: np.random.Generator) -> dict:
    t, d, m, n, dv, heads, dim_head, places, immediate = _SIZES[size]
    w = random_weights(d, dv, heads=heads, dim_head=dim_head, gates=tuple(rng.uniform(0.3, 1.0, 2)), rng=rng)
    kw = {
        "x": rng.standard_normal((t, d)).astype(np.float32),
        "media": rng.standard_normal((m, n, dv)).astype(np.float32),
        "weights": w,
        "heads": heads,
        "only_attend_immediate_media": immediate,
    }
    if places is not None:
        loc = np.zeros(t, dtype=bool)
        loc[list(places)] = True
        kw["media_locations"] = loc
    return kw


def _cost(kwargs: dict) -> dict:
    x, media, w = kwargs["x"], kwargs["media"], kwargs["weights"]
    t, d = x.shape
    n_tok = media.shape[0] * media.shape[1] if media.ndim == 3 else media.shape[0]
    inner = w["attn.to_q.weight"].shape[0]
    heads = kwargs.get("heads", 8)
    flops = xattn_dense_flops(
        t, n_tok, d, d_visual=media.shape[-1], heads=heads, dim_head=inner // heads,
        ff_mult=max(1, w["ff.1.weight"].shape[0] // d),
    )  # fmt: skip
    nbytes = 2 * x.nbytes + media.nbytes + sum(v.nbytes for v in w.values())
    return {"flops": flops, "bytes": float(nbytes)}


register(
    Technique(
        id="connectors.cross_attention",
        reference=gated_xattn_dense,
        make_case=_case,
        paper=(
            "J.-B. Alayrac et al., Flamingo: a Visual Language Model for Few-Shot Learning, NeurIPS 2022 "
            "(arXiv:2204.14198)"
        ),
        test_sizes=("tiny", "immediate", "all_previous", "first_is_image"),
        bench_sizes=("bench_flamingo",),
        compare="tolerance",
        cost=_cost,
        chapter="book/03-connectors.md",
        notes=(
            "open_flamingo GatedCrossAttentionBlock names and media_locations rule; no batch, no cached media; "
            "all-previous mode keeps the code's uniform attention for text before the first image"
        ),
    )
)
