"""Memory footprint: weights plus the KV cache, the longest context that fits a budget, and parameter counts.

Technique ``system.memory``. Survey: "A survey on edge multimodal large models: Compression, inference
acceleration, and applications" (Zhejiang University; corresponding authors Y. Shu and J. Chen), Natl Sci Open
5(3), 20260016, 2026 (seed 001_ff7ff3c1b032d9c6.txt), section "Evaluation metrics and benchmarks / Overhead
metrics", Eq. (2), which cites [65][66] for the KV-cache term; the project's inventory, section 6.7 (cost
metrics), formula F3::

    M_total = M_params + sigma * L * H * d_h * S * B
    sigma   = 2 * b_kv                      (a key and a value per layer, head and cached token)
    S_max   = floor((M_budget - M_params) / (sigma * L * H * d_h * B))

Legend (all counts are integers >= 0 unless said otherwise):

- ``M_params`` = ``n_params * bytes_per_param``: bytes of the weights (``bytes_per_param`` real > 0: 2 for fp16,
  1 for int8, 0.5 for int4);
- ``L`` = ``layers`` (>= 1), ``H`` = ``kv_heads`` (>= 1; under grouped-query attention only the key/value heads are
  cached), ``d_h`` = ``head_dim`` (>= 1);
- ``S`` = ``seq_len``: cached tokens, visual and text (an int, or an int array: the result then has its shape);
- ``B`` = ``batch`` (>= 1) sequences of ``S`` tokens each;
- ``b_kv`` = ``kv_bytes_per_element`` (real > 0; 2 for fp16, 1 for an int8 KV cache, 0.5 for int4).

When the weights alone exceed the budget, :func:`max_context` raises ``ValueError`` naming ``memory_budget``
(returning 0 would claim the model fits with an empty cache, which it does not); a budget that holds the weights
but not one token gives 0. The floor is computed in exact rational arithmetic, so ``memory_footprint(S_max) <=
M_budget < memory_footprint(S_max + 1)`` holds to the byte.

:func:`param_count` counts the parameters of a :class:`~mllm_ref.system.specs.ModelSpec` from its shapes: patch
embedding, class tokens, position embedding, blocks (norms, attention, MLP, biases as the spec says), the connector
(MLP; the Qwen2-VL merger's LayerNorm; MobileVLM's LDP blocks), the decoder blocks, the input embedding, the final
norm and the LM head (once if tied). Activations, optimizer state and runtime buffers are not counted.

Deviations from the paper: Eq. (2) of the survey is an image missing from the seed's text (which also reuses L for
latency and loses the symbols M and d_h); the formula here is the standard form its words describe, a
reconstruction, with sigma written explicitly as 2 x bytes per element. The batch factor B and the inverse
S_max follow the same text. Parameter counts are not in the survey.
"""

from __future__ import annotations

import numbers
from fractions import Fraction

import numpy as np

from mllm_ref import _checks
from mllm_ref.oracle.registry import Technique, register
from mllm_ref.system.specs import ConnectorSpec, DecoderSpec, ModelSpec, VisionSpec

__all__ = [
    "kv_cache_bytes",
    "memory_footprint",
    "max_context",
    "param_count",
    "model_memory",
    "model_max_context",
]

_MAX_BYTES = 64.0  # bytes per parameter or element: anything above is a unit mistake (bits for bytes, say)


def _bytes_per(x, name: str) -> float:
    return _checks.real(x, name, low=0.0, low_open=True, high=_MAX_BYTES)


def _seq_len(seq_len):
    """An int ``seq_len`` as ``int``, an int array as a float64 array (so that products cannot overflow)."""
    if isinstance(seq_len, (np.ndarray, list, tuple)):
        return _checks.int_array(seq_len, "seq_len", low=0).astype(np.float64)
    return _checks.integer(seq_len, "seq_len", low=0)


def _kv_per_token(layers, kv_heads, head_dim, batch, kv_bytes_per_element) -> Fraction:
    """``sigma * L * H * d_h * B`` bytes per cached token (exact)."""
    layers = _checks.integer(layers, "layers", low=1)
    kv_heads = _checks.integer(kv_heads, "kv_heads", low=1)
    head_dim = _checks.integer(head_dim, "head_dim", low=1)
    batch = _checks.integer(batch, "batch", low=1)
    kvb = _bytes_per(kv_bytes_per_element, "kv_bytes_per_element")
    return 2 * Fraction(kvb) * layers * kv_heads * head_dim * batch


