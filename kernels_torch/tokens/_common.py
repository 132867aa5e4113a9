"""Value checks shared by the torch fast paths of :mod:`mllm_ref.tokens` (private)."""

from __future__ import annotations

import math

import torch


def finite_and_min(x: torch.Tensor) -> tuple[bool, float]:
    """``(all finite, minimum)`` in one ``torch.aminmax`` pass: a NaN or an infinity makes the minimum or the
    maximum non-finite."""
    lo, hi = torch.aminmax(x if x.dtype != torch.float16 else x.float())
    lo, hi = float(lo), float(hi)
    return math.isfinite(lo) and math.isfinite(hi), lo
