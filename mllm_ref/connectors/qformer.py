"""BLIP-2 Q-Former: learned queries that read the image through cross-attention (Hugging Face weights).

Paper: J. Li, D. Li, S. Savarese, S. Hoi, "BLIP-2: Bootstrapping Language-Image Pre-training with Frozen Image
Encoders and Large Language Models", ICML 2023 (arXiv:2301.12597). Survey: cross-modal connectors, query-based
compression (TECHNIQUES.md, ``connectors.qformer``). The reference follows Hugging Face transformers'
``Blip2QFormerModel`` in eval mode (transformers 5.x, ``models/blip_2/modeling_blip_2.py``) and loads its
``state_dict`` names as they are; the stage-1 masks follow the paper (Fig. 2) and Salesforce LAVIS
(``lavis/models/blip2_models/Qformer.py``, ``blip2_qformer.py``).

The Q-Former is a BERT-style post-LayerNorm transformer over a sequence of ``Q`` learned query embeddings (and
optionally ``T`` text embeddings after them, ``L = Q + T``). The frozen image encoder's ``N`` features of width
``E`` enter only through cross-attention, on the layers ``i`` with ``i % cross_attention_frequency == 0``::

    x      = LN_in([queries; text])                                                  (L x H)
    layer i:
      a    = LN(x + Wo MHA(x W_q, x W_k, x W_v; self mask M))                        self-attention, all L rows
      q    = a[:Q]
      q    = LN(q + Wo' MHA(q W_q', img W_k', img W_v'; image mask))   if i % f == 0  queries only
      x[:Q] = LN(q + W2q gelu(W1q q))                                                 the query FFN
      x[Q:] = LN(a[Q:] + W2 gelu(W1 a[Q:]))                                           the text FFN
    output = x                                                                        (L x H)

``MHA(Q, K, V)`` splits the width into ``num_heads`` heads of ``d = H / num_heads``, computes
``softmax(Q_h K_h^T / sqrt(d)) V_h`` per head and concatenates the heads; every projection has a bias; ``gelu`` is
the exact (erf) GELU of ``hidden_act="gelu"``; ``LN`` has ``eps = layer_norm_eps = 1e-12``. Text tokens never
attend to the image directly, only to the queries. The queries have no position embedding and the image
features get none inside the Q-Former, so the output is invariant to a permutation of the image tokens.

Stage-1 self-attention masks (BLIP-2 Fig. 2), ``M[i, j]`` = row ``i`` may attend to column ``j`` of ``[Q; T]``:

- ``"itm"`` (image-text matching, bi-directional): every token sees every token. Hugging Face's only behaviour.
- ``"itc"`` (image-text contrastive, uni-modal): queries see queries, text sees text (block diagonal). LAVIS runs
  two separate forwards; since every other step is per token, one masked forward is the same computation.
- ``"itg"`` (image-grounded text generation, multimodal causal): queries see queries only; text token ``t`` sees
  every query and the text tokens ``<= t``. LAVIS caches the queries' keys/values from the query-only pass and
  decodes the text; the queries here see exactly what they see in that pass, so the values are the same.

:func:`stage1_mask` builds ``M``; :func:`qformer` applies it as two attention calls (query rows over the allowed
key block, text rows over theirs, causal for ``"itg"``), with no ``L x L`` score matrix over forbidden pairs.

Weights: ``weights`` is a dict of Hugging Face ``Blip2QFormerModel`` state-dict names -> float arrays (PyTorch
layout ``[out, in]`` for Linear), e.g. ``"encoder.layer.0.attention.attention.query.weight"``. The number of layers
is the largest ``encoder.layer.<i>`` index plus one. Needed, with ``H`` hidden, ``I`` intermediate, ``E`` image
width: ``layernorm.{weight,bias} [H]``; per layer ``attention.attention.{query,key,value}.{weight [H,H], bias [H]}``,
``attention.output.dense.{weight [H,H], bias [H]}``, ``attention.output.LayerNorm.{weight,bias} [H]``,
``intermediate_query.dense.{weight [I,H], bias [I]}``, ``output_query.dense.{weight [H,I], bias [H]}``,
``output_query.LayerNorm.{weight,bias} [H]``; on cross-attention layers ``crossattention.attention.query [H,H]``,
``crossattention.attention.{key,value}.weight [H,E]`` (biases ``[H]``), ``crossattention.output.dense`` and
``crossattention.output.LayerNorm`` as for self-attention; with text, ``intermediate.dense``, ``output.dense`` and
``output.LayerNorm`` (the text FFN, present when HF's ``use_qformer_text_input=True``). A parent model's names
(``qformer.encoder...``) must have their prefix removed first: see :func:`strip_prefix`.

Shape legend:
    query_embeds: ``[Q, H]`` the learned query tokens (BLIP-2: ``Q = 32``, ``H = 768``).
    image_embeds: ``[N, E]`` frozen image features (BLIP-2 ViT-g: ``N = 257``, ``E = 1408``), after the vision
    encoder's final LayerNorm.
    weights: dict name -> array as above, all of ``query_embeds``' dtype.
    image_mask: bool ``[N]`` or None; True = the image token may be attended (at least one True).
    text_embeds: ``[T, H]`` or None, text token embeddings (word + position embeddings, as HF's
    ``Blip2TextEmbeddings`` makes them; the Q-Former's input LayerNorm is applied here).
    returns: ``[Q + T, H]`` the last hidden state (``[Q, H]`` without text), in ``query_embeds``' dtype.

Deviations from the paper: none in the computation (it is HF's eval-mode forward: no dropout). Unbatched: one
image (and one caption) per call; text padding masks are not supported (a single caption has none). Hugging Face
adds ``finfo.min`` to masked scores, so a row with no allowed key averages every value; here such rows cannot
occur: an ``image_mask`` with no True entry is rejected, and every stage-1 mask row sees at least itself.
float16 is rejected (HF keeps the Q-Former in float32).
"""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np

