"""MobileVLM LDP / LDPv2 (connectors.ldp): output grid sizes, the building blocks' linearity and translation
equivariance, locality of v2, the per-token feature transformation, and a cross-check against torch.nn modules
built with the official parameter names (loaded with ``strict=True``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mllm_ref.connectors.ldp import (
    adaptive_avg_pool,
    depthwise_conv3x3,
    hardsigmoid,
    hardswish,
    ldp_projector,
    make_divisible,
    random_weights,
    weight_shapes,
)
from mllm_ref.connectors.mlp import mlp_projector


def _case(version, g, d_vis=6, d=8, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((g * g, d_vis)).astype(dtype)
    return x, random_weights(version, d_vis, d, rng, dtype)


# ------------------------------------------------------------------------------------------------ output sizes
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("g", [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 24])
def test_output_grid_is_ceil_half(version, g):
    x, w = _case(version, g, d_vis=4, d=8)
    y = ldp_projector(x, w, version=version)
    m = math.ceil(g / 2)
    assert y.shape == (m * m, 8) and y.dtype == np.float64
    assert np.isfinite(y).all()


@pytest.mark.parametrize("g", [12, 13, 16, 24, 25])
def test_v2_official_fixed_pool_grid(g):
    x, w = _case(2, g, d_vis=3, d=8)
    assert ldp_projector(x, w, version=2, pool_grid=12).shape == (144, 8)


def test_24x24_gives_144_tokens_75_percent_fewer():
    for version in (1, 2):
        x, w = _case(version, 24, d_vis=4, d=8, dtype=np.float32)
        y = ldp_projector(x, w, version=version)
        assert y.shape == (144, 8) and y.dtype == np.float32 and y.shape[0] == 576 // 4


# ------------------------------------------------------------------------------------------------ building blocks
@st.composite
def grids(draw):
    h, w, c = draw(st.integers(1, 9)), draw(st.integers(1, 9)), draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return rng.standard_normal((h, w, c)), rng.standard_normal((c, 1, 3, 3)), rng


@given(grids(), st.sampled_from([1, 2]))
def test_depthwise_conv_is_linear(case, stride):
    x, k, rng = case
    x2 = rng.standard_normal(x.shape)
    a, b = 1.7, -0.6
    lhs = depthwise_conv3x3(a * x + b * x2, k, None, stride)
    rhs = a * depthwise_conv3x3(x, k, None, stride) + b * depthwise_conv3x3(x2, k, None, stride)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-12, atol=1e-12)
    assert lhs.shape[:2] == ((x.shape[0] - 1) // stride + 1, (x.shape[1] - 1) // stride + 1)


@given(st.integers(0, 2**32 - 1), st.sampled_from([1, 2]), st.integers(-2, 2), st.integers(-2, 2))
def test_depthwise_conv_is_translation_equivariant_away_from_borders(seed, stride, sy, sx):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((14, 14, 3))
    k = rng.standard_normal((3, 1, 3, 3))
    dy, dx = stride * sy, stride * sx  # a shift of s * t input positions moves a stride-s output by t
    shifted = np.roll(x, (dy, dx), axis=(0, 1))
    y, ys = depthwise_conv3x3(x, k, None, stride), depthwise_conv3x3(shifted, k, None, stride)
    # output i reads input rows s i - 1 .. s i + 1; the shifted output i + t reads shifted rows s i + dy - 1 ..
    # s i + dy + 1, which are the same input rows when neither window touches the padding (nor the roll's wrap)
    def inside(i, d):
        return 1 <= stride * i + d and stride * i + d + 1 <= 13

    rows = [i for i in range(y.shape[0]) if inside(i, 0) and inside(i, dy) and 0 <= i + sy < y.shape[0]]
    cols = [j for j in range(y.shape[1]) if inside(j, 0) and inside(j, dx) and 0 <= j + sx < y.shape[1]]
    assert rows and cols
    for i in rows:
        for j in cols:
            np.testing.assert_allclose(ys[i + sy, j + sx], y[i, j], rtol=1e-12, atol=1e-12)
    assert (sy, sx) == (0, 0) or not np.allclose(ys, y)  # the shift did move something


def test_depthwise_conv_hand_example():
    x = np.arange(16.0).reshape(4, 4, 1)
    k = np.zeros((1, 1, 3, 3))
    k[0, 0, 1, 1], k[0, 0, 0, 0] = 2.0, 1.0  # 2 * centre + top-left neighbour
    y = depthwise_conv3x3(x, k, np.array([0.5]), 1)[..., 0]
    want = 2 * x[..., 0] + 0.5
    want[1:, 1:] += x[:-1, :-1, 0]
    np.testing.assert_array_equal(y, want)
    y2 = depthwise_conv3x3(x, k, None, 2)[..., 0]  # outputs at input (0,0), (0,2), (2,0), (2,2)
    np.testing.assert_array_equal(y2, [[0.0, 4.0], [16.0, 20.0 + 5.0]])  # top-left is padding on the border


@given(grids())
def test_adaptive_pool_is_linear_and_keeps_constants(case):
    x, _, rng = case
    m = int(rng.integers(1, min(x.shape[:2]) + 1))
    x2 = rng.standard_normal(x.shape)
    np.testing.assert_allclose(adaptive_avg_pool(x - 2 * x2, m), adaptive_avg_pool(x, m) - 2 * adaptive_avg_pool(x2, m),
                               rtol=1e-12, atol=1e-12)  # fmt: skip
    const = np.full(x.shape, 3.25)
    np.testing.assert_allclose(adaptive_avg_pool(const, m), 3.25, rtol=1e-15)
    sq = x[: min(x.shape[:2]), : min(x.shape[:2])]
    np.testing.assert_array_equal(adaptive_avg_pool(sq, sq.shape[0]), sq)  # windows of one token: the identity


def test_adaptive_pool_even_grid_is_2x2_mean():
    x = np.random.default_rng(1).standard_normal((8, 8, 2))
    want = x.reshape(4, 2, 4, 2, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(adaptive_avg_pool(x, 4), want, rtol=1e-14)


def test_adaptive_pool_odd_windows_overlap():
    x = np.arange(5.0)[:, None, None] * np.ones((5, 5, 1))  # value = row index
    y = adaptive_avg_pool(x, 3)[:, 0, 0]  # row windows [0,2), [1,4), [3,5)
    np.testing.assert_allclose(y, [0.5, 2.0, 3.5])


def test_hard_activations_and_make_divisible():
    z = np.array([-4.0, -3.0, -1.5, 0.0, 1.5, 3.0, 4.0])
    np.testing.assert_allclose(hardsigmoid(z), [0, 0, 0.25, 0.5, 0.75, 1, 1])
    np.testing.assert_allclose(hardswish(z), z * np.array([0, 0, 0.25, 0.5, 0.75, 1, 1]))
    # 11 -> 8 would lose more than 10%, so 16
    assert [make_divisible(v, 8) for v in (512, 2, 4, 11, 12, 640)] == [512, 8, 8, 16, 16, 640]


# ------------------------------------------------------------------------------------------------- the projector
@given(st.integers(0, 2**32 - 1), st.integers(1, 7))
def test_v2_feature_transformation_is_the_per_token_mlp(seed, g):
    """With pooling to the full grid (windows of one token) and a zero PEG, v2 is the LLaVA MLP, token by token."""
    x, w = _case(2, g, seed=seed)
    w["peg.peg.0.weight"] = np.zeros_like(w["peg.peg.0.weight"])
    w["peg.peg.0.bias"] = np.zeros_like(w["peg.peg.0.bias"])
    mlp_w = {"0.weight": w["mlp.mlp.0.weight"], "0.bias": w["mlp.mlp.0.bias"],
             "2.weight": w["mlp.mlp.2.weight"], "2.bias": w["mlp.mlp.2.bias"]}  # fmt: skip
    got = ldp_projector(x, w, version=2, pool_grid=g)
    np.testing.assert_allclose(got, mlp_projector(x, mlp_w), rtol=1e-13, atol=1e-13)


@given(st.integers(0, 2**32 - 1), st.integers(4, 9), st.data())
def test_v2_is_local(seed, g, data):
    """A change in one input token reaches only the pooled cells whose window holds it and their 3x3 PEG ring."""
    x, w = _case(2, g, seed=seed)
    i, j = data.draw(st.integers(0, g - 1)), data.draw(st.integers(0, g - 1))
    x2 = x.copy()
    x2[i * g + j] += 1.0
    m = (g + 1) // 2
    diff = np.abs(ldp_projector(x2, w) - ldp_projector(x, w)).max(axis=1).reshape(m, m)
    wins = [((a * g) // m, -((-(a + 1) * g) // m)) for a in range(m)]
    cells_r = {a for a, (s, e) in enumerate(wins) if s <= i < e}
    cells_c = {b for b, (s, e) in enumerate(wins) if s <= j < e}
    reach = np.zeros((m, m), bool)
    for a in cells_r:
        for b in cells_c:
            reach[max(a - 1, 0) : a + 2, max(b - 1, 0) : b + 2] = True
    assert np.all(diff[~reach] == 0)
    assert diff[reach].max() > 0


def test_v1_squeeze_excitation_makes_it_global():
    """Unlike v2, v1's squeeze-excitation pools over the whole grid: one token moves every output."""
    x, w = _case(1, 8)
    x2 = x.copy()
    x2[0] += 1.0
    diff = np.abs(ldp_projector(x2, w, version=1) - ldp_projector(x, w, version=1)).max(axis=1)
    assert np.all(diff > 0)


