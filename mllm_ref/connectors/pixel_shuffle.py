"""The Idefics3 / SmolVLM connector: pixel shuffle (space-to-depth) by ``r``, then a linear projection without bias.

Papers: H. Laurencon, A. Marafioti, V. Sanh, L. Tronchon, "Building and better understanding vision-language
models: insights and future directions" (Idefics3), arXiv 2408.12637, 2024; A. Marafioti et al., "SmolVLM:
Redefining small and efficient multimodal models", arXiv 2504.05299, 2025. Survey section: cross-modal connectors,
projection with token reduction. The reference follows Hugging Face transformers (``models/idefics3/
modeling_idefics3.py``: ``Idefics3Connector.pixel_shuffle`` and ``Idefics3SimpleMLP``, which is one
``nn.Linear(D_vis * r^2, D_llm, bias=False)`` named ``modality_projection.proj``; SmolVLM's connector is the same
code). ``r`` is the config's ``scale_factor``: 2 by default and for Idefics3-8B (26 x 26 -> 13 x 13 tokens), 3 for
SmolVLM-2.2B (27 x 27 -> 9 x 9), 4 for SmolVLM-256M/500M (32 x 32 -> 8 x 8).

Equations, for tokens ``x[g * g, D_vis]`` read row-major as a grid ``X[g, g, D_vis]`` with ``r`` dividing ``g``::

    S[a, b, (dy r + dx) D_vis + c] = X[r a + dy, r b + dx, c]       a, b < g / r;  dy, dx < r
    y[a (g / r) + b] = S[a, b] W^T                                  W: [D_llm, r^2 D_vis], no bias

i.e. each r x r window, read row by row, is concatenated into one token of width ``r^2 D_vis`` and projected.
The rearrangement is :func:`mllm_ref.tokens.pixel_unshuffle.pixel_unshuffle` (whose channel order is Idefics3's:
the ``view``/``permute``/``reshape`` sequence of ``Idefics3Connector.pixel_shuffle`` gives exactly this index map,
``tests/test_connectors_pixel_shuffle.py`` checks it against a literal NumPy transcription).

Weights: a dict with the connector module's ``state_dict`` name, ``"modality_projection.proj.weight"``
``[D_llm, r^2 D_vis]`` (the checkpoint stores it under ``model.connector.``).

Shape legend:
    x: ``float[N, D_vis]``, ``N = g * g`` a square grid with ``r`` dividing ``g``.
    weights: ``{"modality_projection.proj.weight": float[D_llm, r * r * D_vis]}``, same dtype as ``x``.
    r: the scale factor, ``>= 1``.
    returns: ``float[N / r^2, D_llm]`` in ``x``'s dtype.

Deviations from the paper: none. Idefics3's code reads the side as ``int(sqrt(N))`` and would fail or misread a
non-square or indivisible grid inside ``view``; the reference rejects those with a ``ValueError``.
"""

from __future__ import annotations

import math

import numpy as np

from mllm_ref import _checks
from mllm_ref.nn.linear import linear
from mllm_ref.oracle.registry import Technique, register
from mllm_ref.tokens.pixel_unshuffle import pixel_unshuffle

__all__ = ["pixel_shuffle_connector", "WEIGHT_NAME"]

#: The projection's name in ``Idefics3Connector.state_dict()``.
WEIGHT_NAME = "modality_projection.proj.weight"


def _validate(x, weights, r):
    """Entry checks (shared with any fast path). Returns ``(x, W, r, g)``."""
    x = _checks.float_array(x, "x", ndim=2)
    if x.dtype == np.float16:
        raise TypeError("x must be float32 or float64, got float16")
    r = _checks.integer(r, "r", low=1)
    n, d_vis = x.shape
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"x must hold a square grid of tokens (N = g * g), got N = {n}")
    if g % r:
        raise ValueError(f"x's grid side g = {g} must be divisible by r = {r}")
    if not isinstance(weights, dict):
        raise TypeError(f"weights must be a dict of named arrays, got {type(weights).__name__}")
    if set(weights) != {WEIGHT_NAME}:
        got = sorted(map(str, weights))
        raise ValueError(f"weights must hold exactly {WEIGHT_NAME!r} (the projection has no bias), got {got}")
    name = f"weights[{WEIGHT_NAME!r}]"
    w = _checks.float_array(weights[WEIGHT_NAME], name, ndim=2)
    if w.dtype != x.dtype:
        raise TypeError(f"{name} must have the same dtype as x ({x.dtype}), got {w.dtype}")
    if w.shape[1] != r * r * d_vis:
        raise ValueError(
            f"{name} must have r*r*D_vis = {r * r * d_vis} columns (axis 1; D_vis is the last axis of x), "
            f"got shape {w.shape}"
        )
    return x, w, r, g