from mllm_ref import _checks
from mllm_ref.connectors.safetensors_io import load_safetensors
from mllm_ref.nn.activations import gelu
from mllm_ref.nn.attention import attention
from mllm_ref.nn.layernorm import layernorm
from mllm_ref.nn.linear import linear
from mllm_ref.oracle.registry import Technique, register
from mllm_ref.tinyvlm.variants import tour_variants

__all__ = [
    "KINDS",
    "forward",
    "load_safetensors",
    "qformer",
    "random_weights",
    "self_attention_blocks",
    "stage1_mask",
    "strip_prefix",
]

#: The stage-1 self-attention kinds of BLIP-2 (see the module docstring).
KINDS = ("itm", "itc", "itg")

_LAYER_RE = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_SELF = "attention"
_CROSS = "crossattention"
_QUERY_FFN = ("intermediate_query", "output_query")
_TEXT_FFN = ("intermediate", "output")


def stage1_mask(n_query: int, n_text: int, kind: str) -> np.ndarray:
    """The BLIP-2 stage-1 self-attention mask over ``[queries; text]``: bool ``[L, L]``, ``L = n_query + n_text``,
    ``M[i, j]`` True when token ``i`` may attend to token ``j``.

    ``"itm"``: all True. ``"itc"``: block diagonal (queries <-> queries, text <-> text). ``"itg"``: queries see the
    queries; text row ``t`` sees every query and the text tokens ``0..t`` (lower triangle).
    """
    n_query = _checks.integer(n_query, "n_query", low=0)
    n_text = _checks.integer(n_text, "n_text", low=0)
    _checks.choice(kind, "kind", KINDS)
    q, L = n_query, n_query + n_text
    m = np.zeros((L, L), dtype=bool)
    if kind == "itm":
        m[:] = True
    elif kind == "itc":
        m[:q, :q] = True
        m[q:, q:] = True
    else:  # itg
        m[:q, :q] = True
        m[q:, :q] = True
        m[q:, q:] = np.tril(np.ones((n_text, n_text), dtype=bool))
    return m


