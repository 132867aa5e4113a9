"""Torch fast path of :mod:`mllm_ref.connectors.llava_mini` (same function, same signature).

The reference's pipeline (:func:`mllm_ref.connectors.llava_mini.run`: the compressor's cross-attention, the
projector and the LLaMA pre-fusion layers over the image, the compressed tokens and the text) with the hot parts
swapped for the project's torch kernels of :mod:`kernels_torch.nn`: attention (causal, grouped-query), LayerNorm,
RMSNorm, RoPE. The matrix products stay NumPy's (BLAS). Entry checks are the reference's, so errors are
identical.
"""

from __future__ import annotations

import numpy as np

from kernels_torch.nn.attention import attention
from kernels_torch.nn.layernorm import layernorm
from kernels_torch.nn.rmsnorm import rmsnorm
from kernels_torch.nn.rope import rope
from mllm_ref.connectors.llava_mini import REFERENCE_OPS, _validate, run

__all__ = ["llava_mini"]

OPS = {"attention": attention, "layernorm": layernorm, "rmsnorm": rmsnorm, "rope": rope,
       "gelu": REFERENCE_OPS["gelu"]}  # fmt: skip


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
    """LLaVA-Mini's connector (see :func:`mllm_ref.connectors.llava_mini.llava_mini`)."""
    checked = _validate(image_features, text_embeds, weights, compressor_heads, heads, kv_heads, rms_eps, rope_theta)
    return run(checked, OPS)
