"""Spatial pooling of the visual token grid: average / max pooling with a stride, and bilinear resizing.

Paper: B. Li, Y. Zhang, D. Guo, R. Zhang, F. Li, H. Zhang, K. Zhang, Y. Li, Z. Liu, C. Li, "LLaVA-OneVision: Easy
Visual Task Transfer", TMLR 2025 (arXiv 2408.03326). Survey section: fewer visual tokens, spatial downsampling.
LLaVA-OneVision reduces each video frame's 27 x 27 SigLIP grid (729 tokens) to 14 x 14 = 196 by bilinear
interpolation after the projector; its code (``get_2dPool`` of the LLaVA-NeXT repository) offers three modes with a
stride ``s`` (2 by default): ``average`` (``avg_pool2d``), ``max`` (``max_pool2d``) and ``bilinear``
(``interpolate(size=(ceil(h/s), ceil(w/s)), mode="bilinear", align_corners=False)``); the same bilinear resize
shrinks AnyRes feature maps that exceed a token budget (``anyres_max_9``).

Equations, for a grid ``x[h, w, C]`` (row ``i``, column ``j``):

* average, stride ``s`` (floor mode, as ``avg_pool2d`` with its default ``ceil_mode=False``)::

      y[a, b] = (1 / s^2) sum_{u, v < s} x[s a + u, s b + v],      a < floor(h / s),  b < floor(w / s)

  rows and columns past ``s * floor(h / s)`` are dropped (a 27 x 27 grid pools to 13 x 13 at ``s = 2``).
* max, stride ``s``: the same windows with ``max`` instead of the mean (floor mode).
* bilinear to ``(h', w')`` (default ``(ceil(h / s), ceil(w / s))``, so 27 x 27 -> 14 x 14), half-pixel centres as
  ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`` without antialiasing, per axis::

      src = max((dst + 1/2) * (n_in / n_out) - 1/2, 0),   i0 = floor(src),   i1 = min(i0 + 1, n_in - 1),
      lambda = src - i0,   y = (1 - lambda) x[i0] + lambda x[i1]

  applied to rows then columns (the order does not change the result but for rounding).

Shape legend:
    x: ``float[..., h, w, C]`` a grid of tokens (leading axes, e.g. frames, are batch axes).
    returns: ``float[..., h', w', C]`` in ``x``'s dtype.

Tiny-VLM policy (:class:`PoolPolicy`): after the connector, the 144 tokens are reshaped into the 12 x 12 grid,
pooled (default 2 x 2 average, 144 -> 36), and the patch map sends each patch to the pooled cell whose window
holds it (bilinear: the cell whose footprint holds the patch centre); a cell's ``size`` is its patch count.

Deviations from the paper: LLaVA-OneVision pools video frames (bilinear) and not single images; the tiny VLM's
tour row applies the code's ``average`` mode to its single image, because that is the 2 x 2 pooling the brief
asks for and its exact-window patch map is easy to draw. The bilinear mode matches torch's ``interpolate`` (no
antialias) to float rounding; in ``average``/``max`` modes a grid not divisible by the stride loses its last rows
or columns (floor mode), as ``avg_pool2d`` does in the authors' code.
"""

from __future__ import annotations

import numpy as np

from mllm_ref import _checks
from mllm_ref.oracle.registry import Technique, register
from mllm_ref.tinyvlm.plugs import EncoderView, Plugs, TokenPolicy, VisualTokens

__all__ = ["pool", "interpolate_bilinear", "pooled_grid", "cell_map", "PoolPolicy", "make_policy"]

MODES = ("average", "max", "bilinear")


def _size_arg(size, name: str = "size") -> tuple[int, int]:
    """A target grid ``(rows, cols)`` of two positive integers."""
    if not isinstance(size, (tuple, list)) or len(size) != 2:
        raise TypeError(f"{name} must be a tuple (rows, cols) of two integers, got {size!r}")
    return (_checks.integer(size[0], f"{name}[0]", low=1), _checks.integer(size[1], f"{name}[1]", low=1))


def _validate(x, stride, mode, size):
    """Entry checks shared by :func:`pool` (and any fast path)."""
    x = _checks.float_array(x, "x", min_ndim=3)
    mode = _checks.choice(mode, "mode", MODES)
    h, w = x.shape[-3], x.shape[-2]
    if size is not None:
        size = _size_arg(size)
        if mode != "bilinear":
            raise ValueError(f"size applies to mode='bilinear' only, got size={size} with mode={mode!r}")
    stride = _checks.integer(stride, "stride", low=1)
    if mode != "bilinear" and stride > min(h, w):
        raise ValueError(f"stride must be <= the grid's sides {h} x {w} in mode {mode!r}, got {stride}")
    return x, stride, mode, size


