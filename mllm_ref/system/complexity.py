"""Complexity: FLOPs and bytes moved by each stage of a vision-language model, and the survey's Table 1.

Technique ``system.complexity``. Survey: Wang, Song, Ji, Cao et al., "From Models to Systems: A Comprehensive
Survey of Efficient Multimodal Learning" (reviewed on OpenReview, id yfTU8FTS2Z; seed 004_3a23ed614623bf8c.txt),
section 2 "Model": Table 1 (in 2.4 "Structural Decoding") and the in-text bounds of 2.1 and 2.3-2.5, which give
the time and space complexity of each interaction mechanism (formulas F11 and F12 of the project's inventory,
section 6.7 "cost metrics"). The survey states orders of growth; this module turns them into exact counts for a
concrete model (:class:`~mllm_ref.system.specs.ModelSpec`), stage by stage, so that a technique's saving (tokens
dropped at layer K, layers skipped, a smaller KV element) is a number.

Counting rules (a multiply-add is 2 FLOPs):

- linear layer, ``t`` rows, ``d_in -> d_out``: ``2 t d_in d_out``. A decoder layer's projections are Q
  (``dim -> H d_h``), K and V (``dim -> H_kv d_h`` each) and O (``H d_h -> dim``); the encoder's are four
  ``dim -> dim``;
- attention: ``QK^T`` and ``AV`` each ``2 H d_h P`` where ``P`` counts (query, key) pairs. Bidirectional (the
  encoder): ``P = t_q t_k``. Causal, with the ``t_q`` queries the last of ``t_k`` positions:
  ``P = t_q (t_k - t_q) + t_q (t_q + 1) / 2`` (a prefill ``t_q = t_k = t`` gives ``t (t + 1) / 2``; a decode step
  ``t_q = 1`` gives ``t_k``). Only the pairs a causal kernel computes are counted, not the masked half of the
  square (``causal=False`` in :func:`prefill_cost` counts the square, as many papers' FLOP formulas do);
- feed-forward: 2 matrices ``dim <-> d_ff`` (GELU MLP) or 3 (SwiGLU), ``2 t dim d_ff`` each;
- patch embedding: ``2 n_patches (T p^2 C) dim``; connector: its MLP, plus for MobileVLM's LDP the depthwise 3x3
  (``2 * 9 C`` per output position), squeeze-excitation (``4 C s`` per image) and pointwise (``2 C^2`` per
  position) convolutions;
- LM head ``2 dim V`` per position: the last prompt position in the prefill (``all_logits=True``: every
  position) and every decode step.

Not counted (lower order, ``O(t dim)`` or ``O(t_q t_k H)``): norms, softmax, scaling, masking, RoPE, activation
functions, residual adds, the embedding gather, pooling.

Bytes (``bytes_per_param`` per weight, default 2 = fp16; ``kv_bytes_per_element`` per cached key/value element;
``bytes_per_activation`` per activation element):

- ``bytes_weights``: every weight a stage uses is read once per stage (once per decode step), whatever the number
  of tokens or images (they are batched); the decoder stages read the layers they run, the final norm, the LM head
  (``V x dim``, the embedding matrix when tied) and the gathered embedding rows of their text tokens;
- ``bytes_activations``: each linear layer reads its input and writes its output; attention is a fused kernel
  (reads Q, K, V, writes the output, never stores the score matrix); element-wise operations are fused and free;
- ``bytes_kv_written``: a key and a value per layer run and token processed (``2 H_kv d_h`` elements);
- ``bytes_kv_read``: a decode step reads the cached keys and values of every layer it runs (the prefill reads the
  keys it has just computed, counted as activations).

Legend: ``t`` tokens, ``t_q``/``t_k`` queries/keys, ``dim`` width, ``H``/``H_kv`` query/key-value heads, ``d_h``
head size, ``d_ff`` FFN width, ``V`` vocabulary, ``T p^2 C`` patch inputs, ``C`` LDP width, ``s`` its squeeze width.

Table 1 (:func:`table1`), with N, M the token counts of two modalities (say vision and language), D the width, K
latent queries, E experts, r the token-retention ratio in (0, 1], r_rank a LoRA rank; each entry is the expression
inside the O(.) with constant 1::

    mechanism                    time                     space
    unified self-attention       (N+M)^2 D                (N+M)^2
    dense cross-attention        M N D                    M N
    latent query (Q-Former)      K (N+M) D                K (N+M)
    linear attention / SSM       (N+M) D^2                D^2
    token reduction (ToMe)       (rN+M) D + (rN+M)^2 D    (rN+M)^2
    sparse routing (MoE)         (N+M) D^2                E D^2
    modular adaptation (LoRA)    (N+M) D r_rank           D r_rank

:func:`intext_bounds` adds the survey's in-text statements (F12): window attention ``O(S w)``, ProbSparse
``O(S log S)``, SSM ``O(S)`` time and ``O(1)`` inference memory, dense Transformer ``O(S^2)``.

Deviations from the paper: Table 1's token-reduction row gives time ``O((rN + M) D)`` but space
``O((rN + M)^2)``; the time entry leaves out the quadratic attention term its own space entry implies, so
:func:`table1` reports both terms, ``(rN + M) D + (rN + M)^2 D`` (the first read as the per-token projection
cost). The survey's entries are orders of growth; the exact per-stage counts (what is and is not counted, above)
are this module's choice, not the survey's. The table is stated in the seed (not a reconstruction); the registered
reference :func:`layer_flops` is the per-layer count these functions are built from.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields

import numpy as np

from mllm_ref import _checks
from mllm_ref.oracle.registry import Technique, register
from mllm_ref.system.memory import (
    _connector_params,
    _decoder_layer_params,
    _make_divisible,
    _spec,
    _vision_params,
)
from mllm_ref.system.specs import DecoderSpec, ModelSpec

__all__ = [
    "Cost",
    "layer_flops",
    "encoder_cost",
    "connector_cost",
    "prefill_cost",
    "decode_step_cost",
    "decode_cost",
    "forward_cost",
    "table1",
    "intext_bounds",
    "TABLE1_MECHANISMS",
]


@dataclass(frozen=True)
class Cost:
    """FLOPs and bytes of one stage (all reals >= 0). ``bytes`` is the sum of the four byte counts.

    Costs add (``a + b``, ``sum(costs)``) and scale by a real >= 0 (``3 * cost``).
    """

    flops: float = 0.0
    bytes_weights: float = 0.0
    bytes_activations: float = 0.0
    bytes_kv_read: float = 0.0
    bytes_kv_written: float = 0.0

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, _checks.real(getattr(self, f.name), f"Cost.{f.name}", low=0.0))

    def __add__(self, other):
        if not isinstance(other, Cost):
            return NotImplemented
        return Cost(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(Cost)))

    def __radd__(self, other):
        if isinstance(other, numbers.Number) and not isinstance(other, bool) and other == 0:  # sum() starts at 0
            return self
        return NotImplemented

    def __mul__(self, k):
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, numbers.Real):
            return NotImplemented
        k = _checks.real(k, "k", low=0.0)
        return Cost(*(getattr(self, f.name) * k for f in fields(Cost)))

    __rmul__ = __mul__

    @property
    def bytes(self) -> float:
        return self.bytes_weights + self.bytes_activations + self.bytes_kv_read + self.bytes_kv_written

    @property
    def intensity(self) -> float:
        """FLOPs per byte moved (the roofline's operational intensity); ``inf`` when no byte moves."""
        return self.flops / self.bytes if self.bytes else float("inf")


# ------------------------------------------------------------------------------------------------ one layer's FLOPs
def _flag(x, name: str) -> bool:
    if not isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(x).__name__}")
    return bool(x)


