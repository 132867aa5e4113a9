"""Shared building blocks: softmax, norms, RoPE, attention, linear layers, MLPs, patch embedding, the KV cache.

Every technique of the project uses these instead of re-writing them. Five of them are registered techniques with
Numba and torch fast paths (``nn.softmax``, ``nn.rmsnorm``, ``nn.layernorm``, ``nn.rope``, ``nn.attention``); the
others (linear, activations, MLPs, patch embedding, KV cache) are plain references, tested directly.
"""

from mllm_ref.nn.activations import erf, gelu, silu
from mllm_ref.nn.attention import allowed_mask, attention
from mllm_ref.nn.kvcache import KVCache, append, empty_cache
from mllm_ref.nn.layernorm import layernorm
from mllm_ref.nn.linear import linear
from mllm_ref.nn.mlp import mlp, swiglu
from mllm_ref.nn.patch_embed import patch_embed, patchify
from mllm_ref.nn.rmsnorm import rmsnorm
from mllm_ref.nn.rope import rope, rope_angles, rope_cos_sin
from mllm_ref.nn.softmax import log_softmax, softmax

__all__ = [
    "KVCache",
    "allowed_mask",
    "append",
    "attention",
    "empty_cache",
    "erf",
    "gelu",
    "layernorm",
    "linear",
    "log_softmax",
    "mlp",
    "patch_embed",
    "patchify",
    "rmsnorm",
    "rope",
    "rope_angles",
    "rope_cos_sin",
    "silu",
    "softmax",
    "swiglu",
]
