"""Tests of mllm_ref.tokens.pool: LLaVA-OneVision's average / max / bilinear downsampling of the token grid."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mllm_ref.tinyvlm import tokenizer, world
from mllm_ref.tinyvlm.model import Trace, encode_tokens, prefill
from mllm_ref.tinyvlm.plugs import Plugs
from mllm_ref.tokens.pool import PoolPolicy, cell_map, interpolate_bilinear, make_policy, pool, pooled_grid

PROPS = settings(max_examples=30, deadline=None)


def _grids(min_side=1, max_side=9):
    @st.composite
    def draw(draw):
        shape = draw(hnp.array_shapes(min_dims=3, max_dims=4, min_side=min_side, max_side=max_side))
        dtype = draw(st.sampled_from([np.float32, np.float64]))
        return draw(hnp.arrays(dtype, shape, elements=st.floats(-10, 10, width=32)))

    return draw()


# ------------------------------------------------------------------------------------------------ hand examples
def test_average_and_max_by_hand():
    x = np.arange(16, dtype=np.float64).reshape(4, 4, 1)
    np.testing.assert_array_equal(pool(x, 2, "average")[..., 0], [[2.5, 4.5], [10.5, 12.5]])
    np.testing.assert_array_equal(pool(x, 2, "max")[..., 0], [[5, 7], [13, 15]])


def test_floor_mode_drops_the_remainder():
    """A 5 x 7 grid pools to 2 x 3 at stride 2: the last row and column are dropped, as avg_pool2d does."""
    x = np.random.default_rng(0).standard_normal((5, 7, 3))
    np.testing.assert_allclose(pool(x, 2), pool(x[:4, :6], 2), rtol=0, atol=0)
    assert pooled_grid((27, 27), 2, "average") == (13, 13)
    assert pooled_grid((27, 27), 2, "bilinear") == (14, 14)  # LLaVA-OneVision's 729 -> 196
    assert pool(x, 2, "bilinear").shape == (3, 4, 3)  # ceil


def test_bilinear_by_hand():
    """Upsampling 2 -> 4 with half-pixel centres: sources -0.25 (clamped to 0), 0.25, 0.75, 1.25 -> 1."""
    x = np.array([[0.0, 4.0]]).reshape(1, 2, 1)
    y = interpolate_bilinear(x, (1, 4))[0, :, 0]
    np.testing.assert_allclose(y, [0.0, 1.0, 3.0, 4.0])


def test_bilinear_halving_equals_average_pooling():
    """With align_corners=False, halving an even grid samples each 2 x 2 window's centre: its mean."""
    x = np.random.default_rng(1).standard_normal((12, 12, 5))
    np.testing.assert_allclose(interpolate_bilinear(x, (6, 6)), pool(x, 2, "average"), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------- properties
@PROPS
@given(x=_grids(), stride=st.integers(1, 4), mode=st.sampled_from(["average", "max", "bilinear"]))
def test_constant_grid_stays_constant_and_count_is_exact(x, stride, mode):
    h, w = x.shape[-3], x.shape[-2]
    if mode != "bilinear" and stride > min(h, w):
        return
    c = np.full_like(x, 0.0) + x.reshape(-1)[0]
    y = pool(c, stride, mode)
    oh, ow = pooled_grid((h, w), stride, mode)
    assert y.shape == (*x.shape[:-3], oh, ow, x.shape[-1]) and y.dtype == x.dtype
    np.testing.assert_allclose(y, x.reshape(-1)[0], rtol=1e-6, atol=1e-6)


@PROPS
@given(x=_grids(), stride=st.integers(1, 3))
def test_average_preserves_the_sum_of_the_pooled_region(x, stride):
    h, w = x.shape[-3], x.shape[-2]
    if stride > min(h, w):
        return
    oh, ow = h // stride, w // stride
    y = pool(x, stride, "average")
    region = x[..., : oh * stride, : ow * stride, :].astype(np.float64)
    np.testing.assert_allclose(
        y.astype(np.float64).sum(axis=(-3, -2)) * stride**2, region.sum(axis=(-3, -2)), rtol=1e-5, atol=1e-3
    )
    assert np.all(pool(x, stride, "max") >= y - 1e-5)


@PROPS
@given(x=_grids(), oh=st.integers(1, 12), ow=st.integers(1, 12))
def test_bilinear_is_a_convex_combination(x, oh, ow):
    y = interpolate_bilinear(x, (oh, ow)).astype(np.float64)
    lo = x.min(axis=(-3, -2), keepdims=True).astype(np.float64)
    hi = x.max(axis=(-3, -2), keepdims=True).astype(np.float64)
    assert np.all(y >= lo - 1e-5) and np.all(y <= hi + 1e-5)
    same = interpolate_bilinear(x, x.shape[-3:-1])
    np.testing.assert_array_equal(same, x)  # the identity at the same size, bit for bit


@PROPS
@given(h=st.integers(1, 13), w=st.integers(1, 13), stride=st.integers(1, 4))
def test_cell_map_partitions_the_kept_patches(h, w, stride):
    if stride <= min(h, w):
        out = pooled_grid((h, w), stride, "average")
        source, size = cell_map((h, w), out, "average", stride)
        assert size.sum() == out[0] * out[1] * stride**2 == (source >= 0).sum()
        assert np.all(size == stride**2)
        x = np.random.default_rng(h * 100 + w).standard_normal((h, w, 2))
        y = pool(x, stride).reshape(-1, 2)
        flat = x.reshape(-1, 2)
        for cell in range(y.shape[0]):
            np.testing.assert_allclose(y[cell], flat[source == cell].mean(0), rtol=1e-12, atol=1e-12)
    out = pooled_grid((h, w), stride, "bilinear")
    source, size = cell_map((h, w), out, "bilinear")
    assert np.all(source >= 0) and size.sum() == h * w and np.all(size >= 1)


# ------------------------------------------------------------------------------------------------- against torch
@pytest.mark.parametrize(
    "shape,size", [((12, 12, 5), (6, 6)), ((27, 27, 3), (14, 14)), ((7, 9, 4), (5, 3)), ((4, 5, 2), (9, 11))]
)
def test_bilinear_matches_torch(shape, size):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    t = torch.from_numpy(x).permute(2, 0, 1)[None]
    want = torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    # torch computes the scale in float32, hence a few ulps of difference in the source coordinate
    np.testing.assert_allclose(interpolate_bilinear(x, size), want.numpy(), rtol=0, atol=2e-5)


@pytest.mark.parametrize("shape,stride", [((12, 12, 4), 2), ((7, 9, 3), 2), ((10, 8, 2), 3)])
def test_average_and_max_match_torch(shape, stride):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    t = torch.from_numpy(x).permute(2, 0, 1)[None]
    avg = torch.nn.functional.avg_pool2d(t, stride)[0].permute(1, 2, 0).numpy()
    mx = torch.nn.functional.max_pool2d(t, stride)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(pool(x, stride, "average"), avg, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(pool(x, stride, "max"), mx)


# --------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs,exc,name",
    [
        ({"stride": 0}, ValueError, "stride"),
        ({"stride": 2.0}, TypeError, "stride"),
        ({"mode": "mean"}, ValueError, "mode"),
        ({"size": (3, 3)}, ValueError, "size"),  # size with the average mode
        ({"mode": "bilinear", "size": (0, 3)}, ValueError, "size"),
        ({"mode": "bilinear", "size": 9}, TypeError, "size"),
        ({"stride": 13}, ValueError, "stride"),
    ],
)
def test_bad_arguments_are_named(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        pool(np.ones((12, 12, 2), dtype=np.float32), **kwargs)


# --------------------------------------------------------------------------------------------------- tiny VLM
@pytest.fixture(scope="module")
def example():
    return world.vqa_set(world.EVAL_SEED, 1)[0]


def test_policy_pools_the_connector_outputs(model, example):
    ids = np.array(tokenizer.prompt_ids(example.qa.question))
    tokens, view, _ = encode_tokens(model, example.image)
    out = PoolPolicy().after_connector(tokens, ids, view)
    np.testing.assert_allclose(out.x, pool(tokens.x.reshape(12, 12, -1), 2).reshape(36, -1), rtol=1e-6, atol=1e-6)
    assert out.n == 36 and np.all(out.size == 4) and out.x.dtype == np.float32
    rows, cols = np.divmod(np.arange(144), 12)
    np.testing.assert_array_equal(out.source, (rows // 2) * 6 + cols // 2)


def test_prefill_with_the_default_policy(model, example):
    ids = tokenizer.prompt_ids(example.qa.question)
    trace = Trace()
    logits, _ = prefill(model, example.image, ids, Plugs(token_policy=PoolPolicy()), trace)
    assert trace.n_visual == 36 and trace.layer_tokens[0] == 36 + len(ids)
    assert np.isfinite(logits).all()
    assert sorted(set(trace.source.tolist())) == list(range(36))


def test_make_policy_maps_the_ratio_and_is_the_identity_at_one(model, example):
    assert make_policy(0.25).size == (6, 6)
    assert make_policy(0.1).size == (4, 4)
    assert make_policy(0.5).size == (8, 8)
    ids = tokenizer.prompt_ids(example.qa.question)
    plain, _ = prefill(model, example.image, ids)
    same, _ = prefill(model, example.image, ids, Plugs(token_policy=make_policy(1.0)))
    np.testing.assert_array_equal(plain, same)
    assert make_policy(0.0).size == (1, 1)
    with pytest.raises(ValueError, match="keep_ratio"):
        make_policy(-0.1)


def test_policy_refuses_tokens_already_reduced(model, example):
    tokens, view, _ = encode_tokens(model, example.image)
    with pytest.raises(ValueError, match="untouched"):
        PoolPolicy().after_connector(tokens.take(np.arange(100)), np.zeros(0, dtype=np.int64), view)