def _counts(x, name: str) -> np.ndarray:
    """A non-negative integer count or int array, as float64 (products of counts cannot overflow)."""
    if isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_)):
        return np.float64(_checks.integer(x, name, low=0))
    return _checks.int_array(x, name, low=0).astype(np.float64)


def _pairs(nq, nk, causal: bool):
    """(query, key) pairs attention computes; causal: the ``nq`` queries are the last of ``nk`` positions."""
    return nq * (nk - nq) + nq * (nq + 1) / 2 if causal else nq * nk


def _parts(nq, nk, dim, heads, kv_heads, head_dim, ffn_dim, gated, causal) -> dict:
    """FLOPs of one attention + FFN block, unchecked (the shared core of every count)."""
    q, kv = heads * head_dim, kv_heads * head_dim
    out = {
        "projections": 2 * nq * (dim * q + 2 * dim * kv + q * dim),
        "attention": 2 * 2 * q * _pairs(nq, nk, causal),
        "ffn": (3 if gated else 2) * 2 * nq * dim * ffn_dim,
    }
    out["total"] = out["projections"] + out["attention"] + out["ffn"]
    return out


def _act_elements(nq, nk_act, dim, heads, kv_heads, head_dim, ffn_dim, gated):
    """Activation elements one block reads and writes: each linear reads its input and writes its output; the
    fused attention reads Q and the ``nk_act`` keys/values held as activations and writes its output."""
    q, kv = heads * head_dim, kv_heads * head_dim
    proj = nq * (dim + q) + 2 * nq * (dim + kv) + nq * (q + dim)
    attn = 2 * nq * q + 2 * nk_act * kv
    ffn = (3 if gated else 2) * nq * (dim + ffn_dim)
    return proj + attn + ffn