def pooled_grid(grid: tuple[int, int], stride: int = 2, mode: str = "average", size=None) -> tuple[int, int]:
    """The output grid ``(h', w')`` of :func:`pool` on a ``grid = (h, w)`` input (floor for average/max, ceil or
    ``size`` for bilinear)."""
    h, w = _size_arg(grid, "grid")
    stride = _checks.integer(stride, "stride", low=1)
    mode = _checks.choice(mode, "mode", MODES)
    if mode == "bilinear":
        return _size_arg(size) if size is not None else (-(-h // stride), -(-w // stride))
    return h // stride, w // stride


def _axis_weights(n_in: int, n_out: int):
    """Source indices and weights of a half-pixel (``align_corners=False``) linear resize of one axis."""
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, src - i0


def interpolate_bilinear(x: np.ndarray, size) -> np.ndarray:
    """Bilinear resize of a token grid, ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``.

    Args:
        x: ``float[..., h, w, C]``.
        size: ``(h', w')`` positive integers.

    Returns:
        ``float[..., h', w', C]`` in ``x``'s dtype; ``size == (h, w)`` returns ``x`` unchanged (copied).
    """
    x = _checks.float_array(x, "x", min_ndim=3)
    size = _size_arg(size)
    return _bilinear(x, size)


def _bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    dt = x.dtype
    r0, r1, lr = _axis_weights(x.shape[-3], size[0])
    c0, c1, lc = _axis_weights(x.shape[-2], size[1])
    lr = lr.astype(dt)[:, None, None]
    lc = lc.astype(dt)[:, None]
    one = dt.type(1)
    rows = (one - lr) * x[..., r0, :, :] + lr * x[..., r1, :, :]
    return ((one - lc) * rows[..., c0, :] + lc * rows[..., c1, :]).astype(dt)


def pool(x: np.ndarray, stride: int = 2, mode: str = "average", size=None) -> np.ndarray:
    """Downsample a grid of visual tokens (LLaVA-OneVision's ``get_2dPool``).

    Args:
        x: ``float[..., h, w, C]`` tokens on their ``h x w`` patch grid.
        stride: the pooling stride ``s`` (window ``s x s``); for ``bilinear`` it sets the default target size.
        mode: ``"average"`` or ``"max"`` (``s x s`` windows, floor mode) or ``"bilinear"``.
        size: ``(h', w')`` target of the bilinear mode (default ``(ceil(h / s), ceil(w / s))``).

    Returns:
        ``float[..., h', w', C]`` in ``x``'s dtype, ``(h', w') = pooled_grid((h, w), stride, mode, size)``.
    """
    x, stride, mode, size = _validate(x, stride, mode, size)
    h, w = x.shape[-3], x.shape[-2]
    oh, ow = pooled_grid((h, w), stride, mode, size)
    if mode == "bilinear":
        return _bilinear(x, (oh, ow))
    lead = x.shape[:-3]
    win = x[..., : oh * stride, : ow * stride, :].reshape(*lead, oh, stride, ow, stride, x.shape[-1])
    if mode == "average":
        return win.mean(axis=(-4, -2), dtype=np.float64).astype(x.dtype)
    return win.max(axis=(-4, -2))


def cell_map(grid: tuple[int, int], out_grid: tuple[int, int], mode: str = "average", stride: int = 2):
    """Which pooled cell carries each patch, and how many patches each cell stands for.

    Average/max: patch ``(i, j)`` goes to cell ``(i // s, j // s)`` when that cell exists (floor mode), else it is
    dropped (``-1``). Bilinear: patch ``(i, j)`` goes to the cell whose footprint holds its centre,
    ``(floor((i + 1/2) h' / h), floor((j + 1/2) w' / w))`` (bilinear weights are not a partition; this is the
    nearest-cell map the book draws).

    Returns:
        ``(source int64[h * w], size float32[h' * w'])``, row-major.
    """
    h, w = _size_arg(grid, "grid")
    oh, ow = _size_arg(out_grid, "out_grid")
    mode = _checks.choice(mode, "mode", MODES)
    i, j = np.divmod(np.arange(h * w, dtype=np.int64), w)
    if mode == "bilinear":
        a = ((2 * i + 1) * oh) // (2 * h)
        b = ((2 * j + 1) * ow) // (2 * w)
        live = np.ones(h * w, dtype=bool)
    else:
        stride = _checks.integer(stride, "stride", low=1)
        if (oh, ow) != (h // stride, w // stride):
            raise ValueError(f"out_grid must be the floor-mode pooled grid {(h // stride, w // stride)} of {grid} at "
                             f"stride {stride}, got {(oh, ow)}")  # fmt: skip
        a, b = i // stride, j // stride
        live = (a < oh) & (b < ow)
    source = np.where(live, a * ow + b, -1).astype(np.int64)
    size = np.bincount(source[live], minlength=oh * ow).astype(np.float32)
    return source, size


# ------------------------------------------------------------------------------------------------- tiny-VLM policy
class PoolPolicy(TokenPolicy):
    """Pool the connector's outputs on the patch grid (``after_connector``).

    Args:
        stride: pooling stride (2: 12 x 12 -> 6 x 6).
        mode: ``"average"``, ``"max"`` or ``"bilinear"``.
        size: target grid of the bilinear mode (default ``ceil(grid / stride)``).
    """

    name = "pool"

    def __init__(self, stride: int = 2, mode: str = "average", size=None):
        self.stride = _checks.integer(stride, "stride", low=1)
        self.mode = _checks.choice(mode, "mode", MODES)
        self.size = None if size is None else _size_arg(size)
        if self.size is not None and self.mode != "bilinear":
            raise ValueError("size applies to mode='bilinear' only")

    def __repr__(self) -> str:
        return f"PoolPolicy(stride={self.stride}, mode={self.mode!r}, size={self.size})"

    def after_connector(self, tokens: VisualTokens, prompt_ids: np.ndarray, encoder: EncoderView) -> VisualTokens:
        rows, cols = tokens.grid
        if tokens.n != rows * cols or not np.array_equal(tokens.source, np.arange(rows * cols)):
            raise ValueError("PoolPolicy needs the untouched patch grid (one token per patch, in order)")
        out = pooled_grid((rows, cols), self.stride, self.mode, self.size)
        y = pool(tokens.x.reshape(rows, cols, -1), self.stride, self.mode, self.size)
        source, size = cell_map((rows, cols), out, self.mode, self.stride)
        return VisualTokens(y.reshape(out[0] * out[1], -1).astype(np.float32), size, source, tokens.grid)


def make_policy(keep_ratio: float) -> PoolPolicy:
    """Bilinear resize of the patch grid to the grid nearest ``keep_ratio`` of the tokens.

    ``keep_ratio`` in [0, 1] maps to the grid ``(max(1, round(12 sqrt(r))), ...)`` on the tiny VLM's 12 x 12 grid
    (round half up): 1 -> 12 x 12 (the identity), 0.25 -> 6 x 6 (36 tokens), 0.1 -> 4 x 4 (16 tokens), 0 -> 1 x 1.
    """
    keep_ratio = _checks.real(keep_ratio, "keep_ratio", low=0.0, high=1.0)
    from mllm_ref.tinyvlm.config import TinyVLMConfig

    g = TinyVLMConfig().grid
    side = max(1, int(np.floor(g * np.sqrt(keep_ratio) + 0.5)))
    return PoolPolicy(stride=1, mode="bilinear", size=(side, side))


# --------------------------------------------------------------------------------------------------- registration
_SIZES = {
    # name: (shape, stride, mode, size)
    "tinyvlm": ((12, 12, 16), 2, "average", None),
    "odd": ((7, 9, 8), 2, "average", None),  # floor mode drops the last row and column
    "max": ((6, 7, 4), 3, "max", None),
    "bilinear": ((9, 11, 8), 2, "bilinear", None),  # ceil -> 5 x 6
    "bilinear-size": ((3, 12, 12, 8), 1, "bilinear", (5, 7)),  # frames as a batch axis
    "onevision": ((27, 27, 64), 2, "bilinear", None),  # 729 -> 196, as LLaVA-OneVision's video frames
    "bench-average": ((16, 24, 24, 1024), 2, "average", None),
    "bench-bilinear": ((16, 27, 27, 1152), 2, "bilinear", None),
}


def _case(size: str, rng: np.random.Generator) -> dict:
    shape, stride, mode, target = _SIZES[size]
    x = rng.standard_normal(shape).astype(np.float32)
    out = {"x": x, "stride": stride, "mode": mode}
    if target is not None:
        out["size"] = target
    return out


def _cost(kwargs: dict) -> dict:
    x = kwargs["x"]
    # about one add (average/max) or six flops (bilinear) per input element; read x, write a quarter of it
    per = 6.0 if kwargs.get("mode") == "bilinear" else 1.0
    return {"flops": per * x.size, "bytes": 1.25 * x.nbytes}


def _default_plugs(model) -> Plugs:
    return Plugs(token_policy=PoolPolicy(2, "average"))


register(
    Technique(
        id="tokens.pool",
        reference=pool,
        make_case=_case,
        paper=(
            "B. Li, Y. Zhang, D. Guo, R. Zhang, F. Li, H. Zhang, K. Zhang, Y. Li, Z. Liu, C. Li, LLaVA-OneVision: "
            "Easy Visual Task Transfer, TMLR 2025 (arXiv 2408.03326)"
        ),
        test_sizes=("tinyvlm", "odd", "max", "bilinear", "bilinear-size", "onevision"),
        bench_sizes=("bench-average", "bench-bilinear"),
        compare="tolerance",
        cost=_cost,
        chapter="book/02-fewer-visual-tokens.md",
        model_level=True,
        notes=(
            "OneVision pools video frames bilinearly; the tiny VLM's row uses the code's 2x2 average mode on its "
            "one image after the connector (144 -> 36); average/max drop a remainder (floor mode)"
        ),
        extra={"plugs": _default_plugs, "setting": "2x2 average pooling after the connector (144 -> 36 tokens)"},
    )
)
