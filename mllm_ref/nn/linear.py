"""Linear (fully connected) layer in PyTorch's weight layout.

Paper: the affine map of every neural network; the layout follows PyTorch ``torch.nn.Linear`` (A. Paszke et al.,
"PyTorch: An Imperative Style, High-Performance Deep Learning Library", NeurIPS 2019, arXiv:1912.01703), so a
torch ``state_dict`` maps onto these arguments one to one.

Equation::

    y[..., o] = sum_i x[..., i] * weight[o, i] + bias[o]        i.e.  y = x @ weight.T + bias

Shape legend:
    x: ``[..., d_in]`` (any number of leading axes), weight: ``[d_out, d_in]``, bias: ``[d_out]`` or None;
    returns ``[..., d_out]`` in ``x``'s dtype.

Deviations from the paper: none.
"""

from __future__ import annotations

import numpy as np

from mllm_ref import _checks

__all__ = ["linear"]


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """``x @ weight.T + bias``.

    Args:
        x: float ``[..., d_in]``, finite.
        weight: ``[d_out, d_in]`` (PyTorch layout), same dtype as ``x``.
        bias: ``[d_out]`` or None, same dtype.

    Returns:
        ``[..., d_out]`` in ``x``'s dtype.
    """
    x = _checks.float_array(x, "x", min_ndim=1)
    weight = _checks.float_array(weight, "weight", ndim=2)
    _checks.same_dtype("x", x, "weight", weight)
    _checks.dim("weight", weight, 1, x.shape[-1], "d_in, the last axis of x")
    y = x @ weight.T
    if bias is not None:
        bias = _checks.float_array(bias, "bias", ndim=1)
        _checks.same_dtype("x", x, "bias", bias)
        _checks.dim("bias", bias, 0, weight.shape[0], "d_out, the first axis of weight")
        y = y + bias
    return y