def layer_flops(
    n_queries, n_keys, dim, heads, kv_heads, head_dim, ffn_dim, gated_ffn=True, causal=True
) -> dict[str, np.ndarray]:
    """FLOPs of one transformer layer in which ``n_queries`` tokens attend ``n_keys`` keys.

    Covers a prefill (``n_queries == n_keys``), a decode step (``n_queries = 1``, ``n_keys`` = cached + 1), a chunk
    of a chunked prefill (``n_queries <= n_keys``) and a bidirectional encoder layer (``causal=False``). Counting
    rules in the module docstring.

    Args:
        n_queries: int >= 0, or an int array: tokens the layer processes (they get Q, K, V, O and the FFN).
        n_keys: int or int array broadcasting with ``n_queries``: keys each sequence holds, the new ones included;
            ``n_keys >= n_queries`` when ``causal``.
        dim: int >= 1, model width; heads, kv_heads: ints >= 1 with ``heads % kv_heads == 0``; head_dim: int >= 1;
        ffn_dim: int >= 1.
        gated_ffn: bool, three FFN matrices (SwiGLU) instead of two.
        causal: bool, the queries are the last ``n_queries`` of ``n_keys`` positions and see keys up to
            themselves; ``False``: every query sees every key.

    Returns:
        ``{"projections", "attention", "ffn", "total"}``: float64 arrays of the broadcast shape (0-d for scalar
        counts), exact integers up to 2^53.
    """
    nq = _counts(n_queries, "n_queries")
    nk = _counts(n_keys, "n_keys")
    try:
        np.broadcast_shapes(np.shape(nq), np.shape(nk))
    except ValueError:
        raise ValueError(
            f"n_queries (shape {np.shape(nq)}) and n_keys (shape {np.shape(nk)}) must broadcast together"
        ) from None
    sizes = (("dim", dim), ("heads", heads), ("kv_heads", kv_heads), ("head_dim", head_dim), ("ffn_dim", ffn_dim))
    dims = {n: _checks.integer(v, n, low=1) for n, v in sizes}
    if dims["heads"] % dims["kv_heads"]:
        raise ValueError(f"heads ({dims['heads']}) must be a multiple of kv_heads ({dims['kv_heads']})")
    gated_ffn = _flag(gated_ffn, "gated_ffn")
    causal = _flag(causal, "causal")
    if causal and np.any(nk < nq):
        raise ValueError("n_keys must be >= n_queries everywhere when causal (the queries are the last n_queries "
                         "of the n_keys positions)")  # fmt: skip
    out = _parts(nq, nk, dims["dim"], dims["heads"], dims["kv_heads"], dims["head_dim"], dims["ffn_dim"],
                 gated_ffn, causal)  # fmt: skip
    shape = np.broadcast_shapes(np.shape(nq), np.shape(nk))
    return {k: np.broadcast_to(np.asarray(v, dtype=np.float64), shape).copy() for k, v in out.items()}


