"""Complexity: FLOPs and bytes moved by each stage of a vision-language model's forward.

Survey: "From Models to Systems" (004_3a23ed614623bf8c.txt), Table 1 and sections 2.3-2.5, which state the time
and space complexity of each interaction mechanism; `system.complexity` in the project's inventory (F11, F12).

Counting rules (2 FLOPs per multiply-add):

- linear layer, ``t`` tokens, ``d_in -> d_out``:       ``2 t d_in d_out``
- attention, ``H`` query heads of size ``d_h``, query ``i`` attending ``k_i`` keys: ``QK^T`` and ``AV`` each
  ``2 H d_h sum_i k_i``. Encoders attend every key (``k_i = n``); causal decoders the keys up to themselves
  (``k_i = i + 1`` in the prefill, the whole cache plus the new token in a decode step). Counting only the pairs
  a causal kernel computes, not the full square, is a choice: Table 1's ``O((N+M)^2 D)`` is the same order.
- feed-forward: 2 matrices (GELU MLP) or 3 (SwiGLU), ``2 t d d_ff`` each;
- the LM head runs on the last prompt position in the prefill and on every decoded token.
Norms, softmax, RoPE and activations are lower-order (``O(t d)``) and are not counted.

Bytes: every weight of a stage is read once per stage (``bytes_per_param`` each), the decode step reads the whole
KV cache of the layers it runs and writes one new key and value per layer (``kv_bytes_per_element`` each).
Activations are not counted.

Table 1 (asymptotic), implemented by :func:`table1`, with N, M the token counts of two modalities, D the width, K
latent queries, E experts, r the token-retention ratio and r_rank a LoRA rank.

Deviations from the paper: the survey gives orders of growth; here they are exact counts for a concrete model.
Table 1's token-reduction row lists time ``O((rN + M) D)`` but space ``O((rN + M)^2)``: the time entry leaves out
the quadratic attention term its own space entry implies, so :func:`table1` reports both terms,
``(rN + M) D + (rN + M)^2 D``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from mllm_ref import _checks
from mllm_ref.oracle.registry import Technique, register
from mllm_ref.system.specs import ConnectorSpec, DecoderSpec, ModelSpec, VisionSpec

__all__ = [
    "Cost",
    "encoder_cost",
    "connector_cost",
    "prefill_cost",
    "decode_step_cost",
    "forward_cost",
    "param_count",
    "table1",
]


@dataclass(frozen=True)
class Cost:
    """FLOPs and bytes of one stage. ``bytes`` is their sum."""

    flops: float = 0.0
    weight_bytes: float = 0.0
    kv_read_bytes: float = 0.0
    kv_write_bytes: float = 0.0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(Cost)))

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.kv_read_bytes + self.kv_write_bytes

    @property
    def intensity(self) -> float:
        """FLOPs per byte moved (the roofline's operational intensity)."""
        return self.flops / self.bytes if self.bytes else float("inf")


def _spec(spec) -> ModelSpec:
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"spec must be a ModelSpec, got {type(spec).__name__}")
    return spec


def _bpp(bytes_per_param) -> float:
    return _checks.real(bytes_per_param, "bytes_per_param", low=0.0, low_open=True, high=64.0)


def _vision_params(v: VisionSpec) -> int:
    per_layer = 4 * (v.dim * v.dim + v.dim) + (3 if v.gated_mlp else 2) * v.dim * v.mlp_dim + v.mlp_dim + v.dim + 4 * v.dim
    patch = v.patch_size**2 * v.channels * v.dim + v.dim
    return v.layers * per_layer + patch + v.n_tokens * v.dim + int(v.class_token) * v.dim + 2 * v.dim


def _connector_params(c: ConnectorSpec) -> int:
    params = c.in_dim * c.hidden_dim + c.hidden_dim + c.hidden_dim * c.out_dim + c.out_dim
    if c.kind == "ldp":  # two depthwise 3x3 convolutions and pointwise layers of the downsampler, approximately
        params += 2 * (9 * c.out_dim + c.out_dim * c.out_dim)
    return params


def _decoder_layer_params(d: DecoderSpec) -> int:
    attn = d.dim * d.heads * d.head_dim + 2 * d.dim * d.kv_heads * d.head_dim + d.heads * d.head_dim * d.dim
    return attn + (3 if d.gated_ffn else 2) * d.dim * d.ffn_dim + 2 * d.dim


