"""Latency: time to first token plus the decode steps, and a roofline estimate of each stage's time.

Technique ``system.latency``. Survey: "A survey on edge multimodal large models: Compression, inference
acceleration, and applications" (Zhejiang University; corresponding authors Y. Shu and J. Chen), Natl Sci Open
5(3), 20260016, 2026 (seed 001_ff7ff3c1b032d9c6.txt), section "Evaluation metrics and benchmarks / Overhead
metrics", Eq. (1), citing [62] (Pope et al., "Efficiently Scaling Transformer Inference", MLSys 2023,
arXiv:2211.05102) and [63] (NVIDIA NIM latency metrics); the project's inventory, section 6.7 (cost metrics),
formula F1::

    L = TTFT + (N - 1) * TPOT          convention "n-1" (default): the prefill yields the first token
    L = TTFT + N * TPOT                convention "n": TTFT ends before the first output token
    tokens per second = 1 / TPOT
    prefill share     = TTFT / L

TTFT (time to first token) is dominated by the compute-bound prefill (encoder, connector, prompt); TPOT (time per
output token) by the memory-bound decode step. :func:`estimate_stage_time` estimates a stage's time from its
:class:`~mllm_ref.system.complexity.Cost` with the roofline model,

    t = max(FLOPs / P_peak, bytes / BW),

and :func:`estimate_request` turns a model's per-stage costs into TTFT, TPOT and L for a machine.

Legend: ``ttft``, ``tpot`` float arrays (or scalars) of seconds >= 0, of one precision; ``n_tokens`` int (array)
>= 1 of generated tokens; arrays broadcast together (a clear error when they cannot), the result has the broadcast
shape and ``ttft``'s float dtype. ``peak_flops`` FLOP/s > 0, ``bandwidth`` bytes/s > 0.

Deviations from the paper: Eq. (1) is an image missing from the survey's text; the formula here is the standard
form its words describe, a reconstruction, with the N vs N - 1 convention made a parameter. The roofline time of a
stage (the maximum of compute and memory time, no overlap penalty, no launch overhead) is the usual first-order
model, not the survey's.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from mllm_ref import _checks
from mllm_ref.oracle.registry import Technique, register
from mllm_ref.system.complexity import Cost, decode_cost, forward_cost
from mllm_ref.system.memory import _spec

__all__ = [
    "CONVENTIONS",
    "latency",
    "tokens_per_second",
    "prefill_share",
    "estimate_stage_time",
    "RequestEstimate",
    "estimate_request",
]

CONVENTIONS = ("n-1", "n")


def _times(x, name: str, *, positive: bool = False) -> np.ndarray:
    """A float array (or a real scalar, as a 0-d float64 array) of finite times >= 0 (> 0 if ``positive``)."""
    if not isinstance(x, (np.ndarray, list, tuple)):
        x = np.float64(_checks.real(x, name))  # a real scalar (not a bool, a string or None)
    arr = _checks.float_array(x, name, allow_empty=True)
    if arr.size and (np.any(arr <= 0) if positive else np.any(arr < 0)):
        raise ValueError(f"{name} must be {'>' if positive else '>='} 0, got a minimum of {arr.min()}")
    return np.asarray(arr)


def _n_tokens(n_tokens) -> np.ndarray:
    if isinstance(n_tokens, numbers.Integral) and not isinstance(n_tokens, (bool, np.bool_)):
        return np.asarray(_checks.integer(n_tokens, "n_tokens", low=1))
    return _checks.int_array(n_tokens, "n_tokens", low=1)


def _broadcast(**arrays) -> tuple[int, ...]:
    try:
        return np.broadcast_shapes(*(a.shape for a in arrays.values()))
    except ValueError:
        shapes = ", ".join(f"{k} {a.shape}" for k, a in arrays.items())
        raise ValueError(f"{' and '.join(arrays)} must broadcast together, got shapes {shapes}") from None


def _out(x: np.ndarray):
    return x[()] if x.ndim == 0 else x


def latency(ttft, tpot, n_tokens, convention: str = "n-1"):
    """End-to-end latency of a request that generates ``n_tokens`` tokens: ``TTFT + (N - 1) TPOT`` (``"n-1"``) or
    ``TTFT + N TPOT`` (``"n"``).

    Args:
        ttft: float array or real >= 0, time to first token (seconds).
        tpot: float array or real >= 0, time per output token; same precision as ``ttft`` when both are arrays.
        n_tokens: int or int array >= 1, tokens generated.
        convention: ``"n-1"`` or ``"n"``.

    Returns:
        Seconds, of the broadcast shape and ``ttft``'s dtype (a NumPy scalar for scalar inputs).
    """
    ttft_in, tpot_in = ttft, tpot
    ttft = _times(ttft, "ttft")
    tpot = _times(tpot, "tpot")
    if isinstance(ttft_in, np.ndarray) and isinstance(tpot_in, np.ndarray):
        _checks.same_dtype("ttft", ttft, "tpot", tpot)
    n = _n_tokens(n_tokens)
    if not isinstance(convention, str):
        raise TypeError(f"convention must be a str, got {type(convention).__name__}")
    _checks.choice(convention, "convention", CONVENTIONS)
    _broadcast(ttft=ttft, tpot=tpot, n_tokens=n)
    dtype = ttft.dtype if isinstance(ttft_in, np.ndarray) or not isinstance(tpot_in, np.ndarray) else tpot.dtype
    with np.errstate(over="ignore", invalid="ignore"):
        steps = (n - 1 if convention == "n-1" else n).astype(dtype)
        total = ttft.astype(dtype, copy=False) + steps * tpot.astype(dtype, copy=False)
    if not _checks.all_finite(total):
        raise ValueError(f"the latency of n_tokens tokens overflows {np.dtype(dtype)}; pass ttft and tpot in float64")
    return _out(total)


def tokens_per_second(tpot):
    """Decode throughput ``1 / TPOT`` (``tpot`` a float array or real > 0, seconds)."""
    tpot = _times(tpot, "tpot", positive=True)
    return _out(1.0 / tpot)


def prefill_share(ttft, tpot, n_tokens, convention: str = "n-1"):
    """The share of the latency spent before the first token, ``TTFT / L`` in [0, 1] (0 where ``L = 0``).
    Arguments as :func:`latency`."""
    total = np.asarray(latency(ttft, tpot, n_tokens, convention))
    first = np.broadcast_to(_times(ttft, "ttft").astype(total.dtype), total.shape)
    share = np.divide(first, total, out=np.zeros_like(total), where=total > 0)
    return _out(share)


def estimate_stage_time(cost: Cost, peak_flops, bandwidth):
    """Roofline time of a stage: ``max(cost.flops / peak_flops, cost.bytes / bandwidth)`` seconds.

    Args:
        cost: a :class:`~mllm_ref.system.complexity.Cost`.
        peak_flops: FLOP/s the machine sustains (real or float array > 0).
        bandwidth: memory bandwidth in bytes/s (real or float array > 0), broadcasting with ``peak_flops``.
    """
    if not isinstance(cost, Cost):
        raise TypeError(f"cost must be a Cost, got {type(cost).__name__}")
    peak = _times(peak_flops, "peak_flops", positive=True)
    bw = _times(bandwidth, "bandwidth", positive=True)
    _broadcast(peak_flops=peak, bandwidth=bw)
    return _out(np.maximum(cost.flops / peak.astype(np.float64), cost.bytes / bw.astype(np.float64)))


@dataclass(frozen=True)
class RequestEstimate:
    """Roofline estimate of one request: ``ttft`` (encoder + connector + prefill), ``tpot`` (mean decode step),
    ``latency`` (``ttft + (n_generated - 1) * tpot``), ``tokens_per_second`` (``1 / tpot``, ``inf`` without a
    decode step), ``prefill_share`` (``ttft / latency``), and the stage ``times`` in seconds."""

    ttft: float
    tpot: float
    latency: float
    tokens_per_second: float
    prefill_share: float
    times: dict


def estimate_request(
    spec,
    n_visual: int | None,
    n_text: int,
    n_generated: int,
    *,
    peak_flops: float,
    bandwidth: float,
    n_images: int = 1,
    layer_tokens=None,
    bytes_per_param: float = 2.0,
    kv_bytes_per_element: float = 2.0,
    bytes_per_activation: float = 2.0,
) -> RequestEstimate:
    """TTFT, TPOT and latency of a request on a machine, from :func:`~mllm_ref.system.complexity.forward_cost`.

    Every stage and every decode step takes its roofline time (a step is memory- or compute-bound on its own, so
    steps are timed one by one, not as one summed cost). Convention ``"n-1"``: the prefill yields the first token.
    Arguments as :func:`~mllm_ref.system.complexity.forward_cost`, with ``peak_flops`` (FLOP/s) and ``bandwidth``
    (bytes/s) reals > 0.
    """
    spec = _spec(spec)
    peak = _checks.real(peak_flops, "peak_flops", low=0.0, low_open=True)
    bw = _checks.real(bandwidth, "bandwidth", low=0.0, low_open=True)
    costs = forward_cost(spec, n_visual, n_text, n_generated, n_images=n_images, layer_tokens=layer_tokens,
                         bytes_per_param=bytes_per_param, kv_bytes_per_element=kv_bytes_per_element,
                         bytes_per_activation=bytes_per_activation)  # fmt: skip
    times = {k: float(estimate_stage_time(c, peak, bw)) for k, c in costs.items() if k != "decode"}
    n_visual = spec.n_visual * n_images if n_visual is None else n_visual
    cache = n_visual + n_text if layer_tokens is None else np.asarray(layer_tokens, dtype=np.int64)
    common = dict(bytes_per_param=bytes_per_param, bytes_per_activation=bytes_per_activation)
    step_times = []
    # Each step's roofline time is the max of two functions linear in the step index, so the sum splits at the one
    # step where the bound changes: time the steps on each side of it as one summed cost.
    steps = n_generated - 1
    if steps > 0:
        def kind(j):  # True where step j is compute-bound
            c = decode_cost(spec, cache + j, 1, None, kv_bytes_per_element, **common)
            return c.flops / peak >= c.bytes / bw

        split = _first_change(kind, steps)
        for lo, hi in ((0, split), (split, steps)):
            if hi > lo:
                part = decode_cost(spec, cache + lo, hi - lo, None, kv_bytes_per_element, **common)
                step_times.append(part.flops / peak if kind(lo) else part.bytes / bw)
    times["decode"] = float(sum(step_times))
    ttft = times["encoder"] + times["connector"] + times["prefill"]
    tpot = times["decode"] / steps if steps > 0 else 0.0
    total = ttft + times["decode"]
    return RequestEstimate(
        ttft=ttft,
        tpot=tpot,
        latency=total,
        tokens_per_second=1.0 / tpot if tpot > 0 else float("inf"),
        prefill_share=ttft / total if total > 0 else 0.0,
        times=times,
    )


def _first_change(kind, n: int) -> int:
    """The first step index in ``[0, n]`` whose bound differs from step 0's (``n`` if none); ``kind`` changes at
    most once over the steps (a step's compute and memory times are both linear in its context length)."""
    first = kind(0)
    lo, hi = 0, n  # kind(lo) == first; the answer is in (lo, hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if kind(mid) == first:
            lo = mid
        else:
            hi = mid
    return hi


# ----------------------------------------------------------------------------------------------------------- registry
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
        paper="Edge multimodal large models survey, Natl Sci Open 2026 (seed 001_ff7ff3c1b032d9c6.txt), Overhead "
        "metrics, Eq. (1); Pope et al., Efficiently Scaling Transformer Inference, MLSys 2023 (arXiv:2211.05102)",
        test_sizes=("small", "large"),
        notes="Eq. (1) is an image missing from the seed: L = TTFT + (N-1)*TPOT is a reconstruction (or N*TPOT)",
    )
)