def test_weight_names_are_the_official_ones():
    assert set(weight_shapes(2, 3, 8)) == {
        "mlp.mlp.0.weight", "mlp.mlp.0.bias", "mlp.mlp.2.weight", "mlp.mlp.2.bias", "peg.peg.0.weight", "peg.peg.0.bias"}  # fmt: skip
    v1 = weight_shapes(1, 1024, 2048)
    assert len(v1) == 4 + 2 * 10
    assert v1["model.mb_block.2.block.1.fc1.weight"] == (512, 2048, 1, 1)  # make_divisible(2048 // 4, 8)


# --------------------------------------------------------------------------------------------------- torch parity
def _torch_projector(version, d_vis, d, squeeze, m):
    """The official module structure, written out with torch.nn (no torchvision/timm needed): the same attribute
    paths, so the reference's weights load with ``strict=True``."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class LayerNorm2d(nn.LayerNorm):  # timm LayerNormAct2d without activation: LayerNorm over channels
        def forward(self, x):
            return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    class SqueezeExcitation(nn.Module):  # torchvision.ops.misc.SqueezeExcitation, Hardsigmoid scale
        def __init__(self, c, s):
            super().__init__()
            self.avgpool, self.fc1, self.fc2 = nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, s, 1), nn.Conv2d(s, c, 1)
            self.activation, self.scale_activation = nn.ReLU(), nn.Hardsigmoid()

        def forward(self, x):
            return self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x))))) * x

    class InvertedResidual(nn.Module):  # torchvision's, with expanded == input == output channels, SE, HS
        def __init__(self, c, s, stride):
            super().__init__()
            self.block = nn.Sequential(
                nn.Sequential(
                    nn.Conv2d(c, c, 3, stride, 1, groups=c, bias=False), LayerNorm2d(c, eps=1e-5), nn.Hardswish()
                ),
                SqueezeExcitation(c, s),
                nn.Sequential(nn.Conv2d(c, c, 1, bias=False), LayerNorm2d(c, eps=1e-5)),
            )  # fmt: skip
            self.use_res_connect = stride == 1

        def forward(self, x):
            y = self.block(x)
            return y + x if self.use_res_connect else y

    class Tokens2Grid(nn.Module):
        def grid(self, x):
            b, n, c = x.shape
            h = math.isqrt(n)
            return x.permute(0, 2, 1).reshape(b, c, h, h)

    class LDPBlock(Tokens2Grid):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Sequential(nn.Identity(), nn.Linear(d_vis, d), nn.GELU(), nn.Linear(d, d))
            blocks = InvertedResidual(d, squeeze, 1), InvertedResidual(d, squeeze, 2)
            self.mb_block = nn.Sequential(nn.Identity(), *blocks)

        def forward(self, x):
            return self.mb_block(self.grid(self.mlp(x))).flatten(2).permute(0, 2, 1)

    class LDPNetProjector(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = LDPBlock()

        def forward(self, x):
            return self.model(x)

    class FeatureIRLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(d_vis, d), nn.GELU(), nn.Linear(d, d))

    class PosInjectLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.peg = nn.Sequential(nn.Conv2d(d, d, 3, 1, 1, bias=True, groups=d))

    class LDPNetV2Projector(Tokens2Grid):
        def __init__(self):
            super().__init__()
            self.mlp, self.dwn, self.peg = FeatureIRLayer(), nn.AdaptiveAvgPool2d((m, m)), PosInjectLayer()

        def forward(self, x):
            p = self.dwn(self.grid(self.mlp.mlp(x)))
            return (self.peg.peg(p) + p).flatten(2).transpose(1, 2)

    return torch, (LDPNetProjector if version == 1 else LDPNetV2Projector)()


_PARITY = [(v, g, d_vis, d, None) for v in (1, 2) for g, d_vis, d in ((1, 4, 8), (4, 6, 8), (5, 7, 16), (7, 5, 12), (24, 8, 8))]


@pytest.mark.parametrize("version, g, d_vis, d, pool_grid", _PARITY + [(2, 13, 3, 8, 12), (2, 9, 4, 8, 4)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_matches_torch_modules_with_official_names(version, g, d_vis, d, pool_grid, dtype):
    m = pool_grid or (g + 1) // 2
    x, w = _case(version, g, d_vis, d, seed=g * 10 + version, dtype=dtype)
    torch, module = _torch_projector(version, d_vis, d, make_divisible(d // 4, 8), m)
    tdtype = torch.float64 if dtype == np.float64 else torch.float32
    module = module.to(tdtype).eval()
    module.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in w.items()}, strict=True)
    with torch.no_grad():
        want = module(torch.from_numpy(x)[None])[0].numpy()
    got = ldp_projector(x, w, version=version, pool_grid=pool_grid)
    assert got.shape == want.shape == (m * m, d) and got.dtype == dtype
    tol = 1e-10 if dtype == np.float64 else 5e-5
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


# ------------------------------------------------------------------------------------------------------ bad input
def test_bad_input_raises_naming_the_argument():
    x, w = _case(2, 4)
    with pytest.raises(ValueError, match=r"\bx\b.*square"):
        ldp_projector(x[:-1], w)
    with pytest.raises(ValueError, match="version"):
        ldp_projector(x, w, version=3)
    with pytest.raises(ValueError, match="weights"):
        ldp_projector(x, w, version=1)  # v2 names given to v1
    with pytest.raises(ValueError, match="pool_grid"):
        ldp_projector(x, random_weights(1, 6, 8, np.random.default_rng(0), np.float64), version=1, pool_grid=2)
    with pytest.raises(ValueError, match="pool_grid"):
        ldp_projector(x, w, pool_grid=5)  # larger than g = 4
    w_extra = dict(w, extra=np.zeros(1))
    with pytest.raises(ValueError, match="weights"):
        ldp_projector(x, w_extra)
    w_nan = dict(w, **{"peg.peg.0.weight": np.full((8, 1, 3, 3), np.nan)})
    with pytest.raises(ValueError, match="weights"):
        ldp_projector(x, w_nan)
    w_shape = dict(w, **{"peg.peg.0.weight": np.zeros((8, 1, 5, 5))})
    with pytest.raises(ValueError, match="weights"):
        ldp_projector(x, w_shape)
    with pytest.raises(TypeError, match="weights"):
        ldp_projector(x.astype(np.float32), w)
