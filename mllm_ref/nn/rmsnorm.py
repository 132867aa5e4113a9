"""RMSNorm: root-mean-square layer normalisation.

Paper: Biao Zhang and Rico Sennrich, "Root Mean Square Layer Normalization", NeurIPS 2019 (arXiv:1910.07467).
Used by LLaMA, Qwen and most decoder-only LLMs (the tiny VLM's decoder too).

Equation, over the last axis of length d::

    rms(x) = sqrt( (1/d) * sum_i x_i^2 + eps )
    y_i    = x_i / rms(x) * weight_i

Unlike LayerNorm there is no mean subtraction and no bias: only the scale of each vector is normalised.

Shape legend:
    x: ``[..., d]`` (any number of leading axes), weight: ``[d]``; returns ``[..., d]`` in ``x``'s dtype.

Deviations from the paper: ``eps`` sits inside the square root (as in LLaMA and PyTorch ``RMSNorm``); the paper
writes the plain RMS. The partial-RMS variant (pRMSNorm) is not implemented.
"""

from __future__ import annotations

import numpy as np

from mllm_ref import _checks
from mllm_ref.oracle.registry import Technique, register

__all__ = ["rmsnorm"]


def _validate(x, weight, eps):
    """Shared entry checks (also used by the fast paths)."""
    x = _checks.float_array(x, "x", min_ndim=1)
    weight = _checks.float_array(weight, "weight", ndim=1)
    _checks.same_dtype("x", x, "weight", weight)
    _checks.dim("weight", weight, 0, x.shape[-1], "the last axis of x")
    eps = _checks.real(eps, "eps", low=0.0, low_open=True)
    with np.errstate(over="ignore", under="ignore"):
        eps_x = x.dtype.type(eps)  # the value the computation adds, in x's dtype
    if not 0 < eps_x < np.inf:  # 1e-300 rounds to 0 in float32: an all-zero row would give 0/0 = NaN
        raise ValueError(f"eps must stay positive and finite in x's dtype {x.dtype}, got {eps} (rounds to {eps_x})")
    return x, weight, eps


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Normalise each vector of ``x[..., d]`` by its root mean square and scale by ``weight[d]``.

    Args:
        x: float array ``[..., d]``, finite.
        weight: ``[d]``, same dtype as ``x``.
        eps: > 0, added to the mean square (keeps an all-zero vector finite: its output is 0).

    Returns:
        ``[..., d]`` in ``x``'s dtype.
    """
    x, weight, eps = _validate(x, weight, eps)
    mean_square = np.mean(x * x, axis=-1, keepdims=True)
    inv_rms = 1 / np.sqrt(mean_square + x.dtype.type(eps))  # stays in x's dtype
    return x * inv_rms * weight


# --------------------------------------------------------------------------------------------------------------
# Registration.

_SHAPES = {
    "one": (1,),
    "odd": (3, 7),
    "prime": (2, 5, 31),
    "bench_tokens": (576 + 64, 4096),  # a prefill of 576 visual + 64 text tokens at a 7B model's width
    "bench_decode": (1, 4096),
}


def _case(size: str, rng: np.random.Generator) -> dict:
    shape = _SHAPES[size]
    x = (rng.standard_normal(shape) * 3.0 + 0.5).astype(np.float32)
    weight = (1.0 + 0.1 * rng.standard_normal(shape[-1])).astype(np.float32)
    eps = 1e-6 if size != "odd" else 1e-2
    return {"x": x, "weight": weight, "eps": eps}


def _cost(kwargs: dict) -> dict:
    x, w = kwargs["x"], kwargs["weight"]
    # square, sum, two multiplies per element (the per-row sqrt and divide are negligible).
    return {"flops": 4.0 * x.size, "bytes": 2.0 * x.nbytes + w.nbytes}


def _strategy():
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp

    @st.composite
    def cases(draw):
        shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=17))
        dtype = draw(st.sampled_from([np.float32, np.float64]))
        x = draw(hnp.arrays(dtype, shape, elements=st.floats(-100, 100, width=32)))
        weight = draw(hnp.arrays(dtype, shape[-1:], elements=st.floats(-4, 4, width=32)))
        eps = draw(st.sampled_from([1e-6, 1e-5, 1e-2]))
        return {"x": x, "weight": weight, "eps": eps}

    return cases()


register(
    Technique(
        id="nn.rmsnorm",
        reference=rmsnorm,
        make_case=_case,
        paper="Biao Zhang, Rico Sennrich, Root Mean Square Layer Normalization, NeurIPS 2019 (arXiv:1910.07467)",
        test_sizes=("one", "odd", "prime"),
        bench_sizes=("bench_tokens", "bench_decode"),
        compare="tolerance",
        strategy=_strategy,
        cost=_cost,
        chapter=None,
    )
)
