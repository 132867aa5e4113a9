"""Softmax and log-softmax, numerically stable.

Paper: J. S. Bridle, "Probabilistic Interpretation of Feedforward Classification Network Outputs, with
Relationships to Statistical Pattern Recognition", Neurocomputing (NATO ASI Series F68), Springer 1990, which named
the "softmax". The streaming (online) form used by the fast attention kernels is from M. Milakov and
N. Gimelshein, "Online normalizer calculation for softmax", arXiv:1805.02867, 2018.

Equations, along one axis of length n::

    softmax(x)_i     = exp(x_i - m) / sum_j exp(x_j - m),      m = max_j x_j
    log_softmax(x)_i = (x_i - m) - log(sum_j exp(x_j - m))

Subtracting the maximum ``m`` changes nothing mathematically (it cancels between numerator and denominator), but
it makes every exponent <= 0, so ``exp`` never overflows and the largest term is exactly 1, so the denominator is
>= 1 and never underflows to zero. Logits of 1e4 (or 1e30) therefore give exact one-hot rows, not NaN.

Shape legend:
    x: ``[..., n, ...]`` any shape; ``axis`` picks the axis of length ``n`` that is normalised.
    returns: the same shape and dtype as ``x``.

Deviations from the paper: none.
"""

from __future__ import annotations

import numpy as np

from mllm_ref import _checks
from mllm_ref.oracle.registry import Technique, register

__all__ = ["softmax", "log_softmax"]


def _validate(x, axis):
    """Shared entry checks (also used by the fast paths): ``x`` finite float, ``axis`` in range."""
    x = _checks.float_array(x, "x", min_ndim=1)
    axis = _checks.integer(axis, "axis", low=-x.ndim, high=x.ndim - 1)
    return x, axis


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Stable softmax of ``x`` along ``axis``.

    Args:
        x: float array ``[..., n, ...]``, finite.
        axis: the axis to normalise (default the last).

    Returns:
        Array of ``x``'s shape and dtype; every slice along ``axis`` is >= 0 and sums to 1.
    """
    x, axis = _validate(x, axis)
    # Shift so the largest entry of each slice is 0: exp never overflows and the sum is >= 1. A gap wider than
    # the float range (e.g. 3e38 and -3e38) rounds to -inf, whose exp is 0: the right limit.
    with np.errstate(over="ignore"):
        shifted = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(shifted)
    return e / np.sum(e, axis=axis, keepdims=True)


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Stable log-softmax of ``x`` along ``axis`` (same shape and dtype as ``x``; every value <= 0)."""
    x, axis = _validate(x, axis)
    with np.errstate(over="ignore"):  # a gap wider than the float range gives -inf, its correctly rounded value
        shifted = x - np.max(x, axis=axis, keepdims=True)
    # The sum is >= 1 (it contains exp(0)), so its log is finite and >= 0.
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


# --------------------------------------------------------------------------------------------------------------
# Registration: cases, cost and Hypothesis strategy.

_SHAPES = {
    "one": ((1,), -1),  # a single element: the output is exactly 1
    "odd": ((3, 7), -1),
    "prime": ((5, 13, 31), 1),  # normalise a middle axis
    "wide": ((2, 257), 0),  # a length-2 axis
    "bench_attn": ((8 * 576, 576), -1),  # attention-score rows of a 576-token prefill, 8 heads
    "bench_vocab": ((32, 32000), -1),  # next-token distributions over a LLaMA-sized vocabulary
}


def _case(size: str, rng: np.random.Generator) -> dict:
    shape, axis = _SHAPES[size]
    x = (rng.standard_normal(shape) * 4.0).astype(np.float32)
    if size == "odd":
        x[0, 0] = 1.0e4  # a huge logit: the stable form must still give a finite one-hot row
    return {"x": x, "axis": axis}


def _cost(kwargs: dict) -> dict:
    x = kwargs["x"]
    # max, subtract, exp, sum, divide: about 5 flops per element; read x once and write the output once.
    return {"flops": 5.0 * x.size, "bytes": 2.0 * x.nbytes}


def _strategy():
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp

    @st.composite
    def cases(draw):
        shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=17))
        dtype = draw(st.sampled_from([np.float32, np.float64]))
        x = draw(hnp.arrays(dtype, shape, elements=st.floats(-50, 50, width=32)))
        axis = draw(st.integers(-len(shape), len(shape) - 1))
        return {"x": x, "axis": axis}

    return cases()


register(
    Technique(
        id="nn.softmax",
        reference=softmax,
        make_case=_case,
        paper=(
            "J. S. Bridle, Probabilistic Interpretation of Feedforward Classification Network Outputs, "
            "Neurocomputing (NATO ASI Series F68) 1990"
        ),
        test_sizes=("one", "odd", "prime", "wide"),
        bench_sizes=("bench_attn", "bench_vocab"),
        compare="tolerance",
        strategy=_strategy,
        cost=_cost,
        chapter=None,
        exercise="exercises/01-softmax-attention",
        notes="stable (max-subtracted); log_softmax is provided alongside",
    )
)
