"""AnyRes dynamic-resolution tiling: pick a grid of tiles for the image's aspect ratio, tile it, add a thumbnail.

Papers: H. Liu, C. Li, Y. Li, B. Li, Y. Zhang, S. Shen, Y. J. Lee, "LLaVA-NeXT: Improved reasoning, OCR, and world
knowledge", blog post, January 2024 (AnyRes; code in the LLaVA-NeXT repository, ``llava/mm_utils.py`` and
``llava/model/llava_arch.py``); B. Li et al., "LLaVA-OneVision: Easy Visual Task Transfer", TMLR 2025 (arXiv
2408.03326), which widens the grids to 1x1 .. 6x6 (``anyres_max_9``); R. Xu et al., "LLaVA-UHD: an LMM Perceiving
Any Aspect Ratio and High-Resolution Images", ECCV 2024 (arXiv 2403.11703), the slice-based cousin. Survey section:
fewer visual tokens / dynamic resolution.

The algorithm (LLaVA-NeXT's ``process_anyres_image``), for an image of ``W x H`` pixels, candidate resolutions
``{(w_k, h_k)}`` (multiples of the encoder's tile size ``s``), and an encoder of patch size ``p``:

1. ``select_best_resolution``: for each candidate, ``scale = min(w_k / W, h_k / H)``, the downscaled image is
   ``(int(W scale), int(H scale))``, its effective resolution ``e_k = min(int(W scale) int(H scale), W H)`` and the
   wasted area ``w_k h_k - e_k``. Keep the candidate with the largest ``e_k``; among equal ``e_k`` the smallest waste;
   among full ties the first listed.
2. ``resize_and_pad``: resize the image into the chosen ``(w, h)`` keeping its aspect ratio (the longer relative
   side fills the target; the other is ``min(ceil(side * scale), target)``), centred, padded with zeros (black).
3. ``divide_to_tiles``: cut it into ``(h / s) x (w / s)`` tiles of ``s x s``, row-major.
4. The thumbnail: the whole image resized to ``s x s`` (no aspect ratio kept), placed first.
5. Token count (``mm_patch_merge_type = "spatial_unpad"``): every tile and the thumbnail give ``g^2`` tokens,
   ``g = floor(s / p)`` (a stride-``p`` patch embedding without padding: SigLIP's 384 / 14 gives 27). The tiles'
   features are stitched into one ``(rows g) x (cols g)`` map, the rows or columns that only hold padding are cut
   (``unpad_image``: ``new = int(side * scale)``, ``pad = (current - new) // 2`` cut on each end), one learned
   newline token ends each remaining row, and the thumbnail's ``g^2`` tokens come first::

       total = g^2 + R (C + 1),        R x C = the unpadded feature map

   (LLaVA-OneVision's ``anyres_max_N`` then shrinks the map bilinearly when ``R C > N g^2 1.1^2``; supported by
   :func:`anyres_token_count` through ``max_tiles``.) For extreme aspect ratios the unpadded map can lose every
   row or column (``int(side * scale) = 0``), as in the reference code.

Shape legend:
    image: ``float[H, W, C]`` pixels; sizes are written ``(width, height)`` as in the reference code.
    candidate_resolutions: ``int[K, 2]`` rows of ``(width, height)``, multiples of ``tile_size``.
    tiles: ``float[1 + rows * cols, s, s, C]``: the thumbnail, then the tiles row-major.

Deviations from the paper: the resizes use the half-pixel bilinear interpolation of :mod:`mllm_ref.tokens.pool`
(no antialiasing) where LLaVA-NeXT calls PIL's ``Image.resize`` (bicubic with antialiasing in current Pillow), so
pixel values differ from PIL's; grid selection, padding geometry, tiling and token counts follow the code exactly.
LLaVA-UHD's slice selection (the partition closest to the encoder's pre-training aspect ratio) is not
implemented. Not model-level: the tiny VLM was trained on single 48 x 48 images and has no newline token or
multi-tile training; :func:`demo` tiles a 96 x 48 scene into 48 x 48 tiles the encoder can read one by one.
"""

from __future__ import annotations

import math

import numpy as np

