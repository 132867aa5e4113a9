"""Tests of mllm_ref.tokens.anyres: LLaVA-NeXT's grid selection, resize-and-pad, tiling and token counts."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mllm_ref.oracle import registry
from mllm_ref.tinyvlm.model import load
from mllm_ref.tokens.anyres import (
    LLAVA_NEXT_PINPOINTS,
    anyres,
    anyres_pinpoints,
    anyres_token_count,
    demo,
    divide_to_tiles,
    resize_and_pad,
    select_best_resolution,
    unpad_shape,
    wide_scene,
)

PROPS = settings(max_examples=30, deadline=None)


# ------------------------------------------------------------------------------------------------ hand examples
def test_select_best_resolution_llava_next_examples():
    assert select_best_resolution((800, 600), LLAVA_NEXT_PINPOINTS) == (672, 672)
    assert select_best_resolution((1500, 400), LLAVA_NEXT_PINPOINTS) == (1008, 336)
    assert select_best_resolution((300, 1200), LLAVA_NEXT_PINPOINTS) == (336, 1008)
    # a small image fits every candidate whole: the least waste wins, and between (336, 672) and (672, 336)
    # (equal waste) the first listed wins, even for a wide image: that is the reference code's rule
    assert select_best_resolution((200, 100), LLAVA_NEXT_PINPOINTS) == (336, 672)


def test_pinpoints_range_order():
    p = anyres_pinpoints(384, (2, 3))
    assert p.tolist() == [[384, 384], [384, 768], [384, 1152], [768, 384], [768, 768], [768, 1152]]


def test_token_count_llava_next_800x600():
    """LLaVA-NeXT-336 on 800 x 600: a 2 x 2 grid, a 48 x 48 map unpadded to 36 rows, a newline per row."""
    c = anyres_token_count((800, 600), LLAVA_NEXT_PINPOINTS, 336, 14)
    assert c["grid"] == (2, 2) and c["feature_shape"] == (36, 48) and c["newline_tokens"] == 36
    assert c["total"] == 576 + 36 * 48 + 36 and c["tile_tokens"] == [576] * 5
    plain = anyres_token_count((800, 600), LLAVA_NEXT_PINPOINTS, 336, 14, unpad=False, newline=False)
    assert plain["total"] == 5 * 576


def test_token_count_onevision_max9_shrinks():
    cands = anyres_pinpoints(384, (6, 6))
    c = anyres_token_count((2304, 2304), cands, 384, 14, max_tiles=9)
    assert c["grid"] == (6, 6)
    rows, cols = c["feature_shape"]
    times = math.sqrt(162 * 162 / (9 * 27 * 27))
    assert (rows, cols) == (int(162 // times), int(162 // times)) == (81, 81)


def test_unpad_shape_by_hand():
    assert unpad_shape((800, 600), (48, 48)) == (36, 48)  # pad rows: new 36, 6 cut at each end
    assert unpad_shape((600, 800), (48, 48)) == (48, 36)
    assert unpad_shape((23, 50), (12, 8)) == (12, 6)  # new = int(5.52) = 5, pad = 1 per side: 6 kept


def test_resize_and_pad_geometry():
    img = np.ones((10, 20, 1), dtype=np.float32)
    out = resize_and_pad(img, (40, 40))
    rows = np.flatnonzero(out[:, 0, 0] > 0)
    assert out.shape == (40, 40, 1) and rows.tolist() == list(range(10, 30))  # 20 rows, centred
    np.testing.assert_array_equal(out[:10], 0.0)


# --------------------------------------------------------------------------------------------------- properties
@st.composite
def requests(draw):
    s = draw(st.sampled_from([4, 6, 8]))
    h, w = draw(st.integers(2, 40)), draw(st.integers(2, 40))
    a, b = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    pts = anyres_pinpoints(s, (a, b))
    order = draw(st.permutations(range(len(pts))))
    image = np.random.default_rng(h * 1000 + w).uniform(0.1, 1.0, (h, w, 2)).astype(np.float32)
    return image, pts[list(order)], s


@PROPS
@given(requests())
def test_choice_is_the_lexicographic_best_and_fits(req):
    image, cands, s = req
    h0, w0 = image.shape[:2]
    best = select_best_resolution((w0, h0), cands)

    def key(c):
        scale = min(c[0] / w0, c[1] / h0)
        eff = min(int(w0 * scale) * int(h0 * scale), w0 * h0)
        return eff, -(c[0] * c[1] - eff)

    keys = [key(c) for c in cands.tolist()]
    top = max(keys)
    assert tuple(best) == tuple(cands[keys.index(top)].tolist())  # the first of the best
    out = anyres(image, cands, s, 2)
    n = int(np.prod(out["grid"]))
    assert out["tiles"].shape == (1 + n, s, s, 2)
    assert tuple(out["resolution"]) == best and tuple(out["grid"] * s) == best


@PROPS
@given(requests())
def test_tiles_cover_the_padded_image_and_counts_add_up(req):
    image, cands, s = req
    p = 2
    out = anyres(image, cands, s, p)
    w, h = out["resolution"]
    cols, rows = out["grid"]
    padded = resize_and_pad(image, (int(w), int(h)))
    stitched = out["tiles"][1:].reshape(rows, cols, s, s, 2).transpose(0, 2, 1, 3, 4).reshape(h, w, 2)
    np.testing.assert_array_equal(stitched, padded)
    # the resized image fills one side, is centred, and the rest is zero padding
    live = np.argwhere(padded[..., 0] > 0)
    (y0, x0), (y1, x1) = live.min(0), live.max(0) + 1
    assert y1 - y0 == h or x1 - x0 == w
    assert abs((h - y1) - y0) <= 1 and abs((w - x1) - x0) <= 1
    g = s // p
    R, C = out["feature_shape"]
    # (an extreme aspect ratio can unpad to zero rows or columns, as LLaVA-NeXT's unpad_image does)
    assert 0 <= R <= rows * g and 0 <= C <= cols * g and (R == rows * g or C == cols * g)
    assert out["newline_tokens"][0] == R
    assert out["total_tokens"][0] == g * g + R * C + R
    assert out["tile_tokens"].sum() == g * g * (1 + rows * cols)


def test_divide_to_tiles_is_row_major():
    img = np.arange(4 * 6, dtype=np.float64).reshape(4, 6, 1)
    t = divide_to_tiles(img, 2)
    assert t.shape == (6, 2, 2, 1)
    np.testing.assert_array_equal(t[1, :, :, 0], [[2, 3], [8, 9]])
    np.testing.assert_array_equal(t[3, :, :, 0], [[12, 13], [18, 19]])


@pytest.mark.parametrize(
    "kwargs,exc,name",
    [
        ({"tile_size": 0}, ValueError, "tile_size"),
        ({"patch_size": 49}, ValueError, "patch_size"),
        ({"candidate_resolutions": np.array([[48, 50]])}, ValueError, "candidate_resolutions"),
        ({"candidate_resolutions": np.array([48, 48])}, ValueError, "candidate_resolutions"),
        ({"candidate_resolutions": np.array([[48.0, 48.0]])}, TypeError, "candidate_resolutions"),
        ({"image": np.ones((48, 48))}, ValueError, "image"),
    ],
)
def test_bad_input_is_named(kwargs, exc, name):
    args = {"image": np.ones((48, 96, 3), np.float32), "candidate_resolutions": anyres_pinpoints(48, (2, 2)),
            "tile_size": 48, "patch_size": 4, **kwargs}  # fmt: skip
    with pytest.raises(exc, match=name):
        anyres(**args)


# ------------------------------------------------------------------------------------------------------ the demo
def test_wide_scene_demo_tiles_two_scenes():
    image = wide_scene(0)
    assert image.shape == (48, 96, 3) and image.dtype == np.uint8
    d = demo(load(), seed=0)
    assert d["grid"] == (2, 1) and d["resolution"] == (96, 48)
    np.testing.assert_array_equal(d["tiles"][1], image[:, :48])
    np.testing.assert_array_equal(d["tiles"][2], image[:, 48:])
    assert d["tiles"].shape == (3, 48, 48, 3)
    assert d["counts"]["total"] == 144 + 12 * 24 + 12
    assert len(d["tokens"]) == 3 and all(t.shape == (144, 128) and np.isfinite(t).all() for t in d["tokens"])


def test_registered_not_model_level():
    t = registry.get("tokens.anyres")
    assert not t.model_level and callable(t.extra["demo"])
