"""RoPE: rotary position embedding (1-D, and multi-section for 2-D image patches and M-RoPE).

Paper: Jianlin Su, Yu Lu, Shengfeng Pan, Ahmed Murtadha, Bo Wen and Yunfeng Liu, "RoFormer: Enhanced Transformer
with Rotary Position Embedding", arXiv:2104.09864, 2021 (Neurocomputing 2024). The multi-section form follows the
multimodal RoPE (M-RoPE) of Peng Wang et al., "Qwen2-VL", arXiv:2409.12191, 2024.

Equations. A head vector ``x`` of even length d is seen as d/2 pairs. In the "rotate-half" layout used by
LLaMA and Hugging Face transformers, pair i is ``(x_i, x_{i + d/2})``, for i = 0 .. d/2 - 1. Pair i at position p
is rotated by the angle ``p * freq_i`` with ``freq_i = theta^(-2i/d)``::

    y_i         = x_i * cos(p freq_i) - x_{i+d/2} * sin(p freq_i)
    y_{i + d/2} = x_{i+d/2} * cos(p freq_i) + x_i * sin(p freq_i)

A rotation keeps the norm of every pair, and the dot product of a rotated query at position p with a rotated key
at position r depends on p and r only through p - r: that is how attention sees relative positions.

Position sections (2-D RoPE, M-RoPE). ``positions`` may be ``[T, S]``: S coordinates per token (S = 2: the
(row, column) of an image patch; S = 3: Qwen2-VL's (time, height, width)). The d/2 frequency pairs are split into
S contiguous sections of (d/2)/S pairs each; pair i belongs to section ``s = i // ((d/2)/S)`` and is rotated by
``positions[:, s] * freq_i``. The frequencies stay the global ``theta^(-2i/d)``, as in Qwen2-VL. With S = 1 this
is plain 1-D RoPE, and a text token whose S coordinates are all equal to its 1-D position gets exactly 1-D RoPE.

Shape legend:
    x: ``[..., T, d]`` (e.g. ``[B, H, T, d]`` or ``[H, T, d]``), d even; T tokens, d head dimension.
    positions: integers ``[T]`` (1-D) or ``[T, S]`` (S sections; (d/2) must be divisible by S), >= 0.
    returns: ``[..., T, d]`` in ``x``'s dtype.

Deviations from the paper: the paper rotates adjacent pairs ``(x_{2i}, x_{2i+1})``; this module uses the
rotate-half pairing ``(x_i, x_{i+d/2})`` of LLaMA / Hugging Face (the same function up to a fixed permutation of
the head dimensions, so weights trained with one layout need the permutation to use the other). Qwen2-VL splits
the pairs into sections of unequal sizes (16, 24, 24 for d = 128); here the sections are equal. The angles are
computed in float64 and their cosines and sines rounded once to ``x``'s dtype.
"""

from __future__ import annotations

import numpy as np

from mllm_ref import _checks
from mllm_ref.oracle.registry import Technique, register

__all__ = ["rope", "rope_angles", "rope_cos_sin", "rerotate"]