from mllm_ref import _checks
from mllm_ref.oracle.registry import Technique, register
from mllm_ref.tokens.pool import _bilinear

__all__ = [
    "LLAVA_NEXT_PINPOINTS",
    "anyres_pinpoints",
    "select_best_resolution",
    "resize_and_pad",
    "divide_to_tiles",
    "unpad_shape",
    "anyres_token_count",
    "anyres",
    "wide_scene",
    "demo",
]

#: LLaVA-NeXT's default ``image_grid_pinpoints`` for its 336-pixel CLIP encoder, ``(width, height)``.
LLAVA_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
#: The most tiles one candidate may ask for (a guard against absurd inputs).
MAX_TILES = 1024


def anyres_pinpoints(tile_size: int, max_grid: tuple[int, int] = (6, 6), min_grid: tuple[int, int] = (1, 1)):
    """Candidate resolutions ``(width, height)`` for every grid ``i x j`` (``i`` tiles across, ``j`` down) from
    ``min_grid`` to ``max_grid``, in LLaVA-NeXT's order for its range form ``"(1x1),...,(6x6)"`` (``i`` outer).

    Returns:
        ``int64[K, 2]``.
    """
    s = _checks.integer(tile_size, "tile_size", low=1)
    lo = [_checks.integer(v, "min_grid", low=1) for v in _pair(min_grid, "min_grid")]
    hi = [_checks.integer(v, "max_grid", low=1) for v in _pair(max_grid, "max_grid")]
    if hi[0] < lo[0] or hi[1] < lo[1]:
        raise ValueError(f"max_grid must be >= min_grid, got {max_grid} and {min_grid}")
    pts = [(i * s, j * s) for i in range(lo[0], hi[0] + 1) for j in range(lo[1], hi[1] + 1)]
    return np.array(pts, dtype=np.int64)


def _pair(v, name: str):
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if not isinstance(v, (tuple, list)) or len(v) != 2:
        raise TypeError(f"{name} must be a pair (width, height) of integers, got {v!r}")
    return v


def _image_size(image_size) -> tuple[int, int]:
    w, h = _pair(image_size, "image_size")
    return _checks.integer(w, "image_size", low=1), _checks.integer(h, "image_size", low=1)


