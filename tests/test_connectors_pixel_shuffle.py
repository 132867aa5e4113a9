"""Idefics3 / SmolVLM connector (connectors.pixel_shuffle): the rearrangement against a literal NumPy transcription
of Idefics3's ``pixel_shuffle`` reshape sequence, token counts, locality, and parity with transformers'
``Idefics3Connector`` loaded with the same ``state_dict``."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mllm_ref.connectors.pixel_shuffle import WEIGHT_NAME, pixel_shuffle_connector, random_weights
from mllm_ref.tokens.pixel_unshuffle import pixel_unshuffle


def idefics3_pixel_shuffle_literal(x: np.ndarray, scale_factor: int) -> np.ndarray:
    """Idefics3Connector.pixel_shuffle, step for step, in NumPy (``view``/``reshape`` of a contiguous array are
    both ``reshape``; ``permute(0, 2, 1, 3)`` is ``transpose(0, 2, 1, 3)``)."""
    bsz, seq, embed_dim = x.shape
    height = width = int(seq**0.5)
    x = x.reshape(bsz, height, width, embed_dim)
    x = x.reshape(bsz, height, int(width / scale_factor), embed_dim * scale_factor)
    x = x.transpose(0, 2, 1, 3)
    x = x.reshape(bsz, int(width / scale_factor), int(height / scale_factor), embed_dim * (scale_factor**2))
    x = x.transpose(0, 2, 1, 3)
    x = x.reshape(bsz, int(seq / (scale_factor**2)), embed_dim * (scale_factor**2))
    return x


@st.composite
def connectors(draw, dtype=np.float64):
    r = draw(st.integers(1, 4))
    g = r * draw(st.integers(1, 4))
    d_vis, d_llm = draw(st.integers(1, 6)), draw(st.integers(1, 9))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal((g * g, d_vis)).astype(dtype)
    return x, random_weights(d_vis, d_llm, r, rng, dtype), r, g


@given(connectors())
def test_rearrangement_is_idefics3s_literal_reshape_sequence(case):
    x, _, r, g = case
    literal = idefics3_pixel_shuffle_literal(x[None], r)[0]
    ours = pixel_unshuffle(x.reshape(g, g, -1), r).reshape(literal.shape)
    np.testing.assert_array_equal(ours, literal)  # same order: no index mapping is needed
    eye = {WEIGHT_NAME: np.eye(r * r * x.shape[1])}  # with W = I the connector returns the rearrangement itself
    np.testing.assert_array_equal(pixel_shuffle_connector(x, eye, r=r), literal)


@given(connectors())
def test_connector_is_literal_shuffle_then_projection(case):
    x, w, r, g = case
    want = idefics3_pixel_shuffle_literal(x[None], r)[0] @ w[WEIGHT_NAME].T
    got = pixel_shuffle_connector(x, w, r=r)
    assert got.shape == ((g // r) ** 2, w[WEIGHT_NAME].shape[0]) and got.dtype == x.dtype
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@given(connectors(), st.data())
def test_a_token_reaches_only_its_window(case, data):
    x, w, r, g = case
    i, j = data.draw(st.integers(0, g - 1)), data.draw(st.integers(0, g - 1))
    x2 = x.copy()
    x2[i * g + j] += 1.0
    changed = np.abs(pixel_shuffle_connector(x2, w, r=r) - pixel_shuffle_connector(x, w, r=r)).max(axis=1) > 0
    expect = np.zeros((g // r) ** 2, bool)
    expect[(i // r) * (g // r) + j // r] = True
    assert np.all(changed <= expect)  # nothing outside the window's token changes
    # the window's token changes by W[:, slot] (the slot of (i, j) inside its window)
    slot = ((i % r) * r + (j % r)) * x.shape[1]
    delta = pixel_shuffle_connector(x2, w, r=r) - pixel_shuffle_connector(x, w, r=r)
    np.testing.assert_allclose(delta[expect][0], w[WEIGHT_NAME][:, slot : slot + x.shape[1]].sum(axis=1), atol=1e-12)


def test_r1_is_a_plain_linear_and_float32_stays_float32():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((9, 4)).astype(np.float32)
    w = random_weights(4, 3, 1, rng)
    y = pixel_shuffle_connector(x, w, r=1)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, x @ w[WEIGHT_NAME].T, rtol=1e-6)


@pytest.mark.parametrize("g, r", [(26, 2), (27, 3), (32, 4)])
def test_token_counts_of_idefics3_and_smolvlm(g, r):
    rng = np.random.default_rng(g)
    x = rng.standard_normal((g * g, 2)).astype(np.float32)
    y = pixel_shuffle_connector(x, random_weights(2, 3, r, rng), r=r)
    assert y.shape == ((g // r) ** 2, 3)  # 169, 81, 64


# ---------------------------------------------------------------------------------------- transformers parity
@pytest.mark.parametrize("g, r, d_vis, d_llm", [(4, 2, 6, 10), (6, 3, 4, 8), (8, 4, 3, 6), (5, 1, 4, 4)])
def test_matches_transformers_idefics3_connector(g, r, d_vis, d_llm):  # d_llm even: the text config checks RoPE
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers.models.idefics3.configuration_idefics3 import Idefics3Config
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

    config = Idefics3Config(
        vision_config={"hidden_size": d_vis, "num_attention_heads": 1},
        text_config={"model_type": "llama", "hidden_size": d_llm, "num_attention_heads": 1, "num_key_value_heads": 1},
        scale_factor=r,
    )
    module = Idefics3Connector(config).to(torch.float64).eval()
    rng = np.random.default_rng(g + r)
    w = random_weights(d_vis, d_llm, r, rng, np.float64)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in w.items()}, strict=True)  # no bias exists
    x = rng.standard_normal((g * g, d_vis))
    with torch.no_grad():
        want = module(torch.from_numpy(x)[None])[0].numpy()
    np.testing.assert_allclose(pixel_shuffle_connector(x, w, r=r), want, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------- bad input
def test_bad_input_raises_naming_the_argument():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 3))
    w = random_weights(3, 5, 2, rng, np.float64)
    with pytest.raises(ValueError, match=r"\bx\b.*square"):
        pixel_shuffle_connector(x[:15], w)
    with pytest.raises(ValueError, match=r"\bx\b.*divisible"):
        pixel_shuffle_connector(x, random_weights(3, 5, 3, rng, np.float64), r=3)  # 4 x 4 grid, r = 3
    with pytest.raises(ValueError, match="weights"):
        pixel_shuffle_connector(x, w, r=1)  # 12 columns, 3 expected
    with pytest.raises(ValueError, match="weights"):
        pixel_shuffle_connector(x, {**w, "modality_projection.proj.bias": np.zeros(5)})
    with pytest.raises(ValueError, match=r"\br\b"):
        pixel_shuffle_connector(x, w, r=0)
    with pytest.raises(TypeError, match="weights"):
        pixel_shuffle_connector(x.astype(np.float32), w)
    w_inf = {WEIGHT_NAME: w[WEIGHT_NAME].copy()}
    w_inf[WEIGHT_NAME][0, 0] = np.inf
    with pytest.raises(ValueError, match="weights"):
        pixel_shuffle_connector(x, w_inf)