def param_count(spec: ModelSpec) -> dict[str, int]:
    """Parameters of each part: ``{"vision", "connector", "decoder", "total"}`` (decoder includes embeddings)."""
    spec = _spec(spec)
    d = spec.decoder
    dec = d.layers * _decoder_layer_params(d) + d.vocab * d.dim * (1 if d.tied_embeddings else 2) + d.dim
    out = {"vision": _vision_params(spec.vision), "connector": _connector_params(spec.connector), "decoder": dec}
    out["total"] = sum(out.values())
    return out


def encoder_cost(spec: ModelSpec, n_images: int = 1, bytes_per_param: float = 2.0) -> Cost:
    """The vision encoder on ``n_images`` images."""
    spec = _spec(spec)
    n_images = _checks.integer(n_images, "n_images", low=0)
    v = spec.vision
    n = v.n_tokens
    per_layer = 2 * n * 4 * v.dim * v.dim + 2 * 2 * n * n * v.dim + (3 if v.gated_mlp else 2) * 2 * n * v.dim * v.mlp_dim
    patch = 2 * v.n_patches * v.patch_size**2 * v.channels * v.dim
    flops = n_images * (v.layers * per_layer + patch)
    return Cost(flops=float(flops), weight_bytes=float(_vision_params(v) * _bpp(bytes_per_param)))


def connector_cost(spec: ModelSpec, n_images: int = 1, bytes_per_param: float = 2.0) -> Cost:
    """The connector on ``n_images`` images' encoder outputs."""
    spec = _spec(spec)
    n_images = _checks.integer(n_images, "n_images", low=0)
    c = spec.connector
    rows = c.tokens_out if c.kind == "merger" else c.tokens_in
    flops = 2 * rows * (c.in_dim * c.hidden_dim + c.hidden_dim * c.out_dim)
    if c.kind == "ldp":
        flops += 2 * c.tokens_out * (2 * 9 * c.out_dim + 2 * c.out_dim * c.out_dim)
    return Cost(flops=float(n_images * flops), weight_bytes=float(_connector_params(c) * _bpp(bytes_per_param)))


def _layer_flops(d: DecoderSpec, tokens: int, attended: float) -> float:
    proj = 2 * tokens * (d.dim * d.heads * d.head_dim + 2 * d.dim * d.kv_heads * d.head_dim + d.heads * d.head_dim * d.dim)
    attn = 2 * 2 * d.heads * d.head_dim * attended
    ffn = (3 if d.gated_ffn else 2) * 2 * tokens * d.dim * d.ffn_dim
    return float(proj + attn + ffn)


def prefill_cost(
    spec: ModelSpec,
    n_visual: int,
    n_text: int,
    layer_tokens=None,
    *,
    all_logits: bool = False,
    bytes_per_param: float = 2.0,
    kv_bytes_per_element: float = 2.0,
) -> Cost:
    """The decoder prefill over ``n_visual + n_text`` tokens.

    Args:
        layer_tokens: tokens each decoder layer processes (``layers`` integers), e.g. fewer after layer K when a
            method drops visual tokens there; default every layer sees all ``n_visual + n_text``.
        all_logits: count the LM head on every position (training) instead of the last one.
    """
    spec = _spec(spec)
    d = spec.decoder
    n_visual = _checks.integer(n_visual, "n_visual", low=0)
    n_text = _checks.integer(n_text, "n_text", low=0)
    total = n_visual + n_text
    if layer_tokens is None:
        layer_tokens = [total] * d.layers
    tokens = _checks.int_array(list(layer_tokens), "layer_tokens", ndim=1, low=0, high=total)
    if tokens.size != d.layers:
        raise ValueError(f"layer_tokens must have one entry per decoder layer ({d.layers}), got {tokens.size}")
    flops = sum(_layer_flops(d, int(t), t * (t + 1) / 2) for t in tokens)
    flops += 2 * d.dim * d.vocab * (total if all_logits else 1)
    kv_written = 2 * d.kv_heads * d.head_dim * float(tokens.sum()) * _checks.real(
        kv_bytes_per_element, "kv_bytes_per_element", low=0.0, low_open=True
    )
    weights = (d.layers * _decoder_layer_params(d) + d.vocab * d.dim) * _bpp(bytes_per_param)
    return Cost(flops=float(flops), weight_bytes=float(weights), kv_write_bytes=kv_written)


