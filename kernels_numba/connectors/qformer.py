"""Numba fast path of :mod:`mllm_ref.connectors.qformer` (same function, same signature, NumPy in and out).

The reference's layer loop (:func:`mllm_ref.connectors.qformer.forward`) with the hot loops swapped for compiled
kernels: the fused online-softmax attention of :mod:`kernels_numba.nn.attention` (self-attention blocks of the
stage-1 mask and the cross-attention with the image key mask), the row-wise two-pass LayerNorm of
:mod:`kernels_numba.nn.layernorm`, and the elementwise exact GELU of :mod:`kernels_numba.nn.activations`
(``0.5 x (1 + erf(x / sqrt 2))`` with libm's ``erf`` in float64, rounded once to the input precision). The Linear
layers stay NumPy matmuls (BLAS): Numba has no BLAS ``np.dot`` here (SciPy is not installed), and a hand loop would be far
slower than OpenBLAS.
"""

from __future__ import annotations

from kernels_numba.nn.activations import gelu_exact
from kernels_numba.nn.attention import attention
from kernels_numba.nn.layernorm import layernorm
from mllm_ref.connectors.qformer import _validate, forward

__all__ = ["qformer"]


def qformer(
    query_embeds, image_embeds, weights, *, num_heads, cross_attention_frequency=2, eps=1e-12, image_mask=None,
    text_embeds=None, attention_kind="itm",
):  # fmt: skip
    """BLIP-2 Q-Former forward (see :func:`mllm_ref.connectors.qformer.qformer` for the contract)."""
    c = _validate(
        query_embeds, image_embeds, weights, num_heads, cross_attention_frequency, eps, image_mask, text_embeds,
        attention_kind,
    )  # fmt: skip
    return forward(c, layernorm=layernorm, attention=attention, gelu=gelu_exact)