def kv_cache_bytes(layers, kv_heads, head_dim, seq_len, batch=1, kv_bytes_per_element=2.0):
    """Bytes of the KV cache: ``2 * b_kv * L * H * d_h * S * B``.

    Returns a float for an int ``seq_len``, a float64 array of its shape for an int array.
    """
    per_token = float(_kv_per_token(layers, kv_heads, head_dim, batch, kv_bytes_per_element))
    s = _seq_len(seq_len)
    return per_token * s if isinstance(s, np.ndarray) else float(per_token * s)


def memory_footprint(
    n_params, bytes_per_param, layers, kv_heads, head_dim, seq_len, batch=1, kv_bytes_per_element=2.0
):
    """Total bytes, weights plus the KV cache of ``seq_len`` tokens: ``M_params + sigma * L * H * d_h * S * B``.

    Args:
        n_params: int >= 0, parameters of the model (see :func:`param_count`).
        bytes_per_param: real in (0, 64], bytes per weight.
        layers, kv_heads, head_dim: ints >= 1, the decoder's layers, key/value heads and head size.
        seq_len: int >= 0, or an int array of cached-token counts.
        batch: int >= 1, sequences cached.
        kv_bytes_per_element: real in (0, 64], bytes per cached key or value element.

    Returns a float, or a float64 array of ``seq_len``'s shape.
    """
    n_params = _checks.integer(n_params, "n_params", low=0)
    weights = float(n_params * Fraction(_bytes_per(bytes_per_param, "bytes_per_param")))
    return weights + kv_cache_bytes(layers, kv_heads, head_dim, seq_len, batch, kv_bytes_per_element)


