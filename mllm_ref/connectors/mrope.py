"""M-RoPE: Qwen2-VL's multimodal rotary position embedding (3-D position ids for the LLM, and the ViT's 2-D RoPE).

Paper: Peng Wang, Shuai Bai, Sinan Tan, Shijie Wang, Zhihao Fan, Jinze Bai, Keqin Chen, Xuejing Liu, Jialin Wang,
Wenbin Ge, Yang Fan, Kai Dang, Mengfei Du, Xuancheng Ren, Rui Men, Dayiheng Liu, Chang Zhou, Jingren Zhou,
Junyang Lin, "Qwen2-VL: Enhancing Vision-Language Model's Perception of the World at Any Resolution", arXiv:2409.12191,
2024 (section 2.1, "Multimodal Rotary Position Embedding"). Survey: connectors / multimodal positions
(TECHNIQUES.md, ``connectors.mrope``). The reference follows the official implementation in Hugging Face
transformers (``models/qwen2_vl/modeling_qwen2_vl.py``: ``get_rope_index``, the text rotary embedding with
``mrope_section``, ``Qwen2VLVisionRotaryEmbedding``; ``vision_utils.get_vision_position_ids``).

1. Position ids (:func:`rope_index`). Every LLM token gets three ids ``(t, h, w)``. A run of ``L`` text tokens
   starting at ``s`` gets ``(s + j, s + j, s + j)``, ``j = 0 .. L-1``: text alone is plain 1-D RoPE. An image or a
   video of ``grid_thw = (T, H, W)`` ViT patches becomes ``T * (H/m) * (W/m)`` LLM tokens (the ``m x m`` patch
   merger, ``m = spatial_merge_size``), ordered frame by frame, then row-major over the merged grid; the token
   at frame ``i``, merged row ``r``, merged column ``c`` gets ``(s + i, s + r, s + c)`` where ``s`` is the next free
   position. The text after a block continues at ``max(ids of the block) + 1 = s + max(T, H/m, W/m)``. So an image
   uses ``max(H, W)/m`` positions instead of ``H W / m^2``. Returned with ``delta = max id + 1 - n``
   (``n`` unpadded tokens), the offset that decoding adds to the 1-D positions of later tokens
   (``mrope_position_deltas`` in transformers).
2. Rotation (:func:`apply_mrope`). The ``d/2`` frequency pairs of a head (rotate-half layout, pair ``i`` is
   ``(x_i, x_{i+d/2})``, frequency ``theta^(-2i/d)``) are split into three contiguous sections of sizes
   ``mrope_section = (s_t, s_h, s_w)`` (``(16, 24, 24)`` for ``d = 128``): pairs ``[0, s_t)`` turn by the temporal
   id, ``[s_t, s_t + s_h)`` by the height id, the rest by the width id. The frequencies stay the global
   ``theta^(-2i/d)``. Implemented with :func:`mllm_ref.nn.rope.rope` by giving each of the ``d/2`` pairs its own
   position column (``nn.rope``'s sections are equal, so ``d/2`` one-pair sections express any split).
3. ViT 2-D RoPE (:func:`vision_position_ids`, :func:`vision_rope_2d`). Each ViT patch of a ``(T, H, W)`` grid has
   ids ``(row, column)`` in the patch grid, listed in the processor's order: frame by frame, ``m x m`` merge
   windows row-major, patches inside a window row-major. A head of width ``d`` (``d % 4 == 0``) is rotated by
   two 1-D RoPEs of width ``d/2`` with the same frequencies ``theta^(-2j/(d/2))``, ``j < d/4``: pairs
   ``(x_j, x_{j+d/2})`` by the row, pairs ``(x_{d/4+j}, x_{3d/4+j})`` by the column (theta = 10000).

Shape legend:
    x: ``float[..., T, d]`` queries or keys (e.g. ``[H, T, d]``), d even, ``d/2 = sum(mrope_section)``.
    input_ids: ``int[T]`` token ids, >= 0; image_token_id / video_token_id: the ids of the visual placeholders.
    image_grid_thw: ``int[n_img, 3]``, video_grid_thw: ``int[n_vid, 3]`` (T, H, W) in ViT patches, H and W
    divisible by m; or None. attention_mask: ``int/bool[T]`` of 0/1 (1: a real token), or None.
    position_ids: ``int64[3, T]`` rows (t, h, w); delta: ``int64`` scalar array.
    grid_thw (vision): ``int[n, 3]``; vision ids ``int64[N, 2]`` (row, column), N = sum T*H*W.

Tokens: every maximal run of ``image_token_id`` among the unpadded tokens is one image, taking the next row of
``image_grid_thw`` (likewise videos); its length must be ``T*H*W/m^2``. Real prompts wrap each image in
``<|vision_start|> ... <|vision_end|>`` text tokens, so two images are never adjacent. Padding (``attention_mask
== 0``) is removed before the ids are assigned; padded slots get id 0 (as transformers 5.x).

Deviations from the paper: none in the ids and rotation of Qwen2-VL. Against transformers 5.23 (the installed
version, which takes ``mm_token_type_ids`` instead of reading the placeholder ids): the text after a video starts
at ``max + 1`` as in the paper and the original Qwen2-VL code (transformers 4.45 - 4.5x); 5.23 advances by
``max(H, W)/m`` only, so the two differ for videos with more frames than ``max(H, W)/m`` (identical for every
image and for shorter videos). ``delta`` counts the unpadded tokens (5.23; 4.5x counted the padded length) and
padded slots are 0 (4.5x: 1). Qwen2.5-VL differs for videos only: the temporal id of frame ``i`` is
``floor(i * second_per_grid_t * tokens_per_second)`` (absolute time), not ``i``; it is not implemented here. The
cosines and sines are computed in float64 and rounded once to ``x``'s dtype (transformers: float32 angles).
Batches are one sequence per call.
"""

