"""Pixel unshuffle (space-to-depth): each r x r neighbourhood of visual tokens becomes one token of width r^2 C.

Papers: Z. Chen et al., "How Far Are We to GPT-4V? Closing the Gap to Commercial Multimodal Models with
Open-Source Suites" (InternVL 1.5, whose ``pixel_shuffle(scale_factor=0.5)`` Mini-InternVL keeps), Sci. China Inf.
Sci. 2024 (arXiv 2404.16821); A. Marafioti et al., "SmolVLM: Redefining small and efficient multimodal models",
arXiv 2504.05299, 2025, whose connector (Idefics3's) applies the same rearrangement with ``r = 4`` (SmolVLM) or
``r = 2`` (Idefics3 at scale 2) before a linear projection. Survey section: fewer visual tokens, space-to-depth.

Equation, for a grid ``x[h, w, C]`` with ``r`` dividing ``h`` and ``w`` (the channel order of InternVL's
``pixel_shuffle`` with ``ps_version="v2"`` and of Idefics3/SmolVLM's ``pixel_shuffle``, which agree)::

    y[a, b, (dy r + dx) C + c] = x[r a + dy, r b + dx, c],     a < h / r,  b < w / r,  dy, dx < r,  c < C

i.e. the r x r window is read row by row and its tokens are concatenated. ``torch.nn.functional.pixel_unshuffle``
(channels first) orders the same values as ``c r^2 + dy r + dx``: a fixed permutation of the channels
(``tests/test_tokens_pixel_unshuffle.py`` checks both). :func:`pixel_shuffle` is the exact inverse (depth-to-space).

Properties: the output holds exactly the input's values (a permutation: norms and sums preserved), there are
``h w / r^2`` tokens, and ``pixel_shuffle(pixel_unshuffle(x, r), r) == x`` bit for bit.

Shape legend:
    x: ``float[..., h, w, C]`` tokens on their grid (leading axes, e.g. images or frames, are batch axes).
    returns: ``float[..., h / r, w / r, r * r * C]`` in ``x``'s dtype.

Deviations from the paper: none in the rearrangement. It is not wired into the tiny VLM here: its connector was
trained on 64-wide encoder tokens, not on r^2 x 64, so the unshuffled tokens need a connector trained for them
(the pixel-shuffle connector of the connectors family). Grids not divisible by ``r`` are rejected, as the
reference code's ``view`` fails on them.
"""

from __future__ import annotations

import numpy as np

from mllm_ref import _checks
from mllm_ref.oracle.registry import Technique, register

__all__ = ["pixel_unshuffle", "pixel_shuffle", "unshuffle_source", "torch_channel_order"]


def _validate(x, r, name: str = "x"):
    """Entry checks shared by :func:`pixel_unshuffle` (and any fast path)."""
    x = _checks.float_array(x, name, min_ndim=3)
    r = _checks.integer(r, "r", low=1)
    h, w = x.shape[-3], x.shape[-2]
    if h % r or w % r:
        raise ValueError(f"{name} must have a grid divisible by r={r}, got a {h} x {w} grid (shape {x.shape})")
    return x, r


