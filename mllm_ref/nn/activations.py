"""Activation functions: GELU (tanh approximation or exact, with an erf in NumPy) and SiLU.

Papers: Dan Hendrycks and Kevin Gimpel, "Gaussian Error Linear Units (GELUs)", arXiv:1606.08415, 2016 (GELU and
its tanh approximation); Stefan Elfwing, Eiji Uchibe and Kenji Doya, "Sigmoid-Weighted Linear Units for Neural
Network Function Approximation in Reinforcement Learning", Neural Networks 2018 (arXiv:1702.03118) (SiLU, also
called Swish by Ramachandran et al. 2017). The error function uses W. J. Cody, "Rational Chebyshev
Approximations for the Error Function", Mathematics of Computation 23 (107), 1969, pp. 631-638 (SPECFUN CALERF).

Equations::

    gelu(x)            = x * Phi(x) = 0.5 * x * (1 + erf(x / sqrt(2)))                   approximate="none"
    gelu_tanh(x)       = 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))         approximate="tanh"
    silu(x)            = x * sigmoid(x) = x / (1 + exp(-x))

``approximate="tanh"`` matches ``torch.nn.functional.gelu(x, approximate="tanh")`` (GPT-2, many ViTs);
``"none"`` matches ``torch.nn.functional.gelu(x)``.

erf. NumPy has no erf, so :func:`erf` evaluates Cody's rational approximations on three intervals of ``|x|``:
``erf(x) = x R1(x^2)`` for ``|x| <= 0.46875``; ``erfc(|x|) = exp(-x^2) R2(|x|)`` for ``0.46875 < |x| <= 4``;
``erfc(|x|) = exp(-x^2) / |x| * (1/sqrt(pi) + R3(1/x^2) / x^2)`` beyond, where R1, R2, R3 are ratios of
polynomials of degrees (4, 4), (8, 8) and (5, 5). Cody's coefficients are good to about 18 significant digits, so
in float64 the result is within a few units in the last place of the true erf (the tests compare with the
standard library's ``math.erf``); ``exp(-x^2)`` is split as ``exp(-r^2) exp(-(x-r)(x+r))`` with ``r`` = x rounded
down to a multiple of 1/16, which avoids the rounding error of squaring ``x``. In float32 the same formulas run in
float32.

Shape legend: every function is elementwise; the output has the input's shape and dtype.

Deviations from the papers: none.
"""

from __future__ import annotations

import numpy as np

from mllm_ref import _checks

__all__ = ["gelu", "silu", "erf"]

# Cody (1969) coefficients, as in SPECFUN CALERF.
_A = (3.16112374387056560e00, 1.13864154151050156e02, 3.77485237685302021e02, 3.20937758913846947e03,
      1.85777706184603153e-1)  # fmt: skip
_B = (2.36012909523441209e01, 2.44024637934444173e02, 1.28261652607737228e03, 2.84423683343917062e03)
_C = (5.64188496988670089e-1, 8.88314979438837594e00, 6.61191906371416295e01, 2.98635138197400131e02,
      8.81952221241769090e02, 1.71204761263407058e03, 2.05107837782607147e03, 1.23033935479799725e03,
      2.15311535474403846e-8)  # fmt: skip
_D = (1.57449261107098347e01, 1.17693950891312499e02, 5.37181101862009858e02, 1.62138957456669019e03,
      3.29079923573345963e03, 4.36261909014324716e03, 3.43936767414372164e03, 1.23033935480374942e03)  # fmt: skip
_P = (3.05326634961232344e-1, 3.60344899949804439e-1, 1.25781726111229246e-1, 1.60837851487422766e-2,
      6.58749161529837803e-4, 1.63153871373020978e-2)  # fmt: skip
_Q = (2.56852019228982242e00, 1.87295284992346047e00, 5.27905102951428412e-1, 6.05183413124413191e-2,
      2.33520497626869185e-3)  # fmt: skip
_ONE_OVER_SQRT_PI = 5.6418958354775628695e-1
_THRESH = 0.46875