def _candidates(candidate_resolutions, tile_size: int | None = None) -> np.ndarray:
    c = _checks.int_array(candidate_resolutions, "candidate_resolutions", ndim=2, low=1)
    if c.shape[0] == 0 or c.shape[1] != 2:
        raise ValueError(f"candidate_resolutions must have shape [K >= 1, 2] (width, height), got {c.shape}")
    c = c.astype(np.int64)
    if tile_size is not None:
        if np.any(c % tile_size):
            raise ValueError(f"candidate_resolutions must be multiples of tile_size={tile_size}, got {c.tolist()}")
        if np.any((c[:, 0] // tile_size) * (c[:, 1] // tile_size) > MAX_TILES):
            raise ValueError(f"candidate_resolutions ask for more than {MAX_TILES} tiles of tile_size={tile_size}")
    return c


def select_best_resolution(image_size, candidate_resolutions) -> tuple[int, int]:
    """LLaVA-NeXT's grid choice: maximise the effective resolution, then minimise the wasted area.

    Args:
        image_size: ``(width, height)`` of the original image.
        candidate_resolutions: ``int[K, 2]`` (or a sequence of pairs) of ``(width, height)``.

    Returns:
        The chosen ``(width, height)``; ties go to the first candidate listed.
    """
    w0, h0 = _image_size(image_size)
    cands = _candidates(candidate_resolutions)
    best, best_eff, best_waste = None, -1, None
    for w, h in cands.tolist():
        scale = min(w / w0, h / h0)
        dw, dh = int(w0 * scale), int(h0 * scale)
        eff = min(dw * dh, w0 * h0)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (w, h), eff, waste
    return best


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    if image.shape[0] == height and image.shape[1] == width:
        return image.copy()
    return _bilinear(image, (height, width))


def resize_and_pad(image: np.ndarray, target) -> np.ndarray:
    """Fit ``image`` into ``target = (width, height)`` keeping its aspect ratio, centred, zero-padded.

    Args:
        image: ``float[H, W, C]``.
        target: ``(width, height)``.

    Returns:
        ``float[height, width, C]`` in ``image``'s dtype.
    """
    image = _checks.float_array(image, "image", ndim=3)
    tw, th = _pair(target, "target")
    tw, th = _checks.integer(tw, "target", low=1), _checks.integer(th, "target", low=1)
    return _resize_and_pad(image, tw, th)


def _resize_and_pad(image, tw, th):
    h0, w0 = image.shape[:2]
    sw, sh = tw / w0, th / h0
    if sw < sh:
        nw, nh = tw, min(math.ceil(h0 * sw), th)
    else:
        nw, nh = min(math.ceil(w0 * sh), tw), th
    out = np.zeros((th, tw, image.shape[2]), dtype=image.dtype)
    y0, x0 = (th - nh) // 2, (tw - nw) // 2
    out[y0 : y0 + nh, x0 : x0 + nw] = _resize(image, nh, nw)
    return out


def divide_to_tiles(image: np.ndarray, tile_size: int) -> np.ndarray:
    """Cut ``float[H, W, C]`` (both divisible by ``tile_size``) into ``float[(H/s) (W/s), s, s, C]``, row-major."""
    image = _checks.float_array(image, "image", ndim=3)
    s = _checks.integer(tile_size, "tile_size", low=1)
    h, w, c = image.shape
    if h % s or w % s:
        raise ValueError(f"image must have sides divisible by tile_size={s}, got shape {image.shape}")
    return image.reshape(h // s, s, w // s, s, c).transpose(0, 2, 1, 3, 4).reshape(-1, s, s, c)


def unpad_shape(image_size, feature_shape) -> tuple[int, int]:
    """Rows and columns of the stitched feature map that LLaVA-NeXT's ``unpad_image`` keeps.

    Args:
        image_size: ``(width, height)`` of the original image.
        feature_shape: ``(rows, cols)`` of the stitched tile features (``rows = grid_rows * g``).
    """
    w0, h0 = _image_size(image_size)
    rows, cols = (_checks.integer(v, "feature_shape", low=1) for v in _pair(feature_shape, "feature_shape"))
    if w0 / h0 > cols / rows:  # padding was added above and below
        new = int(h0 * (cols / w0))
        pad = (rows - new) // 2
        return rows - 2 * pad, cols
    new = int(w0 * (rows / h0))
    pad = (cols - new) // 2
    return rows, cols - 2 * pad


def anyres_token_count(
    image_size,
    candidate_resolutions,
    tile_size: int,
    patch_size: int,
    *,
    unpad: bool = True,
    newline: bool = True,
    max_tiles: int | None = None,
) -> dict:
    """Visual tokens LLaVA-NeXT (``spatial_unpad``) feeds the LLM for one image.

    Args:
        image_size: ``(width, height)``.
        candidate_resolutions: ``int[K, 2]`` of ``(width, height)``.
        tile_size: the encoder's input side ``s``; patch_size: its patch side ``p`` (``g = floor(s / p)``).
        unpad: cut the padding rows/columns (``unpad_image``); newline: one newline token per row.
        max_tiles: LLaVA-OneVision's ``anyres_max_N`` (shrink the map when it exceeds ``N`` tiles by > 1.1 per side);
            only with ``unpad`` (the code shrinks in its unpad branch alone).

    Returns:
        ``{"grid": (cols, rows) of tiles, "tile_tokens": g^2 per tile and the thumbnail, "feature_shape": (R, C)
        after unpadding (and shrinking), "newline_tokens": R or 0, "total": g^2 + R C + newlines}``.
    """
    s, p = _tile_patch(tile_size, patch_size)
    best = select_best_resolution(image_size, _candidates(candidate_resolutions, s))
    if not isinstance(unpad, bool) or not isinstance(newline, bool):
        raise TypeError("unpad and newline must be booleans")
    g = s // p
    cols_t, rows_t = best[0] // s, best[1] // s
    rows, cols = rows_t * g, cols_t * g
    if unpad:
        rows, cols = unpad_shape(image_size, (rows, cols))
    if max_tiles is not None:
        if not unpad:
            raise ValueError("max_tiles (LLaVA-OneVision's anyres_max) applies with unpad=True only, as in its code")
        max_tiles = _checks.integer(max_tiles, "max_tiles", low=1)
        times = math.sqrt(rows * cols / (max_tiles * g * g))
        if times > 1.1:
            rows, cols = int(rows // times), int(cols // times)
    lines = rows if newline else 0
    return {
        "grid": (cols_t, rows_t),
        "tile_tokens": [g * g] * (1 + cols_t * rows_t),
        "feature_shape": (rows, cols),
        "newline_tokens": lines,
        "total": g * g + rows * cols + lines,
    }


def _tile_patch(tile_size, patch_size):
    s = _checks.integer(tile_size, "tile_size", low=1)
    p = _checks.integer(patch_size, "patch_size", low=1)
    if p > s:
        raise ValueError(f"patch_size={p} must be <= tile_size={s}")
    return s, p


def anyres(image: np.ndarray, candidate_resolutions: np.ndarray, tile_size: int = 336, patch_size: int = 14) -> dict:
    """AnyRes: choose the grid, resize and pad, cut the tiles, add the thumbnail, count the tokens.

    Args:
        image: ``float[H, W, C]`` pixels.
        candidate_resolutions: ``int[K, 2]`` of ``(width, height)``, positive multiples of ``tile_size``.
        tile_size: the encoder's input side ``s`` (336 for LLaVA-NeXT's CLIP).
        patch_size: the encoder's patch side ``p`` (14), ``g = floor(s / p)`` tokens per side of a tile.

    Returns:
        A dict: ``"tiles"`` ``float[1 + n, s, s, C]`` (thumbnail first, then the ``n = rows * cols`` tiles
        row-major, in ``image``'s dtype); ``"resolution"`` ``int64[2]`` the chosen ``(width, height)``; ``"grid"``
        ``int64[2]`` ``(cols, rows)`` of tiles; ``"tile_tokens"`` ``int64[1 + n]`` (``g^2`` each);
        ``"feature_shape"`` ``int64[2]`` the unpadded map ``(R, C)``; ``"newline_tokens"`` ``int64[1]`` (``R``);
        ``"total_tokens"`` ``int64[1]``: ``g^2 + R C + R``.
    """
    image = _checks.float_array(image, "image", ndim=3)
    s, p = _tile_patch(tile_size, patch_size)
    cands = _candidates(candidate_resolutions, s)
    h0, w0 = image.shape[:2]
    best = select_best_resolution((w0, h0), cands)
    padded = _resize_and_pad(image, best[0], best[1])
    tiles = divide_to_tiles(padded, s)
    thumb = _resize(image, s, s)
    count = anyres_token_count((w0, h0), cands, s, p)
    i64 = np.int64
    return {
        "tiles": np.concatenate([thumb[None], tiles], axis=0),
        "resolution": np.array(best, dtype=i64),
        "grid": np.array(count["grid"], dtype=i64),
        "tile_tokens": np.array(count["tile_tokens"], dtype=i64),
        "feature_shape": np.array(count["feature_shape"], dtype=i64),
        "newline_tokens": np.array([count["newline_tokens"]], dtype=i64),
        "total_tokens": np.array([count["total"]], dtype=i64),
    }


# ------------------------------------------------------------------------------------------------------ book demo
def wide_scene(seed: int = 0) -> np.ndarray:
    """A 96 x 48 shapes-world image: two independently drawn 48 x 48 scenes side by side (``uint8[48, 96, 3]``)."""
    from mllm_ref.tinyvlm import world

    seed = _checks.integer(seed, "seed", low=0)
    rng = np.random.default_rng(seed)
    return np.concatenate([world.render(world.make_scene(rng)), world.render(world.make_scene(rng))], axis=1)


def demo(model=None, seed: int = 0, max_grid: tuple[int, int] = (3, 3)) -> dict:
    """Tile a wide scene for the tiny VLM's 48 x 48 encoder (4 x 4 patches, 12 x 12 tokens per tile).

    Args:
        model: a loaded tiny VLM (:func:`mllm_ref.tinyvlm.model.load`), or ``None`` to skip the encoding.
        seed: the scene seed; max_grid: the largest candidate grid (tiles across, down).

    Returns:
        ``{"image": uint8[48, 96, 3], "tiles": uint8[1 + n, 48, 48, 3] (thumbnail first), "grid", "resolution",
        "counts" (see :func:`anyres_token_count`), "tokens": [float32[144, D] per tile] or None}``. The tiny VLM
        was trained on single 48 x 48 images, so these tokens are for inspection, not for answering questions.
    """
    from mllm_ref.tinyvlm import world

    s, p = world.IMAGE_SIZE, 4
    image = wide_scene(seed)
    cands = anyres_pinpoints(s, max_grid)
    out = anyres(image.astype(np.float32) / np.float32(255.0), cands, s, p)
    tiles = np.clip(out["tiles"], 0.0, 1.0)
    tokens = None
    if model is not None:
        from mllm_ref.tinyvlm.model import encode_image

        tokens = [encode_image(model, t) for t in tiles]
    w0, h0 = image.shape[1], image.shape[0]
    return {
        "image": image,
        "tiles": np.round(tiles * 255.0).astype(np.uint8),
        "grid": tuple(int(v) for v in out["grid"]),
        "resolution": tuple(int(v) for v in out["resolution"]),
        "counts": anyres_token_count((w0, h0), cands, s, p),
        "tokens": tokens,
    }


# --------------------------------------------------------------------------------------------------- registration
_SIZES = {
    # name: (H, W, C, candidates (width, height) or "range:a,b", tile_size, patch_size)
    "wide": (48, 96, 3, "range:3,3", 48, 4),  # the book's demo: exactly 2 x 1 tiles, nothing padded
    "tall-pad": (50, 23, 3, "range:2,3", 16, 4),  # resized and padded left and right, columns unpadded
    "llava-next": (36, 50, 2, ((12, 24), (24, 12), (24, 24), (36, 12), (12, 36)), 12, 3),  # the default pinpoints /28
    "square-tie": (20, 20, 1, ((20, 20), (40, 20), (20, 40), (40, 40)), 20, 5),  # 1 x 1 wins: no waste
    "bench-onevision": (768, 1024, 3, "range:6,6", 384, 14),
}


def _case(size: str, rng: np.random.Generator) -> dict:
    h, w, c, cands, s, p = _SIZES[size]
    if isinstance(cands, str):
        a, b = (int(v) for v in cands.split(":")[1].split(","))
        cands = anyres_pinpoints(s, (a, b))
    else:
        cands = np.array(cands, dtype=np.int64)
    image = rng.uniform(0.0, 1.0, size=(h, w, c)).astype(np.float32)
    return {"image": image, "candidate_resolutions": cands, "tile_size": s, "patch_size": p}


def _cost(kwargs: dict) -> dict:
    image = kwargs["image"]
    return {"flops": 8.0 * image.size, "bytes": 3.0 * image.nbytes}


register(
    Technique(
        id="tokens.anyres",
        reference=anyres,
        make_case=_case,
        paper=(
            "H. Liu, C. Li, Y. Li, B. Li, Y. Zhang, S. Shen, Y. J. Lee, LLaVA-NeXT: Improved reasoning, OCR, and "
            "world knowledge, blog 2024 (AnyRes); B. Li et al., LLaVA-OneVision: Easy Visual Task Transfer, TMLR 2025 "
            "(arXiv 2408.03326)"
        ),
        test_sizes=("wide", "tall-pad", "llava-next", "square-tie"),
        bench_sizes=("bench-onevision",),
        compare="tolerance",
        cost=_cost,
        chapter="book/02-fewer-visual-tokens.md",
        model_level=False,
        notes=(
            "grid choice, padding, tiles and spatial_unpad token counts (thumbnail + unpadded map + one newline "
            "per row) as LLaVA-NeXT's code; bilinear resizes instead of PIL's; not model-level (the tiny VLM saw "
            "single 48x48 images): demo() tiles a 96x48 scene"
        ),
        extra={"demo": demo},
    )
)