def pixel_unshuffle(x: np.ndarray, r: int = 2) -> np.ndarray:
    """Space-to-depth: concatenate each ``r x r`` window of tokens (InternVL / Idefics3 channel order).

    Args:
        x: ``float[..., h, w, C]`` with ``h`` and ``w`` divisible by ``r``.
        r: the window side (InternVL's ``scale_factor = 1 / r``; 2 for InternVL, 4 for SmolVLM).

    Returns:
        ``float[..., h / r, w / r, r * r * C]``, ``y[a, b, (dy r + dx) C + c] = x[r a + dy, r b + dx, c]``.
    """
    x, r = _validate(x, r)
    *lead, h, w, c = x.shape
    y = x.reshape(*lead, h // r, r, w // r, r, c)
    y = np.moveaxis(y, -4, -3)  # (..., h/r, w/r, dy, dx, C)
    return np.array(y, order="C", copy=True).reshape(*lead, h // r, w // r, r * r * c)  # never a view of x


def pixel_shuffle(y: np.ndarray, r: int = 2) -> np.ndarray:
    """Depth-to-space, the exact inverse of :func:`pixel_unshuffle`.

    Args:
        y: ``float[..., h', w', r * r * C]``.
        r: the window side.

    Returns:
        ``float[..., h' r, w' r, C]``.
    """
    y = _checks.float_array(y, "y", min_ndim=3)
    r = _checks.integer(r, "r", low=1)
    *lead, hh, ww, d = y.shape
    if d % (r * r):
        raise ValueError(f"y must have a last axis divisible by r*r={r * r}, got shape {y.shape}")
    c = d // (r * r)
    x = y.reshape(*lead, hh, ww, r, r, c)
    x = np.moveaxis(x, -3, -4)  # (..., h', dy, w', dx, C)
    return np.array(x, order="C", copy=True).reshape(*lead, hh * r, ww * r, c)  # never a view of y


def unshuffle_source(grid: tuple[int, int], r: int = 2) -> np.ndarray:
    """``int64[h * w]``: for each patch (row-major) the unshuffled token that carries it (for drawing)."""
    if not isinstance(grid, (tuple, list)) or len(grid) != 2:
        raise TypeError(f"grid must be a tuple (rows, cols), got {grid!r}")
    h = _checks.integer(grid[0], "grid[0]", low=1)
    w = _checks.integer(grid[1], "grid[1]", low=1)
    r = _checks.integer(r, "r", low=1)
    if h % r or w % r:
        raise ValueError(f"grid must be divisible by r={r}, got {h} x {w}")
    i, j = np.divmod(np.arange(h * w, dtype=np.int64), w)
    return (i // r) * (w // r) + j // r


def torch_channel_order(c: int, r: int) -> np.ndarray:
    """``int64[r * r * c]``: ``perm`` with ``ours[..., k] = torch_order[..., perm[k]]``, where ``torch_order`` is
    ``torch.nn.functional.pixel_unshuffle``'s channel order (``c r^2 + dy r + dx``) moved channels-last."""
    c = _checks.integer(c, "c", low=1)
    r = _checks.integer(r, "r", low=1)
    dy, dx, ch = np.meshgrid(np.arange(r), np.arange(r), np.arange(c), indexing="ij")
    return (ch * r * r + dy * r + dx).reshape(-1).astype(np.int64)


# --------------------------------------------------------------------------------------------------- registration
_SIZES = {
    # name: (shape, r)
    "one": ((2, 2, 3), 2),
    "internvl": ((12, 12, 16), 2),  # the tiny VLM's grid at InternVL's scale 0.5
    "smolvlm": ((8, 12, 5), 4),  # SmolVLM's r = 4, non-square
    "frames": ((3, 6, 4, 7), 2),  # a batch axis
    "r1": ((3, 5, 2), 1),  # r = 1 is the identity
    "bench-internvl": ((16, 32, 32, 1024), 2),  # InternVL: 1024 tokens per 448 px tile -> 256
    "bench-smolvlm": ((16, 32, 32, 768), 4),  # SmolVLM: 1024 -> 64
}


def _case(size: str, rng: np.random.Generator) -> dict:
    shape, r = _SIZES[size]
    return {"x": rng.standard_normal(shape).astype(np.float32), "r": r}


def _cost(kwargs: dict) -> dict:
    return {"flops": 0.0, "bytes": 2.0 * kwargs["x"].nbytes}


register(
    Technique(
        id="tokens.pixel_unshuffle",
        reference=pixel_unshuffle,
        make_case=_case,
        paper=(
            "Z. Chen et al., How Far Are We to GPT-4V? Closing the Gap to Commercial Multimodal Models with "
            "Open-Source Suites (InternVL 1.5), Sci. China Inf. Sci. 2024 (arXiv 2404.16821); A. Marafioti et al., "
            "SmolVLM: Redefining small and efficient multimodal models, 2025 (arXiv 2504.05299)"
        ),
        test_sizes=("one", "internvl", "smolvlm", "frames", "r1"),
        bench_sizes=("bench-internvl", "bench-smolvlm"),
        compare="tolerance",
        cost=_cost,
        chapter="book/02-fewer-visual-tokens.md",
        model_level=False,
        notes=(
            "InternVL v2 / Idefics3 channel order (dy, dx, c); not model-level: the tiny VLM's connector takes "
            "64-wide tokens, not r^2*64 (a pixel-shuffle connector must be trained, connectors family)"
        ),
    )
)
