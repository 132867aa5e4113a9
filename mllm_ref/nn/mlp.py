"""Feed-forward blocks: the two-layer MLP of Transformers and the gated SwiGLU of LLaMA.

Papers: the position-wise feed-forward network of Ashish Vaswani et al., "Attention Is All You Need", NeurIPS 2017
(arXiv:1706.03762), with the GELU of ViT / GPT-2; the gated form from Noam Shazeer, "GLU Variants Improve
Transformer", arXiv:2002.05202, 2020 (SwiGLU, as used by LLaMA). The same two-layer MLP is the LLaVA connector
(Haotian Liu et al., "Improved Baselines with Visual Instruction Tuning", CVPR 2024, arXiv:2310.03744).

Equations (``linear`` in PyTorch layout, y = x W^T + b)::

    mlp(x)    = linear(act(linear(x, w1, b1)), w2, b2)
    swiglu(x) = linear( silu(linear(x, w_gate)) * linear(x, w_up), w_down )

Shape legend:
    x: ``[..., d]``; mlp: w1 ``[h, d]``, b1 ``[h]`` or None, w2 ``[d_out, h]``, b2 ``[d_out]`` or None;
    swiglu: w_gate ``[h, d]``, w_up ``[h, d]``, w_down ``[d_out, h]`` (no biases, as in LLaMA).
    returns ``[..., d_out]`` in ``x``'s dtype.

Deviations from the papers: none.
"""

from __future__ import annotations

import numpy as np

from mllm_ref import _checks
from mllm_ref.nn.activations import gelu, silu
from mllm_ref.nn.linear import linear

__all__ = ["mlp", "swiglu"]

#: Activations accepted by :func:`mlp`: "gelu" is the tanh approximation, "gelu_exact" the erf form.
ACTIVATIONS = ("gelu", "gelu_exact", "silu", "relu")


def _activate(h: np.ndarray, activation: str) -> np.ndarray:
    if activation == "gelu":
        return gelu(h, approximate="tanh")
    if activation == "gelu_exact":
        return gelu(h, approximate="none")
    if activation == "silu":
        return silu(h)
    return np.maximum(h, h.dtype.type(0))  # relu


def mlp(
    x: np.ndarray,
    w1: np.ndarray,
    b1: np.ndarray | None,
    w2: np.ndarray,
    b2: np.ndarray | None,
    activation: str = "gelu",
) -> np.ndarray:
    """Two-layer MLP ``linear(act(linear(x, w1, b1)), w2, b2)``.

    Args:
        x: ``[..., d]`` float.
        w1: ``[h, d]``; b1: ``[h]`` or None; w2: ``[d_out, h]``; b2: ``[d_out]`` or None; all in ``x``'s dtype.
        activation: one of ``"gelu"`` (tanh approximation), ``"gelu_exact"``, ``"silu"``, ``"relu"``.

    Returns:
        ``[..., d_out]`` in ``x``'s dtype.
    """
    _checks.choice(activation, "activation", ACTIVATIONS)
    w1 = _checks.float_array(w1, "w1", ndim=2)
    w2 = _checks.float_array(w2, "w2", ndim=2)
    _checks.dim("w2", w2, 1, w1.shape[0], "the hidden size, the first axis of w1")
    h = linear(x, w1, b1)
    return linear(_activate(h, activation), w2, b2)


def swiglu(x: np.ndarray, w_gate: np.ndarray, w_up: np.ndarray, w_down: np.ndarray) -> np.ndarray:
    """Gated feed-forward ``down(silu(gate x) * up x)`` (LLaMA's FFN).

    Args:
        x: ``[..., d]`` float.
        w_gate, w_up: ``[h, d]``; w_down: ``[d_out, h]``; all in ``x``'s dtype.

    Returns:
        ``[..., d_out]`` in ``x``'s dtype.
    """
    w_gate = _checks.float_array(w_gate, "w_gate", ndim=2)
    w_up = _checks.float_array(w_up, "w_up", ndim=2)
    w_down = _checks.float_array(w_down, "w_down", ndim=2)
    if w_up.shape != w_gate.shape:
        raise ValueError(f"w_up must have the shape of w_gate {w_gate.shape}, got {w_up.shape}")
    _checks.dim("w_down", w_down, 1, w_gate.shape[0], "the hidden size, the first axis of w_gate")
    return linear(silu(linear(x, w_gate)) * linear(x, w_up), w_down)