def decode_step_cost(
    spec: ModelSpec,
    context_len: int,
    layers_run: int | None = None,
    *,
    bytes_per_param: float = 2.0,
    kv_bytes_per_element: float = 2.0,
) -> Cost:
    """One decode step: one new token attending ``context_len`` cached tokens and itself, through ``layers_run``
    layers (default all; fewer under early exit), then the LM head."""
    spec = _spec(spec)
    d = spec.decoder
    context_len = _checks.integer(context_len, "context_len", low=0)
    layers_run = d.layers if layers_run is None else _checks.integer(layers_run, "layers_run", low=0, high=d.layers)
    kvb = _checks.real(kv_bytes_per_element, "kv_bytes_per_element", low=0.0, low_open=True, high=64.0)
    flops = layers_run * _layer_flops(d, 1, context_len + 1) + 2 * d.dim * d.vocab
    weights = (layers_run * _decoder_layer_params(d) + d.vocab * d.dim) * _bpp(bytes_per_param)
    per_token = 2 * d.kv_heads * d.head_dim * kvb
    return Cost(
        flops=float(flops),
        weight_bytes=float(weights),
        kv_read_bytes=float(layers_run * per_token * context_len),
        kv_write_bytes=float(layers_run * per_token),
    )


def forward_cost(
    spec: ModelSpec, n_visual: int | None, n_text: int, n_generated: int, *, bytes_per_param: float = 2.0
) -> dict[str, Cost]:
    """Cost of a whole request: ``{"encoder", "connector", "prefill", "decode"}``; ``decode`` sums the
    ``n_generated - 1`` decode steps after the token the prefill produced. ``n_visual`` defaults to the spec's."""
    spec = _spec(spec)
    n_visual = spec.n_visual if n_visual is None else n_visual
    n_generated = _checks.integer(n_generated, "n_generated", low=0)
    decode = Cost()
    for step in range(max(n_generated - 1, 0)):
        decode = decode + decode_step_cost(spec, n_visual + n_text + step, bytes_per_param=bytes_per_param)
    return {
        "encoder": encoder_cost(spec, bytes_per_param=bytes_per_param),
        "connector": connector_cost(spec, bytes_per_param=bytes_per_param),
        "prefill": prefill_cost(spec, n_visual, n_text, bytes_per_param=bytes_per_param),
        "decode": decode,
    }


TABLE1_MECHANISMS = (
    "unified_self_attention",
    "dense_cross_attention",
    "latent_query",
    "linear_attention_ssm",
    "token_reduction",
    "moe",
    "lora",
)


def table1(n, m, d, k, e, r, r_rank) -> dict[str, dict[str, float]]:
    """Table 1 of the survey as numbers: ``{mechanism: {"time": ..., "space": ...}}``.

    Args: n, m token counts of the two modalities; d width; k latent queries; e experts; r retention ratio in
    (0, 1]; r_rank LoRA rank. Each value is the expression inside the O(.) with constants 1.
    """
    n = _checks.integer(n, "n", low=0)
    m = _checks.integer(m, "m", low=0)
    d = _checks.integer(d, "d", low=1)
    k = _checks.integer(k, "k", low=1)
    e = _checks.integer(e, "e", low=1)
    r = _checks.real(r, "r", low=0.0, high=1.0, low_open=True)
    r_rank = _checks.integer(r_rank, "r_rank", low=1)
    s = n + m
    kept = r * n + m
    return {
        "unified_self_attention": {"time": float(s * s * d), "space": float(s * s)},
        "dense_cross_attention": {"time": float(m * n * d), "space": float(m * n)},
        "latent_query": {"time": float(k * s * d), "space": float(k * s)},
        "linear_attention_ssm": {"time": float(s * d * d), "space": float(d * d)},
        "token_reduction": {"time": float(kept * d + kept * kept * d), "space": float(kept * kept)},
        "moe": {"time": float(s * d * d), "space": float(e * d * d)},
        "lora": {"time": float(s * d * r_rank), "space": float(d * r_rank)},
    }


def _case(size: str, rng: np.random.Generator) -> dict:
    n = int(rng.integers(16, 4096))
    return {
        "n": n,
        "m": int(rng.integers(1, 512)),
        "d": int(rng.choice([64, 1024, 4096])),
        "k": int(rng.choice([32, 64])),
        "e": int(rng.choice([8, 64])),
        "r": float(rng.choice([0.1, 0.25, 0.5, 1.0])),
        "r_rank": int(rng.choice([8, 16])),
    }


register(
    Technique(
        id="system.complexity",
        reference=table1,
        make_case=_case,
        paper="Survey 'From Models to Systems' (004_3a23ed614623bf8c.txt), Table 1; per-stage counts in "
        "mllm_ref.system.complexity",
        test_sizes=("a", "b", "c"),
        compare="exact",
        notes="Table 1 as numbers; per-stage FLOP/byte counts (encoder_cost, prefill_cost, ...) for any ModelSpec",
    )
)
