"""M-RoPE (connectors.mrope): parity of the position ids, the multimodal rotation and the ViT 2-D RoPE with
Hugging Face transformers' Qwen2-VL (no download: the methods are called on minimal configs), and the properties
the paper states (text is 1-D RoPE, a block spans its grid, text resumes at max + 1). The generic registry tests
(tests/test_registry_properties.py, tests/test_bad_input.py) cover purity, conditioning and bad input."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mllm_ref.connectors.mrope import (
    _IMG,
    _VID,
    _layout,
    apply_mrope,
    mrope,
    rope_index,
    vision_position_ids,
    vision_rope_2d,
)
from mllm_ref.nn.rope import rope
from mllm_ref.oracle import registry

TOK = {"image_token_id": _IMG, "video_token_id": _VID}


def _index(segments, pad=0):
    ids, img, vid = _layout(segments)
    mask = None
    if pad:
        ids = np.concatenate([np.zeros(pad, dtype=np.int64), ids])
        mask = (np.arange(ids.shape[0]) >= pad).astype(np.int64)
    return ids, img, vid, mask


LAYOUTS = {
    "text_only": ([("text", 11)], 0),
    "one_image": ([("text", 3), ("image", (1, 4, 6)), ("text", 4)], 0),
    "image_first": ([("image", (1, 4, 6)), ("text", 2)], 0),
    "two_images": ([("text", 2), ("image", (1, 4, 6)), ("text", 1), ("image", (1, 8, 2)), ("text", 3)], 0),
    "video": ([("text", 2), ("video", (2, 4, 4)), ("text", 3)], 0),
    "image_and_video": ([("text", 1), ("video", (2, 4, 4)), ("image", (1, 2, 6)), ("text", 2)], 0),
    "left_padding": ([("text", 2), ("image", (1, 4, 6)), ("text", 2)], 3),
    "padding_video": ([("video", (3, 6, 4)), ("text", 2)], 2),
}


# ------------------------------------------------------------------------------------- parity with transformers
def _hf_rope_index(ids, img, vid, mask, m=2):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    # get_rope_index reads only config.vision_config.spatial_merge_size and get_vision_position_ids (which does
    # not use self): a namespace stands in for the model, so nothing is built or downloaded.
    fake = SimpleNamespace(
        config=SimpleNamespace(vision_config=SimpleNamespace(spatial_merge_size=m)),
        get_vision_position_ids=lambda *a, **k: Qwen2VLModel.get_vision_position_ids(None, *a, **k),
    )
    types = np.where(ids == _IMG, 1, np.where(ids == _VID, 2, 0))
    t = lambda a: None if a is None else torch.tensor(a)  # noqa: E731
    pos, delta = Qwen2VLModel.get_rope_index(
        fake,
        torch.tensor(ids)[None],
        torch.tensor(types)[None],
        image_grid_thw=t(img),
        video_grid_thw=t(vid),
        attention_mask=None if mask is None else torch.tensor(mask)[None],
    )
    return pos[:, 0].numpy(), int(delta[0, 0])


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_rope_index_equals_transformers(name):
    segments, pad = LAYOUTS[name]
    ids, img, vid, mask = _index(segments, pad)
    pos, delta = rope_index(ids, img, vid, mask, **TOK)
    want_pos, want_delta = _hf_rope_index(ids, img, vid, mask)
    assert pos.dtype == np.int64 and pos.shape == (3, ids.shape[0])
    np.testing.assert_array_equal(pos, want_pos)
    assert int(delta) == want_delta


def test_rope_index_pinned_example():
    """Hand-computed: 3 text tokens, an image of 1 x 4 x 6 patches (m = 2: a 2 x 3 merged grid), 2 text tokens."""
    ids = np.array([1, 2, 3] + [_IMG] * 6 + [4, 5])
    pos, delta = rope_index(ids, np.array([[1, 4, 6]]), **TOK)
    np.testing.assert_array_equal(
        pos,
        [[0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7], [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7], [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7]],
    )
    assert int(delta) == 8 - 11


@st.composite
def layouts(draw, max_t=2):
    grids = st.tuples(st.integers(1, max_t), st.sampled_from([2, 4, 6, 8]), st.sampled_from([2, 4, 6]))
    seg = st.one_of(
        st.tuples(st.just("text"), st.integers(1, 5)),
        st.tuples(st.just("image"), grids.map(lambda g: (1, g[1], g[2]))),
        st.tuples(st.just("video"), grids),
    )
    return draw(st.lists(seg, min_size=1, max_size=6)), draw(st.integers(0, 3))


@given(layouts())
def test_rope_index_equals_transformers_on_drawn_layouts(layout):
    # Videos with T <= max(H, W)/m: there transformers 5.23 agrees with the paper's max + 1 rule.
    segments, pad = layout
    segments = [(k, v) for k, v in segments if k != "video" or v[0] <= max(v[1], v[2]) // 2]
    if not segments:
        return
    ids, img, vid, mask = _index(segments, pad)
    pos, delta = rope_index(ids, img, vid, mask, **TOK)
    want_pos, want_delta = _hf_rope_index(ids, img, vid, mask)
    np.testing.assert_array_equal(pos, want_pos)
    assert int(delta) == want_delta


def test_long_video_follows_the_paper_rule_not_transformers_5():
    """A video of 6 frames on a 2 x 2 merged grid: the text after it starts at max + 1 = s + 6 (paper, HF 4.5x);
    transformers 5.23 would start it at s + max(H, W)/m = s + 2 (documented deviation)."""
    ids, img, vid, _ = _index([("text", 1), ("video", (6, 4, 4)), ("text", 2)])
    pos, delta = rope_index(ids, img, vid, **TOK)
    # text 0, vision start 1, video block from 2: t ids 2..7 -> vision end at 8, text 9, 10
    np.testing.assert_array_equal(pos[:, -3:], np.broadcast_to([8, 9, 10], (3, 3)))
    assert pos[0, 2:26].max() == 7 and int(delta) == 11 - ids.shape[0]


def _hf_rotate(x, position_ids, sec, theta):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import Qwen2VLTextConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding, apply_rotary_pos_emb

    h, _, d = x.shape
    config = Qwen2VLTextConfig(
        hidden_size=h * d,
        num_attention_heads=h,
        rope_parameters={"rope_type": "default", "rope_theta": theta, "mrope_section": list(sec)},
    )
    xt = torch.tensor(x)[None]  # [1, H, T, d]
    cos, sin = Qwen2VLRotaryEmbedding(config)(xt, torch.tensor(position_ids)[:, None])
    q, _ = apply_rotary_pos_emb(xt, xt, cos, sin)
    return q[0].numpy()


@pytest.mark.parametrize("name", ["one_image", "two_images", "image_and_video", "left_padding"])
@pytest.mark.parametrize("sec", [(16, 24, 24), (2, 3, 3)])
def test_rotation_equals_transformers(name, sec):
    segments, pad = LAYOUTS[name]
    ids, img, vid, mask = _index(segments, pad)
    pos, _ = rope_index(ids, img, vid, mask, **TOK)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, ids.shape[0], 2 * sum(sec))).astype(np.float32)
    got = apply_mrope(x, pos, sec, theta=1e6)
    want = _hf_rotate(x, pos, sec, 1e6)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())  # float32 angles in HF
    # and the sections matter: swapping the height and width rows changes the image tokens
    swapped = apply_mrope(x, pos[[0, 2, 1]], sec, theta=1e6)
    assert not np.allclose(swapped, got, atol=1e-3)


def test_vision_ids_equal_transformers():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers.vision_utils import get_vision_position_ids

    grid = np.array([[1, 4, 6], [2, 4, 4], [1, 8, 2]])
    got = vision_position_ids(grid, 2)
    want = get_vision_position_ids(torch.tensor(grid), 2).numpy()
    np.testing.assert_array_equal(got, want)
    # the first merge window of the first image: rows (0, 0, 1, 1), columns (0, 1, 0, 1)
    np.testing.assert_array_equal(got[:4], [[0, 0], [0, 1], [1, 0], [1, 1]])


@pytest.mark.parametrize("d", [16, 80])
def test_vision_rotation_equals_transformers(d):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import (
        Qwen2VLVisionRotaryEmbedding,
        apply_rotary_pos_emb_vision,
    )
    from transformers.vision_utils import get_vision_position_ids

    grid = np.array([[1, 4, 6], [2, 6, 4]])
    n, heads = int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum()), 3
    x = np.random.default_rng(1).standard_normal((heads, n, d)).astype(np.float32)
    got = vision_rope_2d(x, grid, 2)
    config = Qwen2VLVisionConfig(embed_dim=heads * d, num_heads=heads)
    xt = torch.tensor(x).transpose(0, 1)  # HF's ViT layout [N, heads, d]
    cos, sin = Qwen2VLVisionRotaryEmbedding(config)(xt, get_vision_position_ids(torch.tensor(grid), 2))
    want, _ = apply_rotary_pos_emb_vision(xt, xt, cos, sin)
    want = want.transpose(0, 1).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


# --------------------------------------------------------------------------------------------------- properties
@given(layouts(max_t=4))
def test_text_runs_step_by_one_and_blocks_span_their_grid(layout):
    segments, pad = layout
    ids, img, vid, mask = _index(segments, pad)
    pos, delta = rope_index(ids, img, vid, mask, **TOK)
    live = pos[:, mask == 1] if mask is not None else pos
    if mask is not None:
        assert (pos[:, mask == 0] == 0).all()
    toks = ids[mask == 1] if mask is not None else ids
    kind = np.where(toks == _IMG, 1, np.where(toks == _VID, 2, 0))
    grids = {1: iter([] if img is None else img), 2: iter([] if vid is None else vid)}
    i, prev_max = 0, -1
    while i < toks.shape[0]:
        j = i
        while j < toks.shape[0] and kind[j] == kind[i]:
            j += 1
        block = live[:, i:j]
        assert block.min() == prev_max + 1  # every run starts right after the largest id so far
        if kind[i] == 0:
            assert (block[0] == block[1]).all() and (block[1] == block[2]).all()  # text: three equal rows
            assert (np.diff(block[0]) == 1).all()  # strictly increasing by one
        else:
            t, h, w = next(grids[kind[i]])
            s = prev_max + 1
            # the block covers exactly its merged grid, each (t, h, w) once
            assert j - i == t * (h // 2) * (w // 2)
            assert sorted(map(tuple, (block - s).T)) == [
                (a, b, c) for a in range(t) for b in range(h // 2) for c in range(w // 2)
            ]
        prev_max = int(block.max())
        i = j
    assert int(delta) == prev_max + 1 - toks.shape[0]


def test_text_only_is_one_dimensional_rope():
    ids = np.arange(20, 33)
    pos, delta = rope_index(ids, **TOK)
    np.testing.assert_array_equal(pos, np.broadcast_to(np.arange(13), (3, 13)))
    assert int(delta) == 0
    x = np.random.default_rng(2).standard_normal((2, 13, 16)).astype(np.float32)
    np.testing.assert_array_equal(apply_mrope(x, pos, (2, 3, 3), 1e4), rope(x, np.arange(13), 1e4))
    rotated, pos2, _ = mrope(x, ids, **TOK, mrope_section=(2, 3, 3), theta=1e4)
    np.testing.assert_array_equal(rotated, rope(x, np.arange(13), 1e4))
    np.testing.assert_array_equal(pos2, pos)


def test_left_padding_shifts_nothing_but_the_slots():
    segments, _ = LAYOUTS["one_image"]
    ids, img, vid, _ = _index(segments)
    pos, delta = rope_index(ids, img, vid, **TOK)
    ids_p, _, _, mask = _index(segments, pad=4)
    pos_p, delta_p = rope_index(ids_p, img, vid, mask, **TOK)
    np.testing.assert_array_equal(pos_p[:, 4:], pos)
    assert (pos_p[:, :4] == 0).all() and int(delta_p) == int(delta)
    bool_mask = mask.astype(bool)
    np.testing.assert_array_equal(rope_index(ids_p, img, vid, bool_mask, **TOK)[0], pos_p)


def test_relative_positions_within_an_image_are_what_attention_sees():
    """Two image tokens in the same merged row: their rotated dot product depends only on the column offset."""
    ids, img, vid, _ = _index([("text", 2), ("image", (1, 4, 8)), ("text", 1)])
    pos, _ = rope_index(ids, img, vid, **TOK)
    rng = np.random.default_rng(3)
    q, k = rng.standard_normal((2, 1, 1, 16))
    first = 3  # text 0, 1, vision start 2, image tokens from 3 (row 0: 3..6, row 1: 7..10)
    xs = np.broadcast_to(q, (1, ids.shape[0], 16))
    ks = np.broadcast_to(k, (1, ids.shape[0], 16))
    rq, rk = apply_mrope(xs, pos, (2, 3, 3), 1e4)[0], apply_mrope(ks, pos, (2, 3, 3), 1e4)[0]
    a = rq[first + 1] @ rk[first + 0]  # row 0, columns 1 and 0
    b = rq[first + 5] @ rk[first + 4]  # row 1, columns 1 and 0
    c = rq[first + 4] @ rk[first + 0]  # same column, rows 1 and 0
    np.testing.assert_allclose(a, b, rtol=1e-12)
    assert abs(a - c) > 1e-6


def test_registered_technique_runs_its_cases():
    t = registry.get("connectors.mrope")
    for size, kw in t.cases("test"):
        rotated, pos, delta = t.reference(**kw)
        assert rotated.shape == kw["x"].shape and rotated.dtype == kw["x"].dtype, size
        assert pos.shape == (3, kw["input_ids"].shape[0]) and pos.dtype == np.int64, size
        assert delta.dtype == np.int64 and delta.shape == (), size
        # the norm of every rotated pair is kept
        half = kw["x"].shape[-1] // 2
        n_in = kw["x"][..., :half] ** 2 + kw["x"][..., half:] ** 2
        n_out = rotated[..., :half] ** 2 + rotated[..., half:] ** 2
        np.testing.assert_allclose(n_out, n_in, rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------------------------------- bad input
def _bad(fn, exc, match, *args, **kwargs):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


def test_bad_input_is_rejected():
    ids, img, vid, _ = _index([("text", 2), ("image", (1, 4, 6)), ("text", 1)])
    _bad(rope_index, ValueError, "image_grid_thw has 0 rows", ids, None, **TOK)
    _bad(rope_index, ValueError, "needs 4 placeholder tokens .* has 6", ids, np.array([[1, 4, 4]]), **TOK)
    _bad(rope_index, ValueError, "divisible by spatial_merge_size", ids, np.array([[1, 3, 8]]), **TOK)
    _bad(rope_index, ValueError, "shape \\[n, 3\\]", ids, np.array([[1, 4, 6, 1]]), **TOK)
    _bad(rope_index, ValueError, "video_grid_thw has 1 rows", ids, img, np.array([[1, 2, 2]]), **TOK)
    _bad(rope_index, ValueError, "image_grid_thw must be >= 1", ids, np.array([[0, 4, 6]]), **TOK)
    _bad(rope_index, TypeError, "image_grid_thw", ids, img.astype(np.float64), **TOK)
    _bad(rope_index, ValueError, "input_ids must be >= 0", np.array([-1, 2]), **TOK)
    _bad(rope_index, ValueError, "attention_mask must be <= 1", ids, img, None, np.full(ids.shape, 2), **TOK)
    _bad(rope_index, ValueError, "attention_mask must have one entry", ids, img, None, np.ones(3, int), **TOK)
    _bad(rope_index, ValueError, "keep at least one", ids, img, None, np.zeros(ids.shape, int), **TOK)
    _bad(rope_index, ValueError, "must differ", ids, img, image_token_id=_IMG, video_token_id=_IMG)
    _bad(rope_index, ValueError, "input_ids must not be empty", np.zeros(0, np.int64), **TOK)
    pos, _ = rope_index(ids, img, **TOK)
    x = np.zeros((2, ids.shape[0], 16), np.float32)
    _bad(apply_mrope, ValueError, "mrope_section must sum", x, pos, (16, 24, 24))
    _bad(apply_mrope, ValueError, "mrope_section must have 3", x, pos, (4, 4))
    _bad(apply_mrope, TypeError, "mrope_section", x, pos, 8)
    _bad(apply_mrope, ValueError, "position_ids must have shape", x, pos[:2], (2, 3, 3))
    _bad(apply_mrope, ValueError, "position_ids must be >= 0", x, -pos - 1, (2, 3, 3))
    _bad(apply_mrope, ValueError, "x: the head dimension", x[..., :15], pos, (2, 3, 3))
    _bad(apply_mrope, ValueError, "x contains NaN", np.full_like(x, np.nan), pos, (2, 3, 3))
    _bad(apply_mrope, ValueError, "theta", x, pos, (2, 3, 3), -1.0)
    _bad(mrope, ValueError, "input_ids has", x[:, :-1], ids, img, **TOK, mrope_section=(2, 3, 3))
    _bad(vision_position_ids, ValueError, "grid_thw", np.array([[1, 3, 4]]), 2)
    _bad(vision_position_ids, ValueError, "grid_thw must have at least one row", np.zeros((0, 3), np.int64), 2)
    _bad(vision_rope_2d, ValueError, "divisible by 4", np.zeros((1, 4, 6), np.float32), np.array([[1, 2, 2]]))
    _bad(vision_rope_2d, ValueError, "grid_thw describes 4", np.zeros((1, 5, 8), np.float32), np.array([[1, 2, 2]]))
