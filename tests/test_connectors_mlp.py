"""LLaVA projector (connectors.mlp): the linear / mlp{k}x_gelu formulas, token-wise action, the official names checked
against torch.nn modules, and the tiny VLM's connector reproduced from its shipped weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mllm_ref.connectors.mlp import mlp_projector, projector_depth, random_weights, weights_from_tinyvlm
from mllm_ref.oracle import registry

TECH = registry.get("connectors.mlp")


@st.composite
def projectors(draw, dtype=np.float64):
    n = draw(st.integers(1, 12))
    d_vis, d_llm = draw(st.integers(1, 10)), draw(st.integers(1, 10))
    depth = draw(st.sampled_from([0, 1, 2, 3]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal((n, d_vis)).astype(dtype)
    return x, random_weights(d_vis, d_llm, depth, rng, dtype), depth


def _exact_gelu(z: np.ndarray) -> np.ndarray:
    return 0.5 * z * (1.0 + np.vectorize(math.erf)(z / math.sqrt(2.0)))


@given(projectors())
def test_matches_the_written_out_formula(case):
    x, w, depth = case
    if depth == 0:
        want = x @ w["weight"].T + w["bias"]
    else:
        want = x @ w["0.weight"].T + w["0.bias"]
        for j in range(1, depth):
            want = _exact_gelu(want) @ w[f"{2 * j}.weight"].T + w[f"{2 * j}.bias"]
    got = mlp_projector(x, w)
    assert got.shape == (x.shape[0], want.shape[1]) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert projector_depth(w) == depth


@given(projectors(), st.randoms(use_true_random=False))
def test_acts_on_each_token_alone(case, random):
    x, w, _ = case
    perm = np.array(random.sample(range(len(x)), len(x)))
    full = mlp_projector(x, w)
    np.testing.assert_allclose(mlp_projector(x[perm], w), full[perm], rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(mlp_projector(x[:1], w), full[:1], rtol=1e-13, atol=1e-13)


def test_linear_projector_is_affine():
    rng = np.random.default_rng(0)
    w = random_weights(5, 4, 0, rng, np.float64)
    a, b = rng.standard_normal((3, 5)), rng.standard_normal((3, 5))
    f = lambda z: mlp_projector(z, w)  # noqa: E731
    np.testing.assert_allclose(f(2 * a - b) - w["bias"], 2 * (f(a) - w["bias"]) - (f(b) - w["bias"]), atol=1e-12)


def test_float32_in_float32_out_and_inputs_untouched():
    kw = TECH.cases("test")[1][1]
    before = {k: v.copy() for k, v in kw["weights"].items()}
    x0 = kw["x"].copy()
    y = mlp_projector(**kw)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(kw["x"], x0)
    for k in before:
        np.testing.assert_array_equal(kw["weights"][k], before[k])


# ------------------------------------------------------------------------------------------ official names via torch
@pytest.mark.parametrize("depth", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_torch_modules_with_llava_names_agree(depth, dtype):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(depth)
    d_vis, d_llm = 12, 9
    w = random_weights(d_vis, d_llm, depth, rng, dtype)
    if depth == 0:  # LLaVA's build_vision_projector: 'linear'
        module = torch.nn.Linear(d_vis, d_llm)
    else:  # 'mlp{depth}x_gelu'
        layers = [torch.nn.Linear(d_vis, d_llm)]
        for _ in range(1, depth):
            layers += [torch.nn.GELU(), torch.nn.Linear(d_llm, d_llm)]
        module = torch.nn.Sequential(*layers)
    tdtype = torch.float64 if dtype == np.float64 else torch.float32
    module = module.to(tdtype)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in w.items()}, strict=True)  # the names match exactly
    x = rng.standard_normal((7, d_vis)).astype(dtype)
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    got = mlp_projector(x, w)
    tol = 1e-12 if dtype == np.float64 else 2e-6
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------------------------- the tiny VLM's own
def test_reproduces_the_tiny_vlm_connector(model):
    from mllm_ref.tinyvlm import world
    from mllm_ref.tinyvlm.model import encode_tokens

    image = world.render(world.make_scene(np.random.default_rng(0)))
    tokens, view, _ = encode_tokens(model, image)
    weights = weights_from_tinyvlm(model.params)  # proj1 -> '0', proj2 -> '2'
    assert set(weights) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    got = mlp_projector(view.features, weights, approximate="tanh")
    np.testing.assert_array_equal(got, tokens.x)  # same operations in the same order: bit for bit
    exact = mlp_projector(view.features, weights, approximate="none")
    assert not np.array_equal(exact, tokens.x), "the tiny VLM uses the tanh GELU, not LLaVA's exact one"
    np.testing.assert_allclose(exact, tokens.x, atol=0.05)  # ... which differ only slightly


# ---------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "weights, match",
    [
        ({}, "weights"),
        ({"weight": np.zeros((2, 3), np.float32)}, "weights"),
        ({"0.weight": np.zeros((2, 3), np.float32), "0.bias": np.zeros(2, np.float32), "2.weight": np.zeros((2, 2), np.float32)}, "weights"),
        ({"0.weight": np.zeros((2, 3), np.float32), "0.bias": np.zeros(2, np.float32), "4.weight": np.zeros((2, 2), np.float32),
          "4.bias": np.zeros(2, np.float32)}, "weights"),
        ({"fc.weight": np.zeros((2, 3), np.float32), "fc.bias": np.zeros(2, np.float32)}, "weights"),
        ({"weight": np.zeros((2, 4), np.float32), "bias": np.zeros(2, np.float32)}, "weights"),
        ({"weight": np.zeros((2, 3), np.float32), "bias": np.zeros(3, np.float32)}, "weights"),
    ],
)  # fmt: skip
def test_bad_weights_raise_naming_weights(weights, match):
    with pytest.raises(ValueError, match=match):
        mlp_projector(np.zeros((4, 3), np.float32), weights)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_weight_raises(bad):
    w = random_weights(3, 2, 2, np.random.default_rng(0))
    w["2.weight"] = w["2.weight"].copy()
    w["2.weight"][1, 0] = bad
    with pytest.raises(ValueError, match="weights"):
        mlp_projector(np.zeros((4, 3), np.float32), w)


def test_mixed_precision_and_wrong_types_raise():
    w = random_weights(3, 2, 2, np.random.default_rng(0))
    with pytest.raises(TypeError, match="weights"):
        mlp_projector(np.zeros((4, 3), np.float64), w)
    with pytest.raises(TypeError, match="weights"):
        mlp_projector(np.zeros((4, 3), np.float32), [w["0.weight"]])
    with pytest.raises(ValueError, match="approximate"):
        mlp_projector(np.zeros((4, 3), np.float32), w, approximate="erf")
