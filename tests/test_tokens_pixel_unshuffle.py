"""Tests of mllm_ref.tokens.pixel_unshuffle: space-to-depth in InternVL / Idefics3 channel order, and its inverse."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mllm_ref.oracle import registry
from mllm_ref.tokens.pixel_unshuffle import pixel_shuffle, pixel_unshuffle, torch_channel_order, unshuffle_source

PROPS = settings(max_examples=25, deadline=None)


@st.composite
def grids(draw):
    r = draw(st.integers(1, 4))
    lead = draw(st.lists(st.integers(1, 3), max_size=1))
    h, w = draw(st.integers(1, 4)) * r, draw(st.integers(1, 4)) * r
    c = draw(st.integers(1, 5))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    x = draw(hnp.arrays(dtype, (*lead, h, w, c), elements=st.floats(-100, 100, width=32)))
    return x, r


def test_hand_example_r2():
    """A 2 x 2 grid of 1-channel tokens a b / c d becomes one token [a, b, c, d] (row by row)."""
    x = np.array([[[1.0], [2.0]], [[3.0], [4.0]]])
    np.testing.assert_array_equal(pixel_unshuffle(x, 2), [[[1.0, 2.0, 3.0, 4.0]]])
    x2 = np.arange(8, dtype=np.float64).reshape(2, 2, 2)  # channels stay together: (dy, dx, c)
    np.testing.assert_array_equal(pixel_unshuffle(x2, 2)[0, 0], np.arange(8))


@PROPS
@given(grids())
def test_inverse_and_permutation(case):
    x, r = case
    y = pixel_unshuffle(x, r)
    h, w, c = x.shape[-3:]
    assert y.shape == (*x.shape[:-3], h // r, w // r, r * r * c) and y.dtype == x.dtype
    assert y.shape[-3] * y.shape[-2] * r * r == h * w  # token count / r^2
    np.testing.assert_array_equal(pixel_shuffle(y, r), x)  # exact inverse
    np.testing.assert_array_equal(np.sort(y, axis=None), np.sort(x, axis=None))  # a permutation of the elements
    # norm preserved (equal up to the order of the float64 summation)
    np.testing.assert_allclose(np.linalg.norm(y.astype(np.float64)), np.linalg.norm(x.astype(np.float64)), rtol=1e-12)


@PROPS
@given(grids())
def test_formula(case):
    x, r = case
    y = pixel_unshuffle(x, r)
    c = x.shape[-1]
    for a in range(y.shape[-3]):
        for b in range(y.shape[-2]):
            for dy in range(r):
                for dx in range(r):
                    k = (dy * r + dx) * c
                    np.testing.assert_array_equal(y[..., a, b, k : k + c], x[..., r * a + dy, r * b + dx, :])


def test_r1_is_the_identity():
    x = np.random.default_rng(0).standard_normal((3, 5, 2))
    np.testing.assert_array_equal(pixel_unshuffle(x, 1), x)


def _idefics3_order(x: np.ndarray, r: int) -> np.ndarray:
    """The view / permute sequence of Idefics3's (SmolVLM's) connector, re-expressed in NumPy on [h, w, C]."""
    h, w, c = x.shape
    t = x.reshape(h, w // r, c * r)
    t = t.transpose(1, 0, 2).reshape(w // r, h // r, c * r * r)
    return t.transpose(1, 0, 2)


@pytest.mark.parametrize("shape,r", [((4, 4, 3), 2), ((8, 8, 5), 4), ((12, 12, 2), 2)])
def test_matches_the_idefics3_rearrangement(shape, r):
    x = np.random.default_rng(1).standard_normal(shape)
    np.testing.assert_array_equal(pixel_unshuffle(x, r), _idefics3_order(x, r))


@pytest.mark.parametrize("shape,r", [((4, 6, 3), 2), ((8, 12, 5), 4), ((2, 6, 6, 2), 3)])
def test_matches_torch_up_to_a_channel_permutation(shape, r):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    t = torch.from_numpy(x.reshape(-1, *shape[-3:])).permute(0, 3, 1, 2)  # [B, C, H, W]
    want = torch.nn.functional.pixel_unshuffle(t, r).permute(0, 2, 3, 1).numpy()  # channels last
    want = want.reshape(*shape[:-3], *want.shape[1:])
    perm = torch_channel_order(shape[-1], r)
    np.testing.assert_array_equal(pixel_unshuffle(x, r), want[..., perm])
    back = torch.nn.functional.pixel_shuffle(torch.from_numpy(np.ascontiguousarray(want.reshape(-1, *want.shape[-3:])))
                                             .permute(0, 3, 1, 2), r).permute(0, 2, 3, 1).numpy()  # fmt: skip
    np.testing.assert_array_equal(back.reshape(shape), x)


def test_unshuffle_source_maps_windows():
    src = unshuffle_source((4, 6), 2)
    assert src.tolist() == [0, 0, 1, 1, 2, 2, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 3, 3, 4, 4, 5, 5]
    assert np.bincount(unshuffle_source((12, 12), 2)).tolist() == [4] * 36


@pytest.mark.parametrize(
    "fn,x,r,exc,name",
    [
        (pixel_unshuffle, np.ones((5, 4, 2)), 2, ValueError, "x"),
        (pixel_unshuffle, np.ones((4, 4, 2)), 0, ValueError, "r"),
        (pixel_unshuffle, np.ones((4, 4)), 2, ValueError, "x"),
        (pixel_unshuffle, np.ones((4, 4, 2)), 2.0, TypeError, "r"),
        (pixel_shuffle, np.ones((2, 2, 6)), 2, ValueError, "y"),
    ],
)
def test_bad_input_is_named(fn, x, r, exc, name):
    with pytest.raises(exc, match=name):
        fn(x, r)


def test_registered_not_model_level():
    t = registry.get("tokens.pixel_unshuffle")
    assert not t.model_level and "connector" in t.notes


@pytest.mark.parametrize("r", [1, 2])
def test_outputs_never_share_memory_with_the_input(r):
    x = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
    y = pixel_unshuffle(x, r)
    assert not np.shares_memory(y, x)
    z = pixel_shuffle(y, r)
    assert not np.shares_memory(z, y) and np.array_equal(z, x)