def _validate_positions(positions, head_dim: int) -> np.ndarray:
    positions = _checks.int_array(positions, "positions", ndim=(1, 2), low=0)
    if positions.size == 0:
        raise ValueError(f"positions must not be empty, got shape {positions.shape}")
    if positions.ndim == 2:
        sections = positions.shape[1]
        if sections < 1 or (head_dim // 2) % sections != 0:
            raise ValueError(
                f"positions has {sections} sections (shape {positions.shape}), but head_dim/2 = {head_dim // 2} "
                "frequency pairs must split into equal sections: head_dim/2 must be divisible by the section count"
            )
    return positions


def _check_head_dim(head_dim: int, name: str) -> int:
    if head_dim % 2 != 0:
        raise ValueError(f"{name} must be even for RoPE (pairs of dimensions are rotated), got {head_dim}")
    return head_dim


def rope_angles(positions: np.ndarray, head_dim: int, theta: float = 10000.0) -> np.ndarray:
    """Rotation angles ``[T, head_dim/2]`` (float64): pair i of token t turns by ``pos(t, i) * theta^(-2i/d)``.

    Args:
        positions: integers ``[T]`` or ``[T, S]``, >= 0 (see the module docstring for sections).
        head_dim: d, even, >= 2.
        theta: the RoPE base, > 0 (10000 in RoFormer and LLaMA).

    Returns:
        float64 ``[T, head_dim/2]``.
    """
    head_dim = _check_head_dim(_checks.integer(head_dim, "head_dim", low=2), "head_dim")
    theta = _checks.real(theta, "theta", low=0.0, low_open=True)
    positions = _validate_positions(positions, head_dim)
    half = head_dim // 2
    with np.errstate(over="ignore"):  # a theta below about 1e-308 overflows; checked on the angles below
        freqs = theta ** (-2.0 * np.arange(half, dtype=np.float64) / head_dim)  # [d/2]
    if positions.ndim == 1:
        pos = positions.astype(np.float64)[:, None]  # [T, 1]: every pair uses the token's position
    else:
        # Section s covers pairs [s * per, (s + 1) * per): repeat each coordinate column over its section.
        per = half // positions.shape[1]
        pos = np.repeat(positions.astype(np.float64), per, axis=1)  # [T, d/2]
    with np.errstate(over="ignore", invalid="ignore"):
        angles = pos * freqs
    if not np.isfinite(angles).all():  # a tiny theta: cos/sin of inf would be NaN
        raise ValueError(
            f"theta = {theta} is too small: the rotation angles of positions up to {positions.max()} overflow "
            "float64 (RoPE bases are >= 1 in practice)"
        )
    return angles


def _validate(x, positions, theta):
    """Shared entry checks (also used by the fast paths)."""
    x = _checks.float_array(x, "x", min_ndim=2)
    _check_head_dim(x.shape[-1], "the last axis of x (head dimension)")
    theta = _checks.real(theta, "theta", low=0.0, low_open=True)
    positions = _validate_positions(positions, x.shape[-1])
    if positions.shape[0] != x.shape[-2]:
        raise ValueError(
            f"positions must have one entry per token: x has T = {x.shape[-2]} (axis -2), "
            f"positions has shape {positions.shape}"
        )
    return x, positions, theta


def rope_cos_sin(positions: np.ndarray, head_dim: int, theta: float, dtype) -> tuple[np.ndarray, np.ndarray]:
    """``cos`` and ``sin`` of :func:`rope_angles`, each ``[T, head_dim/2]`` rounded once to ``dtype``."""
    dtype = np.dtype(dtype)
    if dtype.type not in _checks.FLOAT_DTYPES:
        raise TypeError(f"dtype must be float16, float32 or float64, got {dtype}")
    angles = rope_angles(positions, head_dim, theta)
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


def rope(x: np.ndarray, positions: np.ndarray, theta: float = 10000.0) -> np.ndarray:
    """Rotate the head vectors of ``x[..., T, d]`` by their token positions (rotate-half layout).

    Args:
        x: float array ``[..., T, d]``, d even, finite.
        positions: integers ``[T]`` or ``[T, S]`` (S position sections, e.g. (row, column)), >= 0.
        theta: the RoPE base, > 0.

    Returns:
        ``[..., T, d]`` in ``x``'s dtype.
    """
    x, positions, theta = _validate(x, positions, theta)
    half = x.shape[-1] // 2
    cos, sin = rope_cos_sin(positions, x.shape[-1], theta, x.dtype)  # [T, d/2], broadcast over leading axes
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def rerotate(x: np.ndarray, old_positions, new_positions, theta: float = 10000.0) -> np.ndarray:
    """Move already-rotated head vectors from their old positions to new ones (1-D RoPE).

    Rotations of one pair compose by adding angles, ``R(new) = R(new - old) R(old)``, so a key rotated at ``old``
    turned by the angle of ``new - old`` is the key rotated at ``new``, up to rounding. This is how a cache
    re-positions keys without the unrotated keys: StreamingLLM's positions inside the cache, kvpress's key
    re-rotation after pruning, and the reuse of an image's cache at a new offset.

    Args:
        x: float array ``[..., T, d]``, d even, rotated at ``old_positions``.
        old_positions, new_positions: integers ``[T]``, >= 0 (the offset ``new - old`` may be negative).
        theta: the RoPE base, > 0.

    Returns:
        ``[..., T, d]`` in ``x``'s dtype. The angles ``(new - old) * freq_i`` are computed in float64.
    """
    x, old, theta = _validate(x, old_positions, theta)
    new = _validate_positions(new_positions, x.shape[-1])
    if old.ndim != 1 or new.shape != old.shape:
        raise ValueError(f"new_positions must have the shape of old_positions, [T] = [{x.shape[-2]}], got {new.shape}")
    half = x.shape[-1] // 2
    freqs = theta ** (-2.0 * np.arange(half, dtype=np.float64) / x.shape[-1])
    angles = (new.astype(np.float64) - old.astype(np.float64))[:, None] * freqs
    cos, sin = np.cos(angles).astype(x.dtype), np.sin(angles).astype(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


# --------------------------------------------------------------------------------------------------------------
# Registration.


def _case(size: str, rng: np.random.Generator) -> dict:
    if size == "one":  # one head, one token, the smallest head
        x = rng.standard_normal((1, 2))
        positions = np.array([7])
    elif size == "odd":  # odd T, a prime number of heads
        x = rng.standard_normal((3, 11, 8))
        positions = np.arange(11) + 5
    elif size == "grid2d":  # 2-D RoPE over a 3 x 5 grid of image patches, (row, column)
        rows, cols = np.meshgrid(np.arange(3), np.arange(5), indexing="ij")
        positions = np.stack([rows.ravel(), cols.ravel()], axis=1)
        x = rng.standard_normal((2, 2, 15, 12))
    elif size == "mrope3":  # three sections (Qwen2-VL M-RoPE layout, equal sections)
        positions = rng.integers(0, 50, size=(13, 3))
        x = rng.standard_normal((1, 2, 13, 18))
    elif size == "long":  # large positions: the angles must be accurate
        positions = np.arange(4090, 4103)
        x = rng.standard_normal((2, 13, 64))
    elif size == "bench_prefill":  # q of a 640-token prefill, 32 heads of 128
        positions = np.arange(640)
        x = rng.standard_normal((1, 32, 640, 128))
    elif size == "bench_vit2d":  # 2-D RoPE over a 24 x 24 patch grid, 16 heads of 64
        rows, cols = np.meshgrid(np.arange(24), np.arange(24), indexing="ij")
        positions = np.stack([rows.ravel(), cols.ravel()], axis=1)
        x = rng.standard_normal((1, 16, 576, 64))
    else:
        raise ValueError(f"unknown size {size!r}")
    return {"x": x.astype(np.float32), "positions": positions.astype(np.int64), "theta": 10000.0}


def _cost(kwargs: dict) -> dict:
    x = kwargs["x"]
    t, d = x.shape[-2], x.shape[-1]
    # Per element: two multiplies and one add; cos/sin tables are read once per token.
    return {"flops": 3.0 * x.size, "bytes": 2.0 * x.nbytes + t * d * x.itemsize}


def _strategy():
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp

    @st.composite
    def cases(draw):
        sections = draw(st.sampled_from([0, 1, 2, 3]))  # 0: 1-D positions [T]
        per = draw(st.integers(1, 4))
        half = per * max(sections, 1)
        t = draw(st.integers(1, 9))
        lead = draw(hnp.array_shapes(min_dims=0, max_dims=2, min_side=1, max_side=3))
        dtype = draw(st.sampled_from([np.float32, np.float64]))
        x = draw(hnp.arrays(dtype, (*lead, t, 2 * half), elements=st.floats(-10, 10, width=32)))
        pos_shape = (t,) if sections == 0 else (t, sections)
        positions = draw(hnp.arrays(np.int64, pos_shape, elements=st.integers(0, 5000)))
        theta = draw(st.sampled_from([10000.0, 500000.0, 100.0]))
        return {"x": x, "positions": positions, "theta": theta}

    return cases()


register(
    Technique(
        id="nn.rope",
        reference=rope,
        make_case=_case,
        paper=(
            "Jianlin Su, Yu Lu, Shengfeng Pan, Ahmed Murtadha, Bo Wen, Yunfeng Liu, RoFormer: Enhanced Transformer "
            "with Rotary Position Embedding, arXiv:2104.09864, 2021"
        ),
        test_sizes=("one", "odd", "grid2d", "mrope3", "long"),
        bench_sizes=("bench_prefill", "bench_vit2d"),
        compare="tolerance",
        float_args=("x",),
        strategy=_strategy,
        cost=_cost,
        chapter=None,
        notes="rotate-half layout; [T, S] positions give 2-D RoPE / M-RoPE sections",
    )
)