from __future__ import annotations

import numpy as np

from mllm_ref import _checks
from mllm_ref.nn.rope import rope
from mllm_ref.oracle.registry import Technique, register

__all__ = [
    "rope_index",
    "apply_mrope",
    "mrope",
    "vision_position_ids",
    "vision_rope_2d",
    "QWEN2VL_IMAGE_TOKEN_ID",
    "QWEN2VL_VIDEO_TOKEN_ID",
    "QWEN2VL_MROPE_SECTION",
]

#: Qwen2-VL's placeholder ids (``<|image_pad|>``, ``<|video_pad|>``) and its text head split (head_dim 128).
QWEN2VL_IMAGE_TOKEN_ID = 151655
QWEN2VL_VIDEO_TOKEN_ID = 151656
QWEN2VL_MROPE_SECTION = (16, 24, 24)


# --------------------------------------------------------------------------------------------------------------
# Validation.


def _grid(grid, name: str, m: int) -> np.ndarray:
    """``int64[n, 3]`` grid (None -> ``[0, 3]``), every entry >= 1, H and W divisible by ``m``."""
    if grid is None:
        return np.zeros((0, 3), dtype=np.int64)
    grid = _checks.int_array(grid, name, ndim=2, low=1)
    if grid.shape[1] != 3:
        raise ValueError(f"{name} must have shape [n, 3] (T, H, W per image or video), got {grid.shape}")
    if np.any(grid[:, 1:] % m != 0):
        raise ValueError(f"{name}: H and W must be divisible by spatial_merge_size = {m}, got {grid.tolist()}")
    return grid.astype(np.int64)


def _mask(attention_mask, t: int) -> np.ndarray:
    if attention_mask is None:
        return np.ones(t, dtype=bool)
    if isinstance(attention_mask, np.ndarray) and attention_mask.dtype == np.bool_:
        mask = attention_mask
        if mask.ndim != 1:
            raise ValueError(f"attention_mask must have 1 dimension, got shape {mask.shape}")
    else:
        mask = _checks.int_array(attention_mask, "attention_mask", ndim=1, low=0, high=1) == 1
    if mask.shape[0] != t:
        raise ValueError(f"attention_mask must have one entry per token of input_ids ({t}), got shape {mask.shape}")
    return mask


