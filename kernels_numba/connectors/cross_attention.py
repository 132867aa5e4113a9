"""Numba fast path of :mod:`mllm_ref.connectors.cross_attention` (same function, same signature).

The layer is matrix products (NumPy's BLAS), two LayerNorms and a masked cross-attention. This fast path runs the
reference's pipeline (:func:`mllm_ref.connectors.cross_attention.gated_layer`) with the project's compiled kernels:
the blocked online-softmax attention of :mod:`kernels_numba.nn.attention` (one call per distinct ``text_time``, with
the image's keys as its ``key_mask``) the LayerNorm of :mod:`kernels_numba.nn.layernorm` and the exact GELU of
:mod:`kernels_numba.nn.activations`. Entry checks are the reference's, so errors are identical.
"""

from __future__ import annotations

import numpy as np

from kernels_numba.nn.activations import gelu_exact
from kernels_numba.nn.attention import attention
from kernels_numba.nn.layernorm import layernorm
from mllm_ref.connectors.cross_attention import _validate, gated_layer

__all__ = ["gated_xattn_dense"]

OPS = {"attention": attention, "layernorm": layernorm, "gelu": gelu_exact}


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
    """Flamingo's GATED XATTN-DENSE layer (see :func:`mllm_ref.connectors.cross_attention.gated_xattn_dense`)."""
    x, media, w, loc, heads, immediate, eps = _validate(
        x, media, weights, media_locations, heads, only_attend_immediate_media, eps
    )
    return gated_layer(x, media, w, loc, heads, immediate, eps, OPS)