def self_attention_blocks(n_query: int, n_text: int, kind: str) -> list[tuple[slice, slice, bool]]:
    """The mask of :func:`stage1_mask` as attention calls: ``[(rows, keys, causal), ...]``.

    Each entry says: the rows ``rows`` of the sequence attend to the keys ``keys`` (contiguous), causally aligned to
    the end of the keys when ``causal`` (row ``t`` of the block sees keys ``<= len(keys) - len(rows) + t``).
    Together they give exactly the allowed pairs of :func:`stage1_mask`, each row in one block.
    """
    q, L = n_query, n_query + n_text
    if n_text == 0 or kind == "itm":
        return [(slice(0, L), slice(0, L), False)]
    if kind == "itc":
        return [(slice(0, q), slice(0, q), False), (slice(q, L), slice(q, L), False)]
    if q == 0:
        return [(slice(0, L), slice(0, L), True)]
    return [(slice(0, q), slice(0, q), False), (slice(q, L), slice(0, L), True)]  # itg


def strip_prefix(state_dict: dict, prefix: str = "qformer.") -> dict:
    """The entries of a parent model's state dict under ``prefix``, with the prefix removed (e.g. the Q-Former of
    ``Blip2Model``: ``"qformer.encoder.layer.0..."`` -> ``"encoder.layer.0..."``)."""
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------------------------------------------
# Validation (shared with the fast paths).


class Checked(NamedTuple):
    """Validated arguments of :func:`qformer` (all arrays native byte order, one dtype)."""

    query: np.ndarray
    image: np.ndarray
    weights: dict
    num_heads: int
    freq: int
    eps: float
    image_mask: np.ndarray | None
    text: np.ndarray | None
    kind: str
    n_layers: int


def _float_input(x, name: str, ndim: int) -> np.ndarray:
    x = _checks.float_array(x, name, ndim=ndim)
    if x.dtype == np.float16:
        raise TypeError(f"{name} must be float32 or float64, got float16 (the Q-Former runs in float32)")
    return x.astype(x.dtype.newbyteorder("="), copy=False)


def _expected_shapes(i: int, h: int, e: int, inter: dict, cross: bool, text: bool) -> dict:
    """Name -> (shape, where the sizes come from) of the weights layer ``i`` needs."""
    p = f"encoder.layer.{i}."
    hh = "H = query_embeds.shape[1]"
    out = {}
    for m in ("query", "key", "value"):
        out[f"{p}attention.attention.{m}.weight"] = ((h, h), hh)
        out[f"{p}attention.attention.{m}.bias"] = ((h,), hh)
    out[f"{p}attention.output.dense.weight"] = ((h, h), hh)
    for n in ("attention.output.dense.bias", "attention.output.LayerNorm.weight", "attention.output.LayerNorm.bias"):
        out[p + n] = ((h,), hh)
    if cross:
        he = "H = query_embeds.shape[1], E = image_embeds.shape[1]"
        out[f"{p}crossattention.attention.query.weight"] = ((h, h), hh)
        out[f"{p}crossattention.attention.key.weight"] = ((h, e), he)
        out[f"{p}crossattention.attention.value.weight"] = ((h, e), he)
        for m in ("query", "key", "value"):
            out[f"{p}crossattention.attention.{m}.bias"] = ((h,), hh)
        out[f"{p}crossattention.output.dense.weight"] = ((h, h), hh)
        for n in ("dense.bias", "LayerNorm.weight", "LayerNorm.bias"):
            out[f"{p}crossattention.output.{n}"] = ((h,), hh)
    ffns = [_QUERY_FFN] + ([_TEXT_FFN] if text else [])
    for up, down in ffns:
        isz = inter[up]
        hi = f"H = query_embeds.shape[1], I = {isz} from {p}{up}.dense.weight"
        out[f"{p}{up}.dense.weight"] = ((isz, h), hi)
        out[f"{p}{up}.dense.bias"] = ((isz,), hi)
        out[f"{p}{down}.dense.weight"] = ((h, isz), hi)
        for n in ("dense.bias", "LayerNorm.weight", "LayerNorm.bias"):
            out[f"{p}{down}.{n}"] = ((h,), hh)
    return out