def _token_id(v, name: str) -> int:
    return _checks.integer(v, name, low=0)


def _section(mrope_section, half: int | None) -> tuple[int, int, int]:
    if not isinstance(mrope_section, (tuple, list)):
        raise TypeError(f"mrope_section must be a tuple of 3 integers, got {type(mrope_section).__name__}")
    if len(mrope_section) != 3:
        raise ValueError(f"mrope_section must have 3 entries (temporal, height, width), got {len(mrope_section)}")
    sec = tuple(_checks.integer(s, "mrope_section", low=1) for s in mrope_section)
    if half is not None and sum(sec) != half:
        raise ValueError(
            f"mrope_section must sum to head_dim/2 = {half} (the frequency pairs of a head), got {sec} = {sum(sec)}"
        )
    return sec


def _validate_index(input_ids, image_grid_thw, video_grid_thw, attention_mask, image_token_id, video_token_id, m):
    ids = _checks.int_array(input_ids, "input_ids", ndim=1, low=0)
    if ids.size == 0:
        raise ValueError("input_ids must not be empty")
    image_token_id = _token_id(image_token_id, "image_token_id")
    video_token_id = _token_id(video_token_id, "video_token_id")
    if image_token_id == video_token_id:
        raise ValueError(f"image_token_id and video_token_id must differ, both are {image_token_id}")
    m = _checks.integer(m, "spatial_merge_size", low=1)
    mask = _mask(attention_mask, ids.shape[0])
    img = _grid(image_grid_thw, "image_grid_thw", m)
    vid = _grid(video_grid_thw, "video_grid_thw", m)
    return ids, img, vid, mask, image_token_id, video_token_id, m


def _runs(kind: np.ndarray) -> list[tuple[int, int, int]]:
    """Maximal runs of equal values: ``[(value, start, end), ...]``."""
    edges = np.flatnonzero(np.diff(kind)) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [kind.shape[0]]])
    return [(int(kind[s]), int(s), int(e)) for s, e in zip(starts, ends)]


# --------------------------------------------------------------------------------------------------------------
# 1. Position ids.


def _block_ids(start: int, grid: np.ndarray, m: int) -> np.ndarray:
    """``int64[3, T*(H/m)*(W/m)]``: (start + frame, start + merged row, start + merged column), frame-major."""
    gt, gh, gw = int(grid[0]), int(grid[1]) // m, int(grid[2]) // m
    t, h, w = np.meshgrid(np.arange(gt), np.arange(gh), np.arange(gw), indexing="ij")
    return np.stack([t.ravel(), h.ravel(), w.ravel()]).astype(np.int64) + start