def max_context(
    memory_budget, n_params, bytes_per_param, layers, kv_heads, head_dim, batch=1, kv_bytes_per_element=2.0
) -> int:
    """The largest number of cached tokens ``S`` with ``memory_footprint(..., S, ...) <= memory_budget``.

    ``floor((M_budget - M_params) / (sigma * L * H * d_h * B))``, exactly. Arguments as :func:`memory_footprint`,
    with ``memory_budget`` a real >= 0 in bytes. Raises ``ValueError`` naming ``memory_budget`` when the weights
    alone do not fit.
    """
    budget = _checks.real(memory_budget, "memory_budget", low=0.0)
    budget = Fraction(memory_budget) if isinstance(memory_budget, numbers.Integral) else Fraction(budget)
    n_params = _checks.integer(n_params, "n_params", low=0)
    weights = n_params * Fraction(_bytes_per(bytes_per_param, "bytes_per_param"))
    per_token = _kv_per_token(layers, kv_heads, head_dim, batch, kv_bytes_per_element)
    if weights > budget:
        raise ValueError(
            f"memory_budget ({float(budget):.6g} bytes) is smaller than the weights alone ({float(weights):.6g} "
            "bytes): no context fits"
        )
    return int((budget - weights) // per_token)


# --------------------------------------------------------------------------------------------------- parameter counts
def _make_divisible(v: float, divisor: int = 8) -> int:
    """torchvision's channel rounding (used for the squeeze width of MobileVLM's LDP squeeze-excitation)."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new < 0.9 * v:
        new += divisor
    return new


def _vision_params(v: VisionSpec) -> int:
    block = (
        2 * 2 * v.dim  # two LayerNorms
        + 4 * (v.dim * v.dim + v.dim)  # Q, K, V, O with biases
        + ((3 * v.dim * v.mlp_dim + 2 * v.mlp_dim) if v.gated_mlp else (2 * v.dim * v.mlp_dim + v.mlp_dim))
        + v.dim  # the MLP's output bias
    )
    patch = v.patch_in * v.dim + (v.dim if v.patch_bias else 0)
    pos = v.n_tokens * v.dim if v.learned_pos_embed else 0
    return v.layers * block + patch + v.cls_tokens * v.dim + pos + v.extra_norms * 2 * v.dim


def _mlp_params(dims: tuple[int, ...]) -> int:
    return sum(a * b + b for a, b in zip(dims[:-1], dims[1:]))


def _ldp_block_params(c: int) -> int:
    """One MobileNetV3 inverted-residual block of the LDP at width ``c`` without expansion: depthwise 3x3 (no bias)
    + LayerNorm, squeeze-excitation ``c -> s -> c`` with biases, pointwise 1x1 (no bias) + LayerNorm."""
    s = _make_divisible(c // 4)
    return 9 * c + 2 * c + (c * s + s + s * c + c) + c * c + 2 * c


def _connector_params(spec: ModelSpec) -> int:
    c = spec.connector
    params = _mlp_params(c.mlp_dims)
    if c.kind == "merger":
        params += 2 * spec.vision.dim  # LayerNorm over the encoder width before merging
    elif c.kind == "ldp":
        params += 2 * _ldp_block_params(c.out_dim)
    return params


def _decoder_layer_params(d: DecoderSpec) -> int:
    q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
    attn = d.dim * q + 2 * d.dim * kv + q * d.dim + ((q + 2 * kv) if d.qkv_bias else 0)
    ffn = (3 if d.gated_ffn else 2) * d.dim * d.ffn_dim
    return attn + ffn + 2 * d.dim  # two RMSNorms


def _embedding_params(d: DecoderSpec) -> int:
    """Input embedding and LM head (one matrix when tied)."""
    return d.vocab * d.dim * (1 if d.tied_embeddings else 2)


def _spec(spec) -> ModelSpec:
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"spec must be a ModelSpec, got {type(spec).__name__}")
    return spec


def param_count(spec: ModelSpec) -> dict[str, int]:
    """Parameters of each part: ``{"vision", "connector", "decoder", "total"}``.

    ``decoder`` includes the input embedding, the final norm and the LM head (counted once when tied).
    """
    spec = _spec(spec)
    d = spec.decoder
    out = {
        "vision": _vision_params(spec.vision),
        "connector": _connector_params(spec),
        "decoder": d.layers * _decoder_layer_params(d) + _embedding_params(d) + d.dim,
    }
    out["total"] = sum(out.values())
    return out


def model_memory(spec: ModelSpec, seq_len, *, batch=1, bytes_per_param=2.0, kv_bytes_per_element=2.0):
    """:func:`memory_footprint` of a whole model (all its parameters) with its decoder's KV cache."""
    spec = _spec(spec)
    d = spec.decoder
    return memory_footprint(
        param_count(spec)["total"], bytes_per_param, d.layers, d.kv_heads, d.head_dim, seq_len, batch,
        kv_bytes_per_element,
    )  # fmt: skip


def model_max_context(spec: ModelSpec, memory_budget, *, batch=1, bytes_per_param=2.0, kv_bytes_per_element=2.0):
    """:func:`max_context` of a whole model (all its parameters) with its decoder's KV cache."""
    spec = _spec(spec)
    d = spec.decoder
    return max_context(
        memory_budget, param_count(spec)["total"], bytes_per_param, d.layers, d.kv_heads, d.head_dim, batch,
        kv_bytes_per_element,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------- registry
def _case(size: str, rng: np.random.Generator) -> dict:
    n = {"a": 9, "b": 33}[size]
    return {
        "n_params": int(rng.integers(10**6, 10**10)),
        "bytes_per_param": float(rng.choice([0.5, 1.0, 2.0])),
        "layers": int(rng.integers(1, 80)),
        "kv_heads": int(rng.choice([1, 2, 8, 32])),
        "head_dim": int(rng.choice([64, 128])),
        "seq_len": rng.integers(0, 32768, n),
        "batch": int(rng.integers(1, 8)),
        "kv_bytes_per_element": float(rng.choice([0.5, 1.0, 2.0])),
    }


register(
    Technique(
        id="system.memory",
        reference=memory_footprint,
        make_case=_case,
        paper="Edge multimodal large models survey, Natl Sci Open 2026 (seed 001_ff7ff3c1b032d9c6.txt), Overhead "
        "metrics, Eq. (2), refs [65][66]",
        test_sizes=("a", "b"),
        notes="Eq. (2) is an image missing from the seed: M = M_params + 2*b_kv*L*H*d_h*S*B is a reconstruction",
    )
)