# ------------------------------------------------------------------------------------------------------ the stages
def _bytes_per(x, name: str) -> float:
    return _checks.real(x, name, low=0.0, low_open=True, high=64.0)


def encoder_cost(
    spec: ModelSpec,
    n_images: int = 1,
    *,
    bytes_per_param: float = 2.0,
    bytes_per_activation: float = 2.0,
    layer_tokens=None,
    mlp_tokens=None,
) -> Cost:
    """The vision encoder (patch embedding and ``layers`` bidirectional blocks over ``n_tokens``) on ``n_images``
    images. Weights are read once for all the images; zero images cost nothing.

    ``layer_tokens``: ``layers`` ints, the tokens each block takes in (default: ``n_tokens`` everywhere), for
    token merging inside the encoder; ``mlp_tokens``: the tokens each block's MLP processes (default: the block's
    ``layer_tokens``; ToMe merges between a block's attention and its MLP).
    """
    spec = _spec(spec)
    n_images = _checks.integer(n_images, "n_images", low=0)
    bpp = _bytes_per(bytes_per_param, "bytes_per_param")
    ab = _bytes_per(bytes_per_activation, "bytes_per_activation")
    if n_images == 0:
        return Cost()
    v = spec.vision
    n = v.n_tokens
    if layer_tokens is None:
        tokens = np.full(v.layers, n, dtype=np.int64)
    else:
        tokens = _checks.int_array(layer_tokens, "layer_tokens", ndim=1, low=1, high=n)
        if tokens.size != v.layers:
            raise ValueError(f"layer_tokens must have one entry per encoder layer ({v.layers}), got {tokens.size}")
    if mlp_tokens is None:
        mlp = tokens
    else:
        mlp = _checks.int_array(mlp_tokens, "mlp_tokens", ndim=1, low=1, high=n)
        if mlp.shape != tokens.shape or np.any(mlp > tokens):
            raise ValueError("mlp_tokens must have one entry per encoder layer, each at most that layer's tokens")
    block = acts = 0
    for t, m in zip(tokens.tolist(), mlp.tolist()):
        parts = _parts(t, t, v.dim, v.heads, v.heads, v.head_dim, v.mlp_dim, v.gated_mlp, False)
        block += parts["projections"] + parts["attention"]
        block += _parts(m, m, v.dim, v.heads, v.heads, v.head_dim, v.mlp_dim, v.gated_mlp, False)["ffn"]
        acts += _act_elements(t, t, v.dim, v.heads, v.heads, v.head_dim, v.mlp_dim, v.gated_mlp)
    patch = 2 * v.n_patches * v.patch_in * v.dim
    acts += v.n_patches * (v.patch_in + v.dim)
    return Cost(
        flops=float(n_images * (block + patch)),
        bytes_weights=float(_vision_params(v) * bpp),
        bytes_activations=float(n_images * acts * ab),
    )


def _mlp(rows: int, dims: tuple[int, ...]) -> tuple[int, int]:
    """(FLOPs, activation elements) of an MLP with widths ``dims`` on ``rows`` rows."""
    flops = sum(2 * rows * a * b for a, b in zip(dims[:-1], dims[1:]))
    acts = sum(rows * (a + b) for a, b in zip(dims[:-1], dims[1:]))
    return flops, acts