def _validate(
    query_embeds, image_embeds, weights, num_heads, cross_attention_frequency, eps, image_mask, text_embeds,
    attention_kind,
) -> Checked:  # fmt: skip
    """Shared entry checks (also used by the fast paths)."""
    query = _float_input(query_embeds, "query_embeds", 2)
    image = _float_input(image_embeds, "image_embeds", 2)
    _checks.same_dtype("query_embeds", query, "image_embeds", image)
    h, (n_img, e) = query.shape[1], image.shape
    text = None
    if text_embeds is not None:
        text = _float_input(text_embeds, "text_embeds", 2)
        _checks.same_dtype("query_embeds", query, "text_embeds", text)
        if text.shape[1] != h:
            raise ValueError(
                f"text_embeds must have width H = query_embeds.shape[1] = {h}, got shape {text.shape}"
            )
    num_heads = _checks.integer(num_heads, "num_heads", low=1)
    if h % num_heads:
        raise ValueError(f"num_heads = {num_heads} must divide the hidden size H = query_embeds.shape[1] = {h}")
    freq = _checks.integer(cross_attention_frequency, "cross_attention_frequency", low=1)
    eps = _checks.real(eps, "eps", low=0.0, low_open=True)
    with np.errstate(over="ignore", under="ignore"):
        eps_x = query.dtype.type(eps)
    if not 0 < eps_x < np.inf:
        raise ValueError(f"eps must stay positive and finite in query_embeds' dtype {query.dtype}, got {eps}")
    if not isinstance(attention_kind, str):
        raise TypeError(f"attention_kind must be one of {list(KINDS)}, got {type(attention_kind).__name__}")
    _checks.choice(attention_kind, "attention_kind", KINDS)
    if image_mask is not None:
        image_mask = _checks.bool_array(image_mask, "image_mask")
        if image_mask.shape != (n_img,):
            raise ValueError(
                f"image_mask must have shape ({n_img},), one entry per token of image_embeds, got {image_mask.shape}"
            )
        if not image_mask.any():
            raise ValueError("image_mask must allow at least one image token (all False)")

    if not isinstance(weights, dict):
        raise TypeError(f"weights must be a dict of state-dict names -> arrays, got {type(weights).__name__}")
    layers: dict[int, set] = {}
    for key in weights:
        if not isinstance(key, str):
            raise TypeError(f"weights keys must be str state-dict names, got {key!r}")
        m = _LAYER_RE.match(key)
        if m:
            layers.setdefault(int(m.group(1)), set()).add(m.group(2).split(".", 1)[0])
    if not layers:
        raise ValueError("weights has no 'encoder.layer.<i>.' entries (a Blip2QFormerModel state dict is needed)")
    n_layers = max(layers) + 1
    for i in range(n_layers):
        has_cross = _CROSS in layers.get(i, set())
        if has_cross != (i % freq == 0):
            raise ValueError(
                f"weights {'hold' if has_cross else 'lack'} crossattention for layer {i}, but "
                f"cross_attention_frequency = {freq} puts cross-attention on the layers i with i % {freq} == 0"
            )
    expected = {"layernorm.weight": ((h,), "H = query_embeds.shape[1]"), "layernorm.bias": ((h,), "H")}
    for i in range(n_layers):
        inter = {}
        for up in (_QUERY_FFN[0],) + ((_TEXT_FFN[0],) if text is not None else ()):
            name = f"encoder.layer.{i}.{up}.dense.weight"
            if name not in weights:
                raise ValueError(f"weights is missing the key {name!r}")
            w = weights[name]
            inter[up] = w.shape[0] if isinstance(w, np.ndarray) and w.ndim == 2 else -1
        expected.update(_expected_shapes(i, h, e, inter, i % freq == 0, text is not None))
    out = {}
    for name, (shape, why) in expected.items():
        if name not in weights:
            raise ValueError(f"weights is missing the key {name!r}")
        label = f"weights[{name!r}]"
        if not isinstance(weights[name], np.ndarray):
            raise TypeError(f"{label} must be a NumPy float array, got {type(weights[name]).__name__}")
        w = _float_input(weights[name], label, len(shape))
        _checks.same_dtype("query_embeds", query, label, w)
        if w.shape != shape:
            raise ValueError(f"{label} must have shape {shape} ({why}), got {w.shape}")
        out[name] = w
    known = set(expected)
    for name in weights:
        if name in known:
            continue
        m = _LAYER_RE.match(name)
        ok_unused = m and m.group(2).split(".", 1)[0] in _TEXT_FFN and text is None  # text FFN without text
        if not ok_unused:
            raise ValueError(f"weights has an unexpected key {name!r} (not a Blip2QFormerModel parameter here)")
    return Checked(query, image, out, num_heads, freq, eps, image_mask, text, attention_kind, n_layers)


