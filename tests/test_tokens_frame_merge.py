"""Tests of mllm_ref.tokens.frame_merge (temporal merging across adjacent frames) and the synthetic clips."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mllm_ref.oracle import registry
from mllm_ref.tinyvlm import video, world
from mllm_ref.tinyvlm.model import load
from mllm_ref.tokens._common import keep_count
from mllm_ref.tokens.frame_merge import DEFAULT_THRESHOLD, clip_demo, frame_merge

PROPS = settings(max_examples=30, deadline=None)


@st.composite
def clips(draw):
    f, n, c = draw(st.integers(1, 5)), draw(st.integers(1, 6)), draw(st.integers(1, 4))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    x = draw(hnp.arrays(dtype, (f, n, c), elements=st.floats(-4, 4, width=32)))
    # make some tokens repeat the previous frame's token (with a small change) so that merges happen
    repeat = draw(hnp.arrays(bool, (f, n)))
    for i in range(1, f):
        x[i, repeat[i]] = x[i - 1, repeat[i]] * dtype(1.5)
    return x


def _check_structure(x, out):
    f, n, c = x.shape
    k = out["tokens"].shape[0]
    src, size, kept = out["source"], out["size"], out["kept"]
    assert src.shape == (f, n) and size.shape == (k,) and kept.shape == (k,) and out["tokens"].dtype == x.dtype
    np.testing.assert_array_equal(src[0], np.arange(n))  # the first frame is kept whole
    assert np.all(np.diff(kept) > 0)  # kept tokens in (frame, patch) order
    np.testing.assert_array_equal(src.reshape(-1)[kept], np.arange(k))  # each kept token carries its first token
    np.testing.assert_array_equal(np.bincount(src.reshape(-1), minlength=k), size)
    assert size.sum() == f * n
    # a merged token joins the previous frame's token at the same place
    for i in range(1, f):
        merged = ~np.isin(np.arange(n) + i * n, kept)
        np.testing.assert_array_equal(src[i][merged], src[i - 1][merged])
    # the size-weighted sum of the tokens is preserved
    total = (out["tokens"].astype(np.float64) * size[:, None]).sum(0)
    np.testing.assert_allclose(total, x.astype(np.float64).reshape(-1, c).sum(0), rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------------------------ hand examples
def test_static_patch_becomes_one_token():
    a, b = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    x = np.stack([np.stack([a, b]), np.stack([2 * a, -b]), np.stack([3 * a, b])])  # patch 0 static, 1 flips
    out = frame_merge(x, threshold=0.9)
    assert out["source"].tolist() == [[0, 1], [0, 2], [0, 3]]
    assert out["kept"].tolist() == [0, 1, 3, 5] and out["size"].tolist() == [3, 1, 1, 1]
    np.testing.assert_allclose(out["tokens"][0], 2 * a)  # the mean of a, 2a, 3a
    np.testing.assert_allclose(out["similarity"], [[1.0, -1.0], [1.0, -1.0]])


def test_chain_compares_with_the_previous_frame_not_the_first():
    """A token drifting by 20 degrees a frame stays above tau = 0.9 step by step (cos 20 = 0.94) though frame 3
    is 60 degrees from frame 0: the whole drift is one chain."""
    ang = np.deg2rad([0, 20, 40, 60])
    x = np.stack([np.cos(ang), np.sin(ang)], axis=-1)[:, None, :]
    out = frame_merge(x, threshold=0.9)
    assert out["size"].tolist() == [4] and out["source"].ravel().tolist() == [0, 0, 0, 0]


def test_ratio_mode_merges_the_most_similar():
    x = np.array([[[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.1], [1.0, 0.5]], [[1.0, 0.3], [0.0, 1.0]]])
    # similarities: (1, 0) 0.995, (1, 1) 0.894, (2, 0) 0.981, (2, 1) 0.447: keep 4 of 6 -> merge the two best
    out = frame_merge(x, keep_ratio=4 / 6)
    assert out["kept"].tolist() == [0, 1, 3, 5]
    assert out["source"].tolist() == [[0, 1], [0, 2], [0, 3]]


# --------------------------------------------------------------------------------------------------- properties
@PROPS
@given(x=clips(), tau=st.floats(-1, 1))
def test_threshold_mode_invariants(x, tau):
    out = frame_merge(x, threshold=tau)
    _check_structure(x, out)
    merged = np.zeros(x.shape[:2], dtype=bool)
    merged.reshape(-1)[:] = True
    merged.reshape(-1)[out["kept"]] = False
    np.testing.assert_array_equal(merged[1:], out["similarity"] > x.dtype.type(tau))
    # the similarity is the cosine of each token with the same place in the previous frame (computed here anew)
    a, b = x[1:].astype(np.float64), x[:-1].astype(np.float64)
    na = np.maximum(np.linalg.norm(a, axis=-1), np.finfo(np.float64).tiny)
    nb = np.maximum(np.linalg.norm(b, axis=-1), np.finfo(np.float64).tiny)
    cos = np.sum((a / na[..., None]) * (b / nb[..., None]), axis=-1)  # a zero token has similarity 0
    np.testing.assert_allclose(out["similarity"], cos, rtol=0, atol=1e-5 if x.dtype == np.float32 else 1e-12)


@PROPS
@given(x=clips(), ratio=st.floats(0, 1))
def test_ratio_mode_keeps_exactly_the_count(x, ratio):
    out = frame_merge(x, keep_ratio=ratio)
    _check_structure(x, out)
    f, n, _ = x.shape
    assert out["tokens"].shape[0] == max(n, keep_count(f * n, ratio))


@PROPS
@given(x=clips())
def test_identity_at_ratio_one_and_tau_one(x):
    for out in (frame_merge(x, keep_ratio=1.0), frame_merge(x, threshold=1.0)):
        np.testing.assert_array_equal(out["tokens"], x.reshape(-1, x.shape[-1]))
        assert np.all(out["size"] == 1)


@PROPS
@given(x=clips(), seed=st.integers(0, 1000))
def test_equivariant_to_a_permutation_of_patches(x, seed):
    perm = np.random.default_rng(seed).permutation(x.shape[1])
    a, b = frame_merge(x), frame_merge(x[:, perm])
    merged_a = a["source"][1:] == a["source"][:-1]
    merged_b = b["source"][1:] == b["source"][:-1]
    np.testing.assert_array_equal(merged_a[:, perm], merged_b)
    np.testing.assert_array_equal(np.sort(a["size"]), np.sort(b["size"]))


def test_bad_input_is_named():
    x = np.ones((2, 3, 4), dtype=np.float32)
    for kwargs, exc, name in [
        ({"threshold": 1.5}, ValueError, "threshold"),
        ({"threshold": "0.9"}, TypeError, "threshold"),
        ({"keep_ratio": -0.1}, ValueError, "keep_ratio"),
        ({"x": np.ones((3, 4), dtype=np.float32)}, ValueError, "x"),
    ]:
        with pytest.raises(exc, match=name):
            frame_merge(**{"x": x, **kwargs})


# ----------------------------------------------------------------------------------------------- clip and demo
def test_clip_is_seeded_and_moves_a_few_pixels():
    a, b = video.make_clip(3, 6), video.make_clip(3, 6)
    np.testing.assert_array_equal(a.frames, b.frames)
    assert a.frames.shape == (6, 48, 48, 3) and a.frames.dtype == np.uint8
    for s0, s1 in zip(a.scenes[:-1], a.scenes[1:]):
        for o0, o1 in zip(s0.objects, s1.objects):
            assert abs(o1.x - o0.x) <= 2.0 + 1e-9 and abs(o1.y - o0.y) <= 2.0 + 1e-9
            assert o1.radius + 1 <= o1.x <= world.IMAGE_SIZE - o1.radius - 1
    np.testing.assert_array_equal(a.frames[0], world.render(a.scenes[0]))
    assert not np.array_equal(video.make_clip(4, 2).frames, a.frames[:2])


def test_clip_demo_merges_the_static_background():
    d = clip_demo(load(), seed=0)
    assert d["total"] == 8 * 144 and d["kept_per_frame"][0] == 144
    assert d["kept_per_frame"].sum() == d["kept"] == d["size"].size
    assert d["kept"] < 0.5 * d["total"]  # most of each later frame is unchanged background
    static = d["frames"][1:].astype(int) - d["frames"][:-1].astype(int)
    assert np.any(static != 0)  # something does move


def test_registered_with_the_demo():
    t = registry.get("tokens.frame_merge")
    assert not t.model_level and t.extra["demo"] is clip_demo and DEFAULT_THRESHOLD == 0.9