def _ldp_blocks(tokens_in: int, c: int) -> tuple[int, int]:
    """(FLOPs, activation elements) of the LDP's two MobileNetV3 blocks at width ``c`` on a ``g x g`` grid: the
    first with stride 1, the second with stride 2 (to ``ceil(g/2)^2`` positions)."""
    g = math.isqrt(tokens_in)
    s = _make_divisible(c // 4)
    flops = acts = 0
    for n_in, n_out in ((g * g, g * g), (g * g, ((g + 1) // 2) ** 2)):
        flops += 2 * n_out * 9 * c + 2 * 2 * c * s + 2 * n_out * c * c  # depthwise, squeeze-excitation, pointwise
        acts += (n_in + n_out) * c + 2 * n_out * c
    return flops, acts


def connector_cost(
    spec: ModelSpec,
    n_images: int = 1,
    *,
    bytes_per_param: float = 2.0,
    bytes_per_activation: float = 2.0,
    tokens: int | None = None,
) -> Cost:
    """The connector on ``n_images`` images' encoder outputs (``tokens_in`` each; class tokens dropped).

    ``tokens``: for an MLP connector, the rows it runs on when a token policy merged tokens in the encoder
    (default: the spec's ``mlp_rows``).
    """
    spec = _spec(spec)
    n_images = _checks.integer(n_images, "n_images", low=0)
    bpp = _bytes_per(bytes_per_param, "bytes_per_param")
    ab = _bytes_per(bytes_per_activation, "bytes_per_activation")
    if n_images == 0:
        return Cost()
    c = spec.connector
    rows = c.mlp_rows
    if tokens is not None:
        if c.kind != "mlp":
            raise ValueError(f"tokens applies to an MLP connector only, this one is {c.kind!r}")
        rows = _checks.integer(tokens, "tokens", low=1, high=c.mlp_rows)
    flops, acts = _mlp(rows, c.mlp_dims)
    if c.kind == "ldp":
        f2, a2 = _ldp_blocks(c.tokens_in, c.out_dim)
        flops, acts = flops + f2, acts + a2
    return Cost(
        flops=float(n_images * flops),
        bytes_weights=float(_connector_params(spec) * bpp),
        bytes_activations=float(n_images * acts * ab),
    )


def _decoder_layer_parts(d: DecoderSpec, nq, nk, causal=True) -> dict:
    return _parts(nq, nk, d.dim, d.heads, d.kv_heads, d.head_dim, d.ffn_dim, d.gated_ffn, causal)


def _decoder_acts(d: DecoderSpec, nq, nk_act):
    return _act_elements(nq, nk_act, d.dim, d.heads, d.kv_heads, d.head_dim, d.ffn_dim, d.gated_ffn)


def prefill_cost(
    spec: ModelSpec,
    n_visual: int,
    n_text: int,
    layer_tokens=None,
    *,
    all_logits: bool = False,
    causal: bool = True,
    bytes_per_param: float = 2.0,
    kv_bytes_per_element: float = 2.0,
    bytes_per_activation: float = 2.0,
) -> Cost:
    """The decoder prefill over the prompt: ``n_visual`` visual tokens then ``n_text`` text tokens.

    Args:
        n_visual, n_text: ints >= 0 with ``n_visual + n_text >= 1``.
        layer_tokens: ``layers`` ints in ``[0, n_visual + n_text]``, the tokens each decoder layer processes (and
            caches); fewer after layer K when a method drops visual tokens there (FastV), 0 for a layer no token
            runs. Default: every layer processes all the tokens. A layer's processed tokens attend each other
            causally.
        all_logits: run the LM head on every prompt position (training, scoring) instead of the last one.
        causal: count only the causal (query, key) pairs; ``False`` counts the full square.
        bytes_per_param, kv_bytes_per_element, bytes_per_activation: reals in (0, 64].
    """
    spec = _spec(spec)
    d = spec.decoder
    n_visual = _checks.integer(n_visual, "n_visual", low=0)
    n_text = _checks.integer(n_text, "n_text", low=0)
    total = n_visual + n_text
    if total < 1:
        raise ValueError("n_visual + n_text must be >= 1 (a prompt of no token has no prefill)")
    if layer_tokens is None:
        tokens = np.full(d.layers, total, dtype=np.int64)
    else:
        tokens = _checks.int_array(layer_tokens, "layer_tokens", ndim=1, low=0, high=total)
        if tokens.size != d.layers:
            raise ValueError(f"layer_tokens must have one entry per decoder layer ({d.layers}), got {tokens.size}")
    all_logits = _flag(all_logits, "all_logits")
    causal = _flag(causal, "causal")
    bpp = _bytes_per(bytes_per_param, "bytes_per_param")
    kvb = _bytes_per(kv_bytes_per_element, "kv_bytes_per_element")
    ab = _bytes_per(bytes_per_activation, "bytes_per_activation")
    t = tokens.astype(np.float64)
    rows = total if all_logits else 1
    flops = _decoder_layer_parts(d, t, t, causal)["total"].sum() + 2 * rows * d.dim * d.vocab
    acts = _decoder_acts(d, t, t).sum() + rows * (d.dim + d.vocab)
    layers_run = int(np.count_nonzero(tokens))
    weights = layers_run * _decoder_layer_params(d) + d.dim + d.vocab * d.dim + n_text * d.dim
    return Cost(
        flops=float(flops),
        bytes_weights=float(weights * bpp),
        bytes_activations=float(acts * ab),
        bytes_kv_written=float(2 * d.kv_heads * d.head_dim * t.sum() * kvb),
    )


def _contexts(d: DecoderSpec, context_len) -> np.ndarray:
    """``context_len`` as one float64 entry per decoder layer."""
    if isinstance(context_len, (np.ndarray, list, tuple)):
        c = _checks.int_array(context_len, "context_len", ndim=1, low=0)
        if c.size != d.layers:
            raise ValueError(f"context_len must be an int or one entry per decoder layer ({d.layers}), "
                             f"got {c.size} entries")  # fmt: skip
        return c.astype(np.float64)
    return np.full(d.layers, float(_checks.integer(context_len, "context_len", low=0)))


def _decode_step(d: DecoderSpec, c: np.ndarray, layers_run: int, bpp: float, kvb: float, ab: float) -> Cost:
    c = c[:layers_run]
    flops = _decoder_layer_parts(d, 1.0, c + 1)["total"].sum() + 2 * d.dim * d.vocab
    acts = _decoder_acts(d, 1.0, 1.0) * layers_run + d.dim + d.vocab
    per_token = 2 * d.kv_heads * d.head_dim * kvb
    return Cost(
        flops=float(flops),
        bytes_weights=float((layers_run * _decoder_layer_params(d) + d.dim + d.vocab * d.dim + d.dim) * bpp),
        bytes_activations=float(acts * ab),
        bytes_kv_read=float(per_token * c.sum()),
        bytes_kv_written=float(per_token * layers_run),
    )


def _decode_args(spec, context_len, layers_run, kv_bytes_per_element, bytes_per_param, bytes_per_activation):
    spec = _spec(spec)
    d = spec.decoder
    c = _contexts(d, context_len)
    layers_run = d.layers if layers_run is None else _checks.integer(layers_run, "layers_run", low=1, high=d.layers)
    return (d, c, layers_run, _bytes_per(bytes_per_param, "bytes_per_param"),
            _bytes_per(kv_bytes_per_element, "kv_bytes_per_element"),
            _bytes_per(bytes_per_activation, "bytes_per_activation"))  # fmt: skip


def decode_step_cost(
    spec: ModelSpec,
    context_len,
    layers_run: int | None = None,
    kv_bytes_per_element: float = 2.0,
    *,
    bytes_per_param: float = 2.0,
    bytes_per_activation: float = 2.0,
) -> Cost:
    """One decode step: a new token attends its ``context_len`` cached tokens and itself, through the first
    ``layers_run`` layers, then the LM head.

    Args:
        context_len: int >= 0 cached tokens, or one int per decoder layer (caches that differ by layer, after token
            dropping or KV eviction).
        layers_run: int in ``[1, layers]``; default all. Fewer under early exit: the step reads and writes the KV
            cache of those layers only (a later catch-up of the skipped layers' KV is not counted).
        kv_bytes_per_element: real in (0, 64], bytes per cached key/value element.
    """
    args = _decode_args(spec, context_len, layers_run, kv_bytes_per_element, bytes_per_param, bytes_per_activation)
    return _decode_step(*args)


def decode_cost(
    spec: ModelSpec,
    context_len,
    n_steps: int,
    layers_run: int | None = None,
    kv_bytes_per_element: float = 2.0,
    *,
    bytes_per_param: float = 2.0,
    bytes_per_activation: float = 2.0,
) -> Cost:
    """``n_steps`` decode steps, the cache growing by one token a step: step ``j`` (from 0) is
    :func:`decode_step_cost` at ``context_len + j``. Exact closed form (the step cost is linear in the context)."""
    args = _decode_args(spec, context_len, layers_run, kv_bytes_per_element, bytes_per_param, bytes_per_activation)
    n_steps = _checks.integer(n_steps, "n_steps", low=0)
    if n_steps == 0:
        return Cost()
    d, c, rest = args[0], args[1], args[2:]
    first, second = _decode_step(d, c, *rest), _decode_step(d, c + 1, *rest)
    grow = n_steps * (n_steps - 1) / 2
    return Cost(*(n_steps * getattr(first, f.name) + grow * (getattr(second, f.name) - getattr(first, f.name))
                  for f in fields(Cost)))  # fmt: skip


def forward_cost(
    spec: ModelSpec,
    n_visual: int | None,
    n_text: int,
    n_generated: int,
    *,
    n_images: int = 1,
    layer_tokens=None,
    all_logits: bool = False,
    bytes_per_param: float = 2.0,
    kv_bytes_per_element: float = 2.0,
    bytes_per_activation: float = 2.0,
) -> dict[str, Cost]:
    """The cost of a whole request, by stage: ``{"encoder", "connector", "prefill", "decode"}``.

    The prefill yields the first of the ``n_generated`` tokens (>= 1); ``decode`` sums the ``n_generated - 1``
    steps after it, the first attending the prompt's cache (per layer: ``layer_tokens``, or all prompt tokens).
    ``n_visual`` defaults to the spec's tokens per image times ``n_images``; pass fewer when a method prunes tokens
    before the decoder. Other arguments as :func:`prefill_cost`.
    """
    spec = _spec(spec)
    n_images = _checks.integer(n_images, "n_images", low=0)
    n_visual = spec.n_visual * n_images if n_visual is None else n_visual
    n_generated = _checks.integer(n_generated, "n_generated", low=1)
    common = dict(bytes_per_param=bytes_per_param, bytes_per_activation=bytes_per_activation)
    prefill = prefill_cost(spec, n_visual, n_text, layer_tokens, all_logits=all_logits,
                           kv_bytes_per_element=kv_bytes_per_element, **common)  # fmt: skip
    cache = n_visual + n_text if layer_tokens is None else np.asarray(layer_tokens, dtype=np.int64)
    return {
        "encoder": encoder_cost(spec, n_images, **common),
        "connector": connector_cost(spec, n_images, **common),
        "prefill": prefill,
        "decode": decode_cost(spec, cache, n_generated - 1, None, kv_bytes_per_element, **common),
    }


# ----------------------------------------------------------------------------------------------- the survey's tables
TABLE1_MECHANISMS = (
    "unified_self_attention",
    "dense_cross_attention",
    "latent_query",
    "linear_attention_ssm",
    "token_reduction",
    "moe",
    "lora",
)


def table1(N, M, D, K, E, r, r_rank) -> dict[str, dict[str, float]]:
    """Table 1 of the survey as numbers: ``{mechanism: {"time": ..., "space": ...}}`` (see the module docstring).

    Args: N, M ints >= 0, token counts of the two modalities; D int >= 1, width; K int >= 1, latent queries;
    E int >= 1, experts; r real in (0, 1], token-retention ratio; r_rank int >= 1, LoRA rank. Each value is the
    expression inside the O(.) with constant 1; token reduction's time has both terms (deviation, see above).
    """
    N = _checks.integer(N, "N", low=0)
    M = _checks.integer(M, "M", low=0)
    D = _checks.integer(D, "D", low=1)
    K = _checks.integer(K, "K", low=1)
    E = _checks.integer(E, "E", low=1)
    r = _checks.real(r, "r", low=0.0, high=1.0, low_open=True)
    r_rank = _checks.integer(r_rank, "r_rank", low=1)
    s = float(N + M)
    kept = r * N + M
    return {
        "unified_self_attention": {"time": s * s * D, "space": s * s},
        "dense_cross_attention": {"time": float(M) * N * D, "space": float(M) * N},
        "latent_query": {"time": float(K) * s * D, "space": float(K) * s},
        "linear_attention_ssm": {"time": s * D * D, "space": float(D) * D},
        "token_reduction": {"time": kept * D + kept * kept * D, "space": kept * kept},
        "moe": {"time": s * D * D, "space": float(E) * D * D},
        "lora": {"time": s * D * r_rank, "space": float(D) * r_rank},
    }


def intext_bounds(S, D, window, r_rank, K) -> dict[str, float]:
    """The survey's in-text complexity statements (F12) for a sequence of ``S`` tokens of width ``D``.

    ``{"transformer": S^2, "window_attention": S * window, "probsparse": S log2 S, "ssm_time": S, "ssm_memory": 1,
    "moe_active": S D^2, "latent_query": K S D, "lora": S D r_rank}``, constants 1.
    """
    S = _checks.integer(S, "S", low=1)
    D = _checks.integer(D, "D", low=1)
    window = _checks.integer(window, "window", low=1)
    r_rank = _checks.integer(r_rank, "r_rank", low=1)
    K = _checks.integer(K, "K", low=1)
    s = float(S)
    return {
        "transformer": s * s,
        "window_attention": s * min(window, S),
        "probsparse": s * math.log2(s) if S > 1 else 1.0,
        "ssm_time": s,
        "ssm_memory": 1.0,
        "moe_active": s * D * D,
        "latent_query": float(K) * s * D,
        "lora": s * D * r_rank,
    }


# ----------------------------------------------------------------------------------------------------------- registry
def _case(size: str, rng: np.random.Generator) -> dict:
    n = {"prefill": 7, "decode": 9, "chunked": 5}[size]
    kv_heads = int(rng.choice([1, 2, 4]))
    heads = kv_heads * int(rng.choice([1, 2, 4]))
    if size == "prefill":
        nq = rng.integers(1, 2048, n)
        nk = nq.copy()
    elif size == "decode":
        nq = np.ones(n, dtype=np.int64)
        nk = rng.integers(1, 8192, n)
    else:
        nq = rng.integers(1, 512, n)
        nk = nq + rng.integers(0, 4096, n)
    return {
        "n_queries": nq,
        "n_keys": nk,
        "dim": int(rng.choice([64, 512, 2048])),
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": int(rng.choice([32, 64, 128])),
        "ffn_dim": int(rng.integers(64, 8192)),
        "gated_ffn": bool(rng.integers(0, 2)),
        "causal": size != "chunked" or bool(rng.integers(0, 2)),
    }


register(
    Technique(
        id="system.complexity",
        reference=layer_flops,
        make_case=_case,
        paper="Wang et al., From Models to Systems: A Comprehensive Survey of Efficient Multimodal Learning "
        "(seed 004_3a23ed614623bf8c.txt), Table 1 and sections 2.3-2.5",
        test_sizes=("prefill", "decode", "chunked"),
        compare="exact",
        notes="per-layer FLOP count behind the per-stage costs; table1() gives Table 1 with both token-reduction terms",
    )
)