# --------------------------------------------------------------------------------------------------------------
# The forward.


def _heads(x: np.ndarray, num_heads: int) -> np.ndarray:
    """``[T, H] -> [1, heads, T, d]``."""
    t, h = x.shape
    return x.reshape(t, num_heads, h // num_heads).transpose(1, 0, 2)[None]


def _merge_heads(x: np.ndarray) -> np.ndarray:
    """``[1, heads, T, d] -> [T, H]`` (heads concatenated in order)."""
    _, nh, t, d = x.shape
    return x[0].transpose(1, 0, 2).reshape(t, nh * d)


def _gelu_exact(x: np.ndarray) -> np.ndarray:
    return gelu(x, approximate="none")


def forward(
    c: Checked, *, layernorm=layernorm, attention=attention, gelu=_gelu_exact, cross_attention=None
) -> np.ndarray:
    """The Q-Former forward on validated arguments, with pluggable LayerNorm, attention and exact-GELU functions
    (signatures of :mod:`mllm_ref.nn`; the Numba fast path passes its kernels, the reference the NumPy ones).
    ``cross_attention`` (default: ``attention``) is the one used for the queries over the image, so that a caller
    can watch it (:func:`cross_attention_maps`). The Linear layers are ``x @ W.T + b``
    (:func:`mllm_ref.nn.linear.linear`)."""
    cross_attention = attention if cross_attention is None else cross_attention
    w, nh, eps, q_len = c.weights, c.num_heads, c.eps, c.query.shape[0]

    def ln(x, prefix):
        return layernorm(x, w[prefix + ".weight"], w[prefix + ".bias"], eps)

    def lin(x, prefix):
        return linear(x, w[prefix + ".weight"], w[prefix + ".bias"])

    def ffn(x, p, up, down):
        return ln(lin(gelu(lin(x, f"{p}{up}.dense")), f"{p}{down}.dense") + x, f"{p}{down}.LayerNorm")

    x = c.query if c.text is None else np.concatenate([c.query, c.text], axis=0)
    n_text = x.shape[0] - q_len
    blocks = self_attention_blocks(q_len, n_text, c.kind)
    key_mask = None if c.image_mask is None else c.image_mask[None]
    x = ln(x, "layernorm")
    for i in range(c.n_layers):
        p = f"encoder.layer.{i}."
        # Self-attention over [queries; text] under the stage-1 mask, BERT post-LN residual.
        qh = _heads(lin(x, p + "attention.attention.query"), nh)
        kh = _heads(lin(x, p + "attention.attention.key"), nh)
        vh = _heads(lin(x, p + "attention.attention.value"), nh)
        ctx = np.concatenate(
            [attention(qh[:, :, r], kh[:, :, k], vh[:, :, k], causal=causal) for r, k, causal in blocks], axis=2
        )
        a = ln(lin(_merge_heads(ctx), p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
        q = a[:q_len]
        if i % c.freq == 0:  # cross-attention of the query rows to the image features
            cq = _heads(lin(q, p + "crossattention.attention.query"), nh)
            ck = _heads(lin(c.image, p + "crossattention.attention.key"), nh)
            cv = _heads(lin(c.image, p + "crossattention.attention.value"), nh)
            cctx = _merge_heads(cross_attention(cq, ck, cv, key_mask=key_mask))
            q = ln(lin(cctx, p + "crossattention.output.dense") + q, p + "crossattention.output.LayerNorm")
        yq = ffn(q, p, *_QUERY_FFN)
        x = yq if n_text == 0 else np.concatenate([yq, ffn(a[q_len:], p, *_TEXT_FFN)], axis=0)
    return x


def qformer(
    query_embeds: np.ndarray,
    image_embeds: np.ndarray,
    weights: dict,
    *,
    num_heads: int,
    cross_attention_frequency: int = 2,
    eps: float = 1e-12,
    image_mask: np.ndarray | None = None,
    text_embeds: np.ndarray | None = None,
    attention_kind: str = "itm",
) -> np.ndarray:
    """The Q-Former forward of Hugging Face's ``Blip2QFormerModel`` (eval mode), one image.

    Args:
        query_embeds: ``float[Q, H]`` the query tokens (float32 or float64, finite).
        image_embeds: ``float[N, E]`` image features, same dtype.
        weights: dict of ``Blip2QFormerModel`` state-dict names -> arrays of that dtype (module docstring).
        num_heads: attention heads, dividing ``H`` (HF ``num_attention_heads``; BLIP-2: 12).
        cross_attention_frequency: cross-attention on layers ``i % f == 0`` (BLIP-2: 2); must match the weights.
        eps: LayerNorm epsilon (HF ``layer_norm_eps`` = 1e-12).
        image_mask: bool ``[N]`` or None (all valid); True = the image token may be attended.
        text_embeds: ``float[T, H]`` or None; text tokens appended after the queries (they use the text FFN).
        attention_kind: the stage-1 self-attention mask when text is given: ``"itm"`` (bi-directional, HF's
            behaviour), ``"itc"`` (uni-modal) or ``"itg"`` (multimodal causal); see :func:`stage1_mask`.

    Returns:
        ``float[Q + T, H]``: the last hidden state (queries first), in ``query_embeds``' dtype.
    """
    c = _validate(
        query_embeds, image_embeds, weights, num_heads, cross_attention_frequency, eps, image_mask, text_embeds,
        attention_kind,
    )  # fmt: skip
    return forward(c)


def cross_attention_maps(
    query_embeds: np.ndarray,
    image_embeds: np.ndarray,
    weights: dict,
    *,
    num_heads: int,
    cross_attention_frequency: int = 2,
    eps: float = 1e-12,
    image_mask: np.ndarray | None = None,
) -> np.ndarray:
    """Where each query looks: the cross-attention weights of every cross-attention layer (queries only).

    Same arguments as :func:`qformer` (without text). Returns ``float[C, heads, Q, N]``, ``C`` the number of
    cross-attention layers, each row a distribution over the ``N`` image tokens (zero on masked ones). The forward
    is :func:`forward` itself, with a cross-attention that also records its weights.
    """
    c = _validate(query_embeds, image_embeds, weights, num_heads, cross_attention_frequency, eps, image_mask, None,
                  "itm")  # fmt: skip
    maps = []

    def recording(q, k, v, **kw):
        out, w = attention(q, k, v, return_weights=True, **kw)
        maps.append(w[0])
        return out

    forward(c, cross_attention=recording)
    return np.stack(maps)


# --------------------------------------------------------------------------------------------------------------
# Registration: random well-conditioned weights, cost and Hypothesis strategy.


def random_weights(
    rng: np.random.Generator, *, hidden: int, intermediate: int, encoder_hidden: int, n_layers: int,
    cross_attention_frequency: int = 2, text_ffn: bool = False, dtype=np.float32,
) -> dict:  # fmt: skip
    """A random ``Blip2QFormerModel`` state dict: Linear weights ``N(0, 1/fan_in)``, biases ``N(0, 0.02^2)``,
    LayerNorm gains ``1 + N(0, 0.1^2)`` and shifts ``N(0, 0.1^2)`` (well conditioned at every depth)."""
    w: dict[str, np.ndarray] = {}

    def lin(name, out_f, in_f):
        w[name + ".weight"] = (rng.standard_normal((out_f, in_f)) / np.sqrt(in_f)).astype(dtype)
        w[name + ".bias"] = (0.02 * rng.standard_normal(out_f)).astype(dtype)

    def ln(name):
        w[name + ".weight"] = (1.0 + 0.1 * rng.standard_normal(hidden)).astype(dtype)
        w[name + ".bias"] = (0.1 * rng.standard_normal(hidden)).astype(dtype)

    h, i_sz, e = hidden, intermediate, encoder_hidden
    ln("layernorm")
    for i in range(n_layers):
        p = f"encoder.layer.{i}."
        for m in ("query", "key", "value"):
            lin(f"{p}attention.attention.{m}", h, h)
        lin(p + "attention.output.dense", h, h)
        ln(p + "attention.output.LayerNorm")
        if i % cross_attention_frequency == 0:
            lin(p + "crossattention.attention.query", h, h)
            lin(p + "crossattention.attention.key", h, e)
            lin(p + "crossattention.attention.value", h, e)
            lin(p + "crossattention.output.dense", h, h)
            ln(p + "crossattention.output.LayerNorm")
        ffns = [_QUERY_FFN] + ([_TEXT_FFN] if text_ffn else [])
        for up, down in ffns:
            lin(f"{p}{up}.dense", i_sz, h)
            lin(f"{p}{down}.dense", h, i_sz)
            ln(f"{p}{down}.LayerNorm")
    return w


# size -> (Q, H, heads, I, E, N, layers, freq, T text tokens or 0, kind, masked image tokens)
_SIZES = {
    "tiny": (3, 8, 2, 16, 6, 5, 2, 2, 0, "itm", 0),
    "small": (8, 32, 4, 64, 24, 17, 4, 2, 0, "itm", 4),
    "text_itg": (4, 16, 4, 32, 12, 9, 3, 1, 5, "itg", 2),
    "text_itc": (5, 12, 3, 20, 7, 6, 2, 2, 3, "itc", 0),
    "bench_blip2": (32, 768, 12, 3072, 1408, 257, 12, 2, 0, "itm", 0),  # BLIP-2 (ViT-g) Q-Former, 105 M params
    "bench_small": (32, 256, 8, 1024, 512, 257, 6, 2, 0, "itm", 0),
}


def _make(q, h, heads, i_sz, e, n, layers, freq, t, kind, masked, rng, dtype=np.float32) -> dict:
    weights = random_weights(
        rng, hidden=h, intermediate=i_sz, encoder_hidden=e, n_layers=layers, cross_attention_frequency=freq,
        text_ffn=t > 0, dtype=dtype,
    )  # fmt: skip
    image_mask = None
    if masked:
        image_mask = np.ones(n, dtype=bool)
        image_mask[rng.choice(n, size=min(masked, n - 1), replace=False)] = False
    return {
        "query_embeds": rng.standard_normal((q, h)).astype(dtype),
        "image_embeds": rng.standard_normal((n, e)).astype(dtype),
        "weights": weights,
        "num_heads": heads,
        "cross_attention_frequency": freq,
        "eps": 1e-12,
        "image_mask": image_mask,
        "text_embeds": rng.standard_normal((t, h)).astype(dtype) if t else None,
        "attention_kind": kind,
    }


def _case(size: str, rng: np.random.Generator) -> dict:
    return _make(*_SIZES[size], rng)


def _pairs(q: int, t: int, kind: str) -> int:
    return int(stage1_mask(q, t, kind).sum())


def _cost(kwargs: dict) -> dict:
    """FLOPs: 2 per multiply-add of every projection and attention product, plus ~5 per softmax score, ~8 per
    LayerNorm element and ~10 per GELU; bytes: weights, inputs and output read/written once."""
    q, h = kwargs["query_embeds"].shape
    n, e = kwargs["image_embeds"].shape
    text = kwargs.get("text_embeds")
    t = 0 if text is None else text.shape[0]
    L = q + t
    w = kwargs["weights"]
    freq = kwargs.get("cross_attention_frequency", 2)
    n_layers = 1 + max(int(m.group(1)) for m in map(_LAYER_RE.match, w) if m)
    mask = kwargs.get("image_mask")
    n_vis = n if mask is None else int(np.sum(mask))
    pairs = _pairs(q, t, kwargs.get("attention_kind", "itm"))
    flops = 8.0 * L * h
    for i in range(n_layers):
        i_sz = w[f"encoder.layer.{i}.intermediate_query.dense.weight"].shape[0]
        flops += 2.0 * L * h * h * 4 + 4.0 * pairs * h + 5.0 * pairs * kwargs["num_heads"] + 16.0 * L * h
        if i % freq == 0:
            flops += 2.0 * q * h * h * 2 + 2.0 * n * e * h * 2 + 4.0 * q * n_vis * h + 5.0 * q * n_vis + 8.0 * q * h
        flops += 4.0 * L * h * i_sz + 10.0 * L * i_sz + 8.0 * L * h
    nbytes = sum(a.nbytes for a in w.values()) + kwargs["query_embeds"].nbytes + kwargs["image_embeds"].nbytes
    nbytes += 2 * L * h * kwargs["query_embeds"].itemsize
    return {"flops": flops, "bytes": float(nbytes)}


def _strategy():
    from hypothesis import strategies as st

    @st.composite
    def cases(draw):
        heads = draw(st.integers(1, 3))
        h = heads * draw(st.integers(2, 4))
        layers = draw(st.integers(1, 3))
        freq = draw(st.integers(1, 3))
        t = draw(st.sampled_from([0, 0, 1, 3]))
        n = draw(st.integers(1, 7))
        masked = draw(st.integers(0, n - 1))
        kind = draw(st.sampled_from(KINDS))
        dtype = draw(st.sampled_from([np.float32, np.float64]))
        q, i_sz, e = draw(st.integers(1, 5)), draw(st.integers(1, 9)), draw(st.integers(1, 6))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        return _make(q, h, heads, i_sz, e, n, layers, freq, t, kind, masked, rng, dtype)

    return cases()


register(
    Technique(
        id="connectors.qformer",
        reference=qformer,
        make_case=_case,
        paper=(
            "J. Li, D. Li, S. Savarese, S. Hoi, BLIP-2: Bootstrapping Language-Image Pre-training with Frozen Image "
            "Encoders and Large Language Models, ICML 2023 (arXiv:2301.12597)"
        ),
        test_sizes=("tiny", "small", "text_itg", "text_itc"),
        bench_sizes=("bench_small", "bench_blip2"),
        compare="tolerance",
        strategy=_strategy,
        cost=_cost,
        chapter="book/03-connectors.md",
        exercise="exercises/04-qformer-cross-attention",
        model_level=True,
        extra={"variants": tour_variants({"qformer16": "16 queries, 2 layers (trained, base frozen)",
                                          "qformer32": "32 queries, 2 layers (trained, base frozen)"})},
        notes=(
            "HF Blip2QFormerModel eval forward from its state dict; unbatched; stage-1 masks itm/itc/itg for "
            "query+text; all-False image_mask rejected (HF would average every image token)"
        ),
    )
)