def erf(x: np.ndarray) -> np.ndarray:
    """The error function, elementwise, in ``x``'s dtype (Cody's rational approximations; see the module docstring).

    Args:
        x: float array, finite.

    Returns:
        ``erf(x)``, same shape and dtype, in [-1, 1].
    """
    x = _checks.float_array(x, "x", allow_empty=True)
    t = x.dtype.type
    y = np.abs(x)
    out = np.empty_like(x)

    # |x| <= 0.46875: erf(x) = x * A(x^2) / B(x^2).
    small = y <= _THRESH
    z = y[small] * y[small]
    num = t(_A[4]) * z
    den = z.copy()
    for i in range(3):
        num = (num + t(_A[i])) * z
        den = (den + t(_B[i])) * z
    out[small] = x[small] * (num + t(_A[3])) / (den + t(_B[3]))

    # |x| > 0.46875: compute erfc(|x|) = exp(-x^2) * R(|x|), then erf = 1 - erfc with the sign of x.
    big = ~small
    # erfc(30) ~ 1e-393 underflows to 0 in every dtype: clamping there changes no result and keeps y^2 finite.
    yb = np.minimum(y[big], t(30))
    mid = yb <= 4.0
    r = np.empty_like(yb)
    ym = yb[mid]
    num = t(_C[8]) * ym
    den = ym.copy()
    for i in range(7):
        num = (num + t(_C[i])) * ym
        den = (den + t(_D[i])) * ym
    r[mid] = (num + t(_C[7])) / (den + t(_D[7]))
    yt = yb[~mid]
    inv_sq = 1 / (yt * yt)
    num = t(_P[5]) * inv_sq
    den = inv_sq.copy()
    for i in range(4):
        num = (num + t(_P[i])) * inv_sq
        den = (den + t(_Q[i])) * inv_sq
    tail = inv_sq * (num + t(_P[4])) / (den + t(_Q[4]))
    r[~mid] = (t(_ONE_OVER_SQRT_PI) - tail) / yt
    # exp(-y^2) = exp(-r^2) * exp(-(y - r)(y + r)) with r = floor(16 y) / 16: r^2 is exact, no cancellation.
    # Beyond |x| ~ 27 (float64) or ~ 10 (float32) erfc underflows to 0 and erf is exactly +-1.
    yr = np.floor(yb * t(16)) / t(16)
    with np.errstate(under="ignore", over="ignore"):
        erfc = np.exp(-yr * yr) * np.exp(-(yb - yr) * (yb + yr)) * r
    out[big] = np.copysign((t(0.5) - erfc) + t(0.5), x[big])
    return out


def gelu(x: np.ndarray, approximate: str = "tanh") -> np.ndarray:
    """Gaussian error linear unit, elementwise, in ``x``'s dtype.

    Args:
        x: float array, finite.
        approximate: ``"tanh"`` (default; ``F.gelu(x, approximate="tanh")``) or ``"none"`` (exact, via :func:`erf`).

    Returns:
        Same shape and dtype as ``x``.
    """
    x = _checks.float_array(x, "x", allow_empty=True)
    _checks.choice(approximate, "approximate", ("tanh", "none"))
    t = x.dtype.type
    if approximate == "none":
        return t(0.5) * x * (t(1) + erf(x * t(1 / np.sqrt(2.0))))
    # For |x| above ~1e13 (float32) x^3 overflows to +-inf; tanh(+-inf) = +-1 gives the right limit (x or 0).
    with np.errstate(over="ignore"):
        inner = t(np.sqrt(2.0 / np.pi)) * (x + t(0.044715) * x * x * x)
    return t(0.5) * x * (t(1) + np.tanh(inner))


def silu(x: np.ndarray) -> np.ndarray:
    """SiLU / Swish-1: ``x * sigmoid(x)``, elementwise, in ``x``'s dtype, without overflow for any finite x."""
    x = _checks.float_array(x, "x", allow_empty=True)
    t = x.dtype.type
    # sigmoid(x) from e = exp(-|x|) <= 1: 1/(1+e) for x >= 0 and e/(1+e) for x < 0. No exp can overflow.
    e = np.exp(-np.abs(x))
    sig = np.where(x >= 0, t(1) / (t(1) + e), e / (t(1) + e))
    return x * sig
