"""Latency: time to first token plus the decode steps, and a roofline estimate of each stage's time.

Survey: the edge-MLLM survey (001_ff7ff3c1b032d9c6.txt), Eq. (1), refs [62] (Pope et al., "Efficiently Scaling
Transformer Inference", MLSys 2023) and [63]; `system.latency` in the inventory (F1)::

    L = TTFT + (N - 1) * TPOT            (convention "n-1": the first token comes with the prefill)
    L = TTFT + N * TPOT                  (convention "n")
    tokens per second = 1 / TPOT

TTFT (time to first token) is dominated by the compute-bound prefill (encoder, connector, prompt); TPOT (time per
output token) by the memory-bound decode step. :func:`stage_time` estimates either from a
:class:`~mllm_ref.system.complexity.Cost` with the roofline model: a stage takes at least its FLOPs over the peak
FLOP rate and at least its bytes over the memory bandwidth.

Shapes: every function broadcasts NumPy arrays of equal shape (or scalars) element-wise.

Deviations from the paper: Eq. (1) is an image missing from the survey's text; this is the standard form its
words describe, with the N vs N - 1 convention made a parameter.
"""

from __future__ import annotations

import numpy as np

from mllm_ref import _checks
from mllm_ref.oracle.registry import Technique, register
from mllm_ref.system.complexity import Cost

__all__ = ["latency", "tokens_per_second", "prefill_share", "stage_time"]

CONVENTIONS = ("n-1", "n")


def _nonneg(x, name):
    arr = _checks.float_array(np.asarray(x, dtype=np.float64) if np.isscalar(x) else x, name, allow_empty=False)
    if np.any(arr < 0):
        raise ValueError(f"{name} must be >= 0, got a minimum of {arr.min()}")
    return arr


def latency(ttft, tpot, n_tokens, convention: str = "n-1"):
    """End-to-end latency of a request generating ``n_tokens`` tokens (seconds; arrays broadcast element-wise).

    Args:
        ttft: float array, time to first token, >= 0.
        tpot: float array of ttft's shape, time per output token, >= 0.
        n_tokens: int array of ttft's shape, tokens generated, >= 1.
        convention: ``"n-1"`` (the prefill yields the first token) or ``"n"``.
    """
    ttft = _nonneg(ttft, "ttft")
    tpot = _nonneg(tpot, "tpot")
    _checks.same_dtype("ttft", ttft, "tpot", tpot)
    if tpot.shape != ttft.shape:
        raise ValueError(f"tpot must have the shape of ttft {ttft.shape}, got {tpot.shape}")
    n = _checks.int_array(np.asarray(n_tokens) if np.isscalar(n_tokens) else n_tokens, "n_tokens", low=1)
    if n.shape != ttft.shape:
        raise ValueError(f"n_tokens must have the shape of ttft {ttft.shape}, got {n.shape}")
    _checks.choice(convention, "convention", CONVENTIONS)
    steps = n - 1 if convention == "n-1" else n
    return ttft + steps.astype(ttft.dtype) * tpot


def tokens_per_second(tpot):
    """Decode throughput, 1 / TPOT."""
    tpot = _nonneg(tpot, "tpot")
    if np.any(tpot == 0):
        raise ValueError("tpot must be > 0 to give a throughput")
    return 1.0 / tpot


def prefill_share(ttft, tpot, n_tokens, convention: str = "n-1"):
    """The share of the latency spent before the first token, TTFT / L."""
    total = latency(ttft, tpot, n_tokens, convention)
    return np.divide(_nonneg(ttft, "ttft"), total, out=np.ones_like(total), where=total > 0)


def stage_time(cost: Cost, peak_flops: float, bandwidth: float) -> float:
    """Roofline time of a stage: ``max(flops / peak_flops, bytes / bandwidth)`` seconds.

    Args:
        peak_flops: FLOP/s the machine reaches (> 0).
        bandwidth: bytes/s of memory bandwidth (> 0).
    """
    if not isinstance(cost, Cost):
        raise TypeError(f"cost must be a Cost, got {type(cost).__name__}")
    peak_flops = _checks.real(peak_flops, "peak_flops", low=0.0, low_open=True)
    bandwidth = _checks.real(bandwidth, "bandwidth", low=0.0, low_open=True)
    return max(cost.flops / peak_flops, cost.bytes / bandwidth)


def _case(size: str, rng: np.random.Generator) -> dict:
    n = {"small": 7, "large": 257}[size]
    return {
        "ttft": rng.uniform(0.01, 2.0, n),
        "tpot": rng.uniform(0.005, 0.2, n),
        "n_tokens": rng.integers(1, 512, n),
        "convention": "n-1",
    }


register(
    Technique(
        id="system.latency",
        reference=latency,
        make_case=_case,
        paper="Edge-MLLM survey (001_ff7ff3c1b032d9c6.txt) Eq. (1); Pope et al., Efficiently Scaling Transformer "
        "Inference, MLSys 2023 (arXiv:2211.05102)",
        test_sizes=("small", "large"),
    )
)