def pixel_shuffle_connector(x: np.ndarray, weights: dict, *, r: int = 2) -> np.ndarray:
    """Idefics3 / SmolVLM connector: concatenate each ``r x r`` window of the token grid, then project.

    Args:
        x: ``float[g * g, D_vis]`` visual tokens, row-major on their grid, ``r`` dividing ``g`` (float32/float64).
        weights: ``{"modality_projection.proj.weight": float[D_llm, r * r * D_vis]}``, same dtype as ``x``.
        r: the scale factor (Idefics3's ``scale_factor``).

    Returns:
        ``float[(g / r)^2, D_llm]`` in ``x``'s dtype, row-major on the ``g/r x g/r`` grid.
    """
    x, w, r, g = _validate(x, weights, r)
    s = pixel_unshuffle(x.reshape(g, g, -1), r)  # [g/r, g/r, r^2 D_vis], Idefics3's channel order
    return linear(s.reshape(-1, s.shape[-1]), w)


# --------------------------------------------------------------------------------------------------- registration
_SIZES = {  # g, D_vis, D_llm, r
    "r2": (6, 5, 7, 2),
    "r3": (9, 4, 6, 3),
    "r4": (8, 3, 10, 4),
    "r1": (3, 6, 4, 1),
    "whole": (2, 3, 5, 2),  # one output token
    "bench_idefics3": (26, 1152, 4096, 2),  # SigLIP so400m (364 px / 14) -> Llama 3.1 8B: 676 -> 169 tokens
    "bench_smolvlm": (32, 768, 576, 4),  # SmolVLM-256M: SigLIP base (512 px / 16) -> SmolLM2-135M: 1024 -> 64
}


def random_weights(d_vis: int, d_llm: int, r: int, rng: np.random.Generator, dtype=np.float32) -> dict:
    """``{WEIGHT_NAME: W}`` with ``W ~ N(0, 1) / sqrt(r^2 D_vis)``."""
    fan_in = r * r * d_vis
    return {WEIGHT_NAME: (rng.standard_normal((d_llm, fan_in)) / np.sqrt(fan_in)).astype(dtype)}


def _case(size: str, rng: np.random.Generator) -> dict:
    g, d_vis, d_llm, r = _SIZES[size]
    x = rng.standard_normal((g * g, d_vis)).astype(np.float32)
    return {"x": x, "weights": random_weights(d_vis, d_llm, r, rng), "r": r}


def _cost(kwargs: dict) -> dict:
    x, w = kwargs["x"], kwargs["weights"][WEIGHT_NAME]
    m = x.shape[0] // kwargs["r"] ** 2
    return {"flops": 2.0 * m * w.size, "bytes": float(2 * x.nbytes + w.nbytes + m * w.shape[0] * x.itemsize)}


def _strategy():
    from hypothesis import strategies as st

    @st.composite
    def cases(draw):
        r = draw(st.integers(1, 4))
        g = r * draw(st.integers(1, 4))
        d_vis = draw(st.integers(1, 8))
        d_llm = draw(st.integers(1, 12))
        dtype = draw(st.sampled_from([np.float32, np.float64]))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        x = rng.standard_normal((g * g, d_vis)).astype(dtype)
        return {"x": x, "weights": random_weights(d_vis, d_llm, r, rng, dtype), "r": r}

    return cases()


register(
    Technique(
        id="connectors.pixel_shuffle",
        reference=pixel_shuffle_connector,
        make_case=_case,
        paper=(
            "H. Laurencon, A. Marafioti, V. Sanh, L. Tronchon, Building and better understanding vision-language "
            "models: insights and future directions (Idefics3), 2024 (arXiv 2408.12637); A. Marafioti et al., "
            "SmolVLM: Redefining small and efficient multimodal models, 2025 (arXiv 2504.05299)"
        ),
        test_sizes=("r2", "r3", "r4", "r1", "whole"),
        bench_sizes=("bench_idefics3", "bench_smolvlm"),
        compare="tolerance",
        strategy=_strategy,
        cost=_cost,
        chapter="book/03-connectors.md",
        notes=(
            "reuses tokens.pixel_unshuffle (Idefics3's channel order); weight 'modality_projection.proj.weight', "
            "no bias"
        ),
    )
)