def rope_index(
    input_ids: np.ndarray,
    image_grid_thw: np.ndarray | None = None,
    video_grid_thw: np.ndarray | None = None,
    attention_mask: np.ndarray | None = None,
    *,
    image_token_id: int = QWEN2VL_IMAGE_TOKEN_ID,
    video_token_id: int = QWEN2VL_VIDEO_TOKEN_ID,
    spatial_merge_size: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2-VL's 3-D (temporal, height, width) position ids of a sequence mixing text, images and videos.

    Args:
        input_ids: ``int[T]`` token ids, >= 0. Each maximal run of ``image_token_id`` (``video_token_id``) among
            the unpadded tokens is one image (video), matched in order with the rows of its grid.
        image_grid_thw: ``int[n_img, 3]`` (T, H, W) in ViT patches, or None when there is no image.
        video_grid_thw: ``int[n_vid, 3]``, or None when there is no video.
        attention_mask: ``int/bool[T]`` of 0/1, 1 for real tokens (left or right padding), or None.
        image_token_id, video_token_id: the placeholder ids (Qwen2-VL's by default).
        spatial_merge_size: m, the patch merger's window (2 in Qwen2-VL); H and W must be divisible by it.

    Returns:
        ``(position_ids int64[3, T], delta int64[])``: rows t, h, w (padded slots 0) and ``max id + 1 - n`` for
        the ``n`` unpadded tokens.
    """
    ids, img, vid, mask, image_token_id, video_token_id, m = _validate_index(
        input_ids, image_grid_thw, video_grid_thw, attention_mask, image_token_id, video_token_id, spatial_merge_size
    )
    live = ids[mask]
    if live.size == 0:
        raise ValueError("attention_mask must keep at least one token of input_ids")
    kind = np.where(live == image_token_id, 1, np.where(live == video_token_id, 2, 0))
    runs = _runs(kind)
    grids = {1: img, 2: vid}
    names = {1: ("image_grid_thw", "image_token_id"), 2: ("video_grid_thw", "video_token_id")}
    for k in (1, 2):
        n_runs = sum(1 for v, _, _ in runs if v == k)
        if n_runs != grids[k].shape[0]:
            raise ValueError(
                f"{names[k][0]} has {grids[k].shape[0]} rows but input_ids has {n_runs} runs of {names[k][1]} "
                "(one run of placeholder tokens per image or video)"
            )
    used = {1: 0, 2: 0}
    pieces, start = [], 0
    for k, s, e in runs:
        if k == 0:
            pieces.append(np.broadcast_to(np.arange(start, start + e - s, dtype=np.int64), (3, e - s)))
            start += e - s
            continue
        grid = grids[k][used[k]]
        want = int(grid[0]) * (int(grid[1]) // m) * (int(grid[2]) // m)  # Python ints: no overflow
        if want != e - s:
            raise ValueError(
                f"{names[k][0]}[{used[k]}] = {grid.tolist()} needs {want} placeholder tokens (T*H*W/m^2, "
                f"m = {m}), but its run in input_ids has {e - s}"
            )
        block = _block_ids(start, grid, m)
        pieces.append(block)
        start = int(block.max()) + 1  # the next text continues after the largest id of the block
        used[k] += 1
    live_ids = np.concatenate(pieces, axis=1)
    position_ids = np.zeros((3, ids.shape[0]), dtype=np.int64)
    position_ids[:, mask] = live_ids
    delta = np.array(int(live_ids.max()) + 1 - live.size, dtype=np.int64)
    return position_ids, delta


# --------------------------------------------------------------------------------------------------------------
# 2. Rotation.


def _pair_positions(position_ids: np.ndarray, sec: tuple[int, int, int]) -> np.ndarray:
    """``[T, d/2]``: the position each frequency pair turns by (section s of the pairs reads row s)."""
    rows = np.repeat(np.arange(3), sec)  # pair i -> row (t, h or w)
    return position_ids[rows].T


def _validate_rotation(x, position_ids, mrope_section):
    x = _checks.float_array(x, "x", min_ndim=2)
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"x: the head dimension (last axis) must be even, got shape {x.shape}")
    sec = _section(mrope_section, d // 2)
    position_ids = _checks.int_array(position_ids, "position_ids", ndim=2, low=0)
    if position_ids.shape != (3, x.shape[-2]):
        raise ValueError(
            f"position_ids must have shape [3, T] with T = {x.shape[-2]} (axis -2 of x), got {position_ids.shape}"
        )
    return x, position_ids, sec


def apply_mrope(
    x: np.ndarray,
    position_ids: np.ndarray,
    mrope_section: tuple[int, int, int] = QWEN2VL_MROPE_SECTION,
    theta: float = 1000000.0,
) -> np.ndarray:
    """Rotate queries or keys by the multimodal rotary embedding (rotate-half layout, as transformers).

    Args:
        x: ``float[..., T, d]``, d even, finite.
        position_ids: ``int[3, T]`` >= 0, rows (temporal, height, width), e.g. from :func:`rope_index`.
        mrope_section: pairs per section ``(s_t, s_h, s_w)``, summing to ``d/2`` ((16, 24, 24) for d = 128).
        theta: the RoPE base (1e6 in Qwen2-VL's LLM).

    Returns:
        ``float[..., T, d]`` in ``x``'s dtype.
    """
    x, position_ids, sec = _validate_rotation(x, position_ids, mrope_section)
    theta = _checks.real(theta, "theta", low=0.0, low_open=True)
    return rope(x, _pair_positions(position_ids, sec), theta)


def mrope(
    x: np.ndarray,
    input_ids: np.ndarray,
    image_grid_thw: np.ndarray | None = None,
    video_grid_thw: np.ndarray | None = None,
    attention_mask: np.ndarray | None = None,
    *,
    image_token_id: int = QWEN2VL_IMAGE_TOKEN_ID,
    video_token_id: int = QWEN2VL_VIDEO_TOKEN_ID,
    spatial_merge_size: int = 2,
    mrope_section: tuple[int, int, int] = QWEN2VL_MROPE_SECTION,
    theta: float = 1000000.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """M-RoPE end to end: :func:`rope_index` of the sequence, then :func:`apply_mrope` of ``x`` (the registered
    reference: the ids are compared exactly, the rotated values with the tolerance policy).

    Args:
        x: ``float[..., T, d]`` queries or keys of the ``T`` tokens of ``input_ids``.
        input_ids, image_grid_thw, video_grid_thw, attention_mask, image_token_id, video_token_id,
        spatial_merge_size: as :func:`rope_index`. mrope_section, theta: as :func:`apply_mrope`.

    Returns:
        ``(rotated float[..., T, d], position_ids int64[3, T], delta int64[])``.
    """
    x = _checks.float_array(x, "x", min_ndim=2)
    if x.shape[-1] % 2:
        raise ValueError(f"x: the head dimension (last axis) must be even, got shape {x.shape}")
    _section(mrope_section, x.shape[-1] // 2)
    theta = _checks.real(theta, "theta", low=0.0, low_open=True)
    ids = _checks.int_array(input_ids, "input_ids", ndim=1, low=0)
    if ids.shape[0] != x.shape[-2]:
        raise ValueError(f"x has T = {x.shape[-2]} tokens (axis -2) but input_ids has {ids.shape[0]}")
    position_ids, delta = rope_index(
        ids,
        image_grid_thw,
        video_grid_thw,
        attention_mask,
        image_token_id=image_token_id,
        video_token_id=video_token_id,
        spatial_merge_size=spatial_merge_size,
    )
    return apply_mrope(x, position_ids, tuple(mrope_section), theta), position_ids, delta


# --------------------------------------------------------------------------------------------------------------
# 3. The ViT's 2-D RoPE.


def vision_position_ids(grid_thw: np.ndarray, spatial_merge_size: int = 2) -> np.ndarray:
    """(row, column) of every ViT patch, in Qwen2-VL's order (frames, then ``m x m`` windows row-major, then
    patches inside a window row-major).

    Args:
        grid_thw: ``int[n, 3]`` (T, H, W) per image or video, in patches; H and W divisible by m.
        spatial_merge_size: m.

    Returns:
        ``int64[N, 2]``, ``N = sum T*H*W``.
    """
    m = _checks.integer(spatial_merge_size, "spatial_merge_size", low=1)
    grid = _grid(grid_thw, "grid_thw", m)
    if grid.shape[0] == 0:
        raise ValueError("grid_thw must have at least one row")
    out = []
    for t, h, w in grid.tolist():
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        # [H, W] -> [H/m, m, W/m, m] -> windows (H/m, W/m) outer, (m, m) inner
        win = lambda a: a.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).ravel()  # noqa: E731
        hw = np.stack([win(rows), win(cols)], axis=1)
        out.append(np.tile(hw, (t, 1)))
    return np.concatenate(out).astype(np.int64)


def vision_rope_2d(
    x: np.ndarray, grid_thw: np.ndarray, spatial_merge_size: int = 2, theta: float = 10000.0
) -> np.ndarray:
    """Rotate ViT queries or keys by Qwen2-VL's 2-D RoPE.

    Args:
        x: ``float[..., N, d]`` (N patches in :func:`vision_position_ids` order), ``d % 4 == 0``.
        grid_thw, spatial_merge_size: as :func:`vision_position_ids`.
        theta: the base (10000 in Qwen2-VL's ViT).

    Returns:
        ``float[..., N, d]`` in ``x``'s dtype: pairs ``(x_j, x_{j+d/2})``, ``j < d/4``, turned by
        ``row * theta^(-4j/d)``, pairs ``(x_{d/4+j}, x_{3d/4+j})`` by ``column * theta^(-4j/d)``.
    """
    x = _checks.float_array(x, "x", min_ndim=2)
    d = x.shape[-1]
    if d % 4:
        raise ValueError(f"x: the head dimension (last axis) must be divisible by 4 for 2-D RoPE, got {x.shape}")
    theta = _checks.real(theta, "theta", low=0.0, low_open=True)
    pos = vision_position_ids(grid_thw, spatial_merge_size)
    if pos.shape[0] != x.shape[-2]:
        raise ValueError(f"x has N = {x.shape[-2]} patches (axis -2) but grid_thw describes {pos.shape[0]}")
    q = d // 4
    # Rows: dims [0, q) paired with [2q, 3q); columns: [q, 2q) with [3q, 4q). Each is a 1-D RoPE of width d/2.
    rows = np.concatenate([np.arange(0, q), np.arange(2 * q, 3 * q)])
    cols = np.concatenate([np.arange(q, 2 * q), np.arange(3 * q, 4 * q)])
    out = np.empty_like(x, dtype=x.dtype.newbyteorder("="))
    out[..., rows] = rope(x[..., rows], pos[:, 0], theta)
    out[..., cols] = rope(x[..., cols], pos[:, 1], theta)
    return out


# --------------------------------------------------------------------------------------------------------------
# Registration.

_IMG, _VID, _VS, _VE = 7, 8, 5, 6  # small placeholder / vision start / vision end ids for the seeded cases


def _layout(segments) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Token ids for ``[("text", n) | ("image", (t, h, w)) | ("video", (t, h, w)), ...]`` (m = 2), with vision
    start/end tokens around every block; returns ``(input_ids, image_grid_thw, video_grid_thw)``."""
    ids, img, vid = [], [], []
    for kind, v in segments:
        if kind == "text":
            ids += [10 + (j % 50) for j in range(v)]
        else:
            n = v[0] * (v[1] // 2) * (v[2] // 2)
            ids += [_VS] + [_IMG if kind == "image" else _VID] * n + [_VE]
            (img if kind == "image" else vid).append(v)
    grid = lambda g: np.array(g, dtype=np.int64) if g else None  # noqa: E731
    return np.array(ids, dtype=np.int64), grid(img), grid(vid)


_CASES = {  # segments, heads, mrope_section, left padding
    "text_only": ([("text", 9)], 2, (2, 3, 3), 0),
    "image": ([("text", 3), ("image", (1, 4, 6)), ("text", 4)], 2, (2, 3, 3), 0),
    "two_images": (
        [("text", 2), ("image", (1, 4, 6)), ("text", 1), ("image", (1, 6, 2)), ("text", 3)], 3, (4, 2, 2), 0
    ),
    "video": ([("text", 2), ("video", (2, 4, 4)), ("text", 2)], 1, (2, 3, 3), 0),
    "padded": ([("text", 2), ("image", (1, 2, 4)), ("video", (3, 2, 2)), ("text", 2)], 2, (16, 24, 24), 3),
    "bench_image": ([("text", 20), ("image", (1, 48, 48)), ("text", 44)], 28, (16, 24, 24), 0),
    "bench_video": ([("text", 16), ("video", (8, 24, 32)), ("text", 32)], 28, (16, 24, 24), 0),
}


def _case(size: str, rng: np.random.Generator) -> dict:
    segments, heads, sec, pad = _CASES[size]
    ids, img, vid = _layout(segments)
    mask = None
    if pad:
        ids = np.concatenate([np.zeros(pad, dtype=np.int64), ids])
        mask = (np.arange(ids.shape[0]) >= pad).astype(np.int64)
    x = rng.standard_normal((heads, ids.shape[0], 2 * sum(sec))).astype(np.float32)
    return {
        "x": x,
        "input_ids": ids,
        "image_grid_thw": img,
        "video_grid_thw": vid,
        "attention_mask": mask,
        "image_token_id": _IMG,
        "video_token_id": _VID,
        "spatial_merge_size": 2,
        "mrope_section": sec,
        "theta": 1000000.0 if size != "text_only" else 10000.0,
    }


def _cost(kwargs: dict) -> dict:
    x = kwargs["x"]
    t, d = x.shape[-2], x.shape[-1]
    # Per element: two multiplies and one add; the cos/sin tables ([T, d/2] each) and the ids are read once.
    return {"flops": 3.0 * x.size, "bytes": 2.0 * x.nbytes + t * d * x.itemsize + 4 * t * 8}


def _strategy():
    from hypothesis import strategies as st

    grids = st.tuples(st.integers(1, 2), st.sampled_from([2, 4, 6]), st.sampled_from([2, 4, 6]))
    segment = st.one_of(
        st.tuples(st.just("text"), st.integers(1, 4)),
        st.tuples(st.just("image"), grids.map(lambda g: (1, g[1], g[2]))),
        st.tuples(st.just("video"), grids),
    )

    @st.composite
    def cases(draw):
        segments = draw(st.lists(segment, min_size=1, max_size=5))
        ids, img, vid = _layout(segments)
        pad = draw(st.integers(0, 3))
        mask = None
        if pad:
            ids = np.concatenate([np.zeros(pad, dtype=np.int64), ids])
            mask = (np.arange(ids.shape[0]) >= pad).astype(np.int64)
        sec = draw(st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)))
        heads = draw(st.integers(1, 3))
        dtype = draw(st.sampled_from([np.float32, np.float64]))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        x = rng.standard_normal((heads, ids.shape[0], 2 * sum(sec))).astype(dtype)
        return {
            "x": x,
            "input_ids": ids,
            "image_grid_thw": img,
            "video_grid_thw": vid,
            "attention_mask": mask,
            "image_token_id": _IMG,
            "video_token_id": _VID,
            "spatial_merge_size": 2,
            "mrope_section": sec,
            "theta": draw(st.sampled_from([10000.0, 1000000.0])),
        }

    return cases()


register(
    Technique(
        id="connectors.mrope",
        reference=mrope,
        make_case=_case,
        paper=(
            "Peng Wang, Shuai Bai, Sinan Tan, Shijie Wang, Zhihao Fan, Jinze Bai, Keqin Chen, Xuejing Liu, Jialin "
            "Wang, Wenbin Ge, Yang Fan, Kai Dang, Mengfei Du, Xuancheng Ren, Rui Men, Dayiheng Liu, Chang Zhou, "
            "Jingren Zhou, Junyang Lin, Qwen2-VL: Enhancing Vision-Language Model's Perception of the World at Any "
            "Resolution, arXiv:2409.12191, 2024"
        ),
        test_sizes=("text_only", "image", "two_images", "video", "padded"),
        bench_sizes=("bench_image", "bench_video"),
        compare="tolerance",
        float_args=("x",),
        strategy=_strategy,
        cost=_cost,
        chapter="book/03-connectors.md",
        notes=(
            "ids compared exactly, rotation by tolerance; text after a video at max+1 (paper, HF 4.5x; HF 5.23 "
            "advances max(H,W)/m); Qwen2.5-VL absolute-time video ids not implemented; ViT 2-D RoPE in "
            "vision_rope_2d (not registered)"
        ),
    )
)
