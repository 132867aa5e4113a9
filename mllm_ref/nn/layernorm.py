"""LayerNorm: layer normalisation over the feature axis.

Paper: Jimmy Lei Ba, Jamie Ryan Kiros and Geoffrey E. Hinton, "Layer Normalization", arXiv:1607.06450, 2016.
Used by ViT-style vision encoders (the tiny VLM's encoder too).

Equations, over the last axis of length d::

    mu      = (1/d) * sum_i x_i
    var     = (1/d) * sum_i (x_i - mu)^2          (biased variance, as in the paper and PyTorch)
    y_i     = (x_i - mu) / sqrt(var + eps) * weight_i + bias_i

The variance is computed in two passes (first the mean, then the mean of the centred squares) rather than as
``mean(x^2) - mu^2``: the one-pass form cancels catastrophically when ``|mu|`` is large compared with the spread
and can even go negative, which would make the square root NaN.

Shape legend:
    x: ``[..., d]``, weight: ``[d]``, bias: ``[d]``; returns ``[..., d]`` in ``x``'s dtype.

Deviations from the paper: none (the paper's gain and bias are ``weight`` and ``bias``).
"""

from __future__ import annotations

import numpy as np

from mllm_ref import _checks
from mllm_ref.oracle.registry import Technique, register

__all__ = ["layernorm"]


def _validate(x, weight, bias, eps):
    """Shared entry checks (also used by the fast paths)."""
    x = _checks.float_array(x, "x", min_ndim=1)
    weight = _checks.float_array(weight, "weight", ndim=1)
    bias = _checks.float_array(bias, "bias", ndim=1)
    _checks.same_dtype("x", x, "weight", weight)
    _checks.same_dtype("x", x, "bias", bias)
    _checks.dim("weight", weight, 0, x.shape[-1], "the last axis of x")
    _checks.dim("bias", bias, 0, x.shape[-1], "the last axis of x")
    eps = _checks.real(eps, "eps", low=0.0, low_open=True)
    with np.errstate(over="ignore", under="ignore"):
        eps_x = x.dtype.type(eps)  # the value the computation adds, in x's dtype
    if not 0 < eps_x < np.inf:  # 1e-300 rounds to 0 in float32: an all-zero row would give 0/0 = NaN
        raise ValueError(f"eps must stay positive and finite in x's dtype {x.dtype}, got {eps} (rounds to {eps_x})")
    return x, weight, bias, eps


def layernorm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """Normalise each vector of ``x[..., d]`` to zero mean and unit variance, then scale and shift.

    Args:
        x: float array ``[..., d]``, finite.
        weight, bias: ``[d]``, same dtype as ``x``.
        eps: > 0, added to the variance.

    Returns:
        ``[..., d]`` in ``x``'s dtype.
    """
    x, weight, bias, eps = _validate(x, weight, bias, eps)
    mean = np.mean(x, axis=-1, keepdims=True)
    centred = x - mean  # pass two works on the centred values: no cancellation
    var = np.mean(centred * centred, axis=-1, keepdims=True)
    inv_std = 1 / np.sqrt(var + x.dtype.type(eps))
    return centred * inv_std * weight + bias


# --------------------------------------------------------------------------------------------------------------
# Registration.

_SHAPES = {
    "one": (1,),
    "odd": (3, 7),
    "prime": (2, 5, 31),
    "bench_vit": (4 * 576, 1024),  # 4 images of 576 patches at a ViT-L width
    "bench_tokens": (576 + 64, 4096),
}


def _case(size: str, rng: np.random.Generator) -> dict:
    shape = _SHAPES[size]
    x = (rng.standard_normal(shape) * 2.0).astype(np.float32)
    if size == "prime":
        x += np.float32(100.0)  # a large common offset: the two-pass variance must not cancel
    weight = (1.0 + 0.1 * rng.standard_normal(shape[-1])).astype(np.float32)
    bias = (0.1 * rng.standard_normal(shape[-1])).astype(np.float32)
    return {"x": x, "weight": weight, "bias": bias, "eps": 1e-5}


def _cost(kwargs: dict) -> dict:
    x = kwargs["x"]
    # mean, subtract, square, sum, multiply by inv_std and weight, add bias: about 7 flops per element.
    return {"flops": 7.0 * x.size, "bytes": 2.0 * x.nbytes + kwargs["weight"].nbytes + kwargs["bias"].nbytes}


def _strategy():
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp

    @st.composite
    def cases(draw):
        shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=17))
        dtype = draw(st.sampled_from([np.float32, np.float64]))
        x = draw(hnp.arrays(dtype, shape, elements=st.floats(-100, 100, width=32)))
        weight = draw(hnp.arrays(dtype, shape[-1:], elements=st.floats(-4, 4, width=32)))
        bias = draw(hnp.arrays(dtype, shape[-1:], elements=st.floats(-4, 4, width=32)))
        eps = draw(st.sampled_from([1e-6, 1e-5, 1e-2]))
        return {"x": x, "weight": weight, "bias": bias, "eps": eps}

    return cases()


register(
    Technique(
        id="nn.layernorm",
        reference=layernorm,
        make_case=_case,
        paper="Jimmy Lei Ba, Jamie Ryan Kiros, Geoffrey E. Hinton, Layer Normalization, arXiv:1607.06450, 2016",
        test_sizes=("one", "odd", "prime"),
        bench_sizes=("bench_vit", "bench_tokens"),
        compare="tolerance",
        strategy=_strategy,
        cost=_cost,
        chapter=None,
        notes="two-pass variance (mean, then centred squares)",
    )
)
