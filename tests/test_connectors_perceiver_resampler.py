"""Perceiver Resampler (connectors.perceiver_resampler) and MiniCPM-V's resampler: parity with torch modules built
like the official code (open_flamingo ``helpers.py``, MiniCPM-V ``resampler.py``) and loaded with our weight dicts
(strict state-dict loading checks the parameter names), fixed output size, permutation invariance, bad input.
Fast paths are checked by the generic registry tests; here they also run on the invariance cases."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mllm_ref.connectors.perceiver_resampler import (
    minicpm_resampler,
    perceiver_resampler,
    random_minicpm_weights,
    random_weights,
    sincos_2d,
)
from mllm_ref.oracle import registry

TECH = registry.get("connectors.perceiver_resampler")
IMPLS = {"reference": perceiver_resampler} | {
    b: TECH.fast_path(b) for b in registry.BACKENDS if TECH.fast_path(b) is not None
}


def _weights(d=16, q=4, depth=2, heads=2, dim_head=8, frames=3, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return random_weights(
        d, latents=q, depth=depth, heads=heads, dim_head=dim_head, frames=frames, rng=rng, dtype=dtype
    )


# ------------------------------------------------------------------------------------------------ invariants
@pytest.mark.parametrize("impl", sorted(IMPLS))
@given(n=st.integers(1, 40), t=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_output_size_is_fixed_whatever_the_patch_count(impl, n, t, seed):
    w = _weights()
    x = np.random.default_rng(seed).standard_normal((t, n, 16)).astype(np.float32)
    out = IMPLS[impl](x, w, heads=2)
    assert out.shape == (4, 16) and out.dtype == np.float32 and np.isfinite(out).all()


@pytest.mark.parametrize("impl", sorted(IMPLS))
@given(seed=st.integers(0, 2**16), n=st.integers(2, 20))
def test_permuting_media_tokens_within_a_frame_leaves_the_output_unchanged(impl, seed, n):
    rng = np.random.default_rng(seed)
    w = _weights(dtype=np.float64)
    x = rng.standard_normal((3, n, 16))
    y = x.copy()
    for f in range(3):
        y[f] = x[f, rng.permutation(n)]
    a, b = IMPLS[impl](x, w, heads=2), IMPLS[impl](y, w, heads=2)
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)


def test_frames_are_told_apart_by_the_time_embeddings():
    rng = np.random.default_rng(1)
    w = _weights(dtype=np.float64)
    x = rng.standard_normal((2, 5, 16))
    swapped = x[::-1].copy()
    assert not np.allclose(perceiver_resampler(x, w, heads=2), perceiver_resampler(swapped, w, heads=2))
    no_time = {k: v for k, v in w.items() if k != "frame_embs"}  # without them, frames are a set of tokens too
    np.testing.assert_allclose(
        perceiver_resampler(x, no_time, heads=2), perceiver_resampler(swapped, no_time, heads=2), atol=1e-12
    )


def test_a_single_frame_may_be_given_without_the_frame_axis():
    w = _weights()
    x = np.random.default_rng(2).standard_normal((6, 16)).astype(np.float32)
    np.testing.assert_array_equal(perceiver_resampler(x, w, heads=2), perceiver_resampler(x[None], w, heads=2))


def test_float64_in_float64_out():
    w = _weights(dtype=np.float64)
    out = perceiver_resampler(np.ones((1, 3, 16)), w, heads=2)
    assert out.dtype == np.float64


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "change, error, words",
    [
        (lambda x, w: (x[..., :15], w), ValueError, "weights['latents']"),
        (lambda x, w: (np.zeros((5, 2, 16), np.float32), w), ValueError, "frame_embs"),
        (lambda x, w: (x, {k: v for k, v in w.items() if k != "norm.bias"}), ValueError, "norm.bias"),
        (lambda x, w: (x, {**w, "layers.0.0.to_qq.weight": w["latents"]}), ValueError, "unexpected"),
        (lambda x, w: (x, {**w, "latents": w["latents"].astype(np.float64)}), TypeError, "weights['latents']"),
        (lambda x, w: (x, {**w, "layers.1.1.3.weight": w["layers.1.1.3.weight"] * np.nan}), ValueError, "1.3"),
        (lambda x, w: (x, {}), ValueError, "weights"),
        (lambda x, w: (x, list(w.values())), TypeError, "weights"),
        (lambda x, w: (x.astype(np.float16), w), TypeError, "x"),
    ],
)
def test_bad_input_is_named(change, error, words):
    w = _weights()
    x = np.zeros((2, 3, 16), np.float32)
    bad_x, bad_w = change(x, w)
    for fn in IMPLS.values():
        with pytest.raises(error, match=words.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
            fn(bad_x, bad_w, heads=2)


def test_heads_must_divide_the_attention_width():
    w = _weights()
    with pytest.raises(ValueError, match="heads"):
        perceiver_resampler(np.zeros((1, 3, 16), np.float32), w, heads=3)


# ------------------------------------------------------------------------------------------------ torch parity
torch = pytest.importorskip("torch")
nn = torch.nn


class _PerceiverAttention(nn.Module):  # open_flamingo's structure and names
    def __init__(self, dim, dim_head, heads):
        super().__init__()
        self.heads, self.scale = heads, dim_head**-0.5
        self.norm_media, self.norm_latents = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, x, latents):
        x, latents = self.norm_media(x), self.norm_latents(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
        q, k, v = (z.reshape(*z.shape[:-1], self.heads, -1).transpose(-2, -3) for z in (q, k, v))
        sim = (q * self.scale) @ k.transpose(-1, -2)
        sim = sim - sim.amax(dim=-1, keepdim=True).detach()
        out = sim.softmax(dim=-1) @ v
        return self.to_out(out.transpose(-2, -3).flatten(-2))


class _PerceiverResampler(nn.Module):
    def __init__(self, dim, depth, dim_head, heads, num_latents, max_frames, ff_mult=4):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.frame_embs = nn.Parameter(torch.randn(max_frames, dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([
                _PerceiverAttention(dim, dim_head, heads),
                nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, ff_mult * dim, bias=False), nn.GELU(),
                              nn.Linear(ff_mult * dim, dim, bias=False)),
            ])
            for _ in range(depth)
        )  # fmt: skip
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):  # x: [T, N, D] (one media item)
        x = (x + self.frame_embs[: x.shape[0], None]).flatten(0, 1)
        latents = self.latents
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm(latents)


def test_matches_an_open_flamingo_style_module():
    w = _weights(d=32, q=6, depth=3, heads=4, dim_head=8, frames=4, dtype=np.float64, seed=5)
    module = _PerceiverResampler(32, 3, 8, 4, 6, 4).double()
    module.load_state_dict({k: torch.from_numpy(v) for k, v in w.items()}, strict=True)
    x = np.random.default_rng(6).standard_normal((3, 10, 32))
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(perceiver_resampler(x, w, heads=4), want, rtol=1e-10, atol=1e-10)


class _MiniCPMResampler(nn.Module):  # MiniCPM-V 2.6 resampler.py structure and names
    def __init__(self, num_queries, embed_dim, num_heads, kv_dim):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(num_queries, embed_dim))
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False)
        self.attn = nn.MultiheadAttention(embed_dim, num_heads)
        self.ln_q, self.ln_kv, self.ln_post = (nn.LayerNorm(embed_dim, eps=1e-6) for _ in range(3))
        self.proj = nn.Parameter(torch.randn(embed_dim, embed_dim))

    def forward(self, x, tgt_h, tgt_w):  # x: [N, kv_dim]
        d = self.query.shape[1]
        # the official table: float32 numpy, meshgrid(w, h), first half from grid[0] (= the column index)
        gw, gh = np.meshgrid(np.arange(tgt_w, dtype=np.float64), np.arange(tgt_h, dtype=np.float64))

        def one_d(dim, pos):
            omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
            out = np.einsum("hw,d->hwd", pos, omega)
            return np.concatenate([np.sin(out), np.cos(out)], axis=-1)

        pos = np.concatenate([one_d(d // 2, gw), one_d(d // 2, gh)], axis=-1).reshape(tgt_h * tgt_w, d)
        pos = torch.from_numpy(pos)[:, None]  # L, B=1, D
        x = self.ln_kv(self.kv_proj(x))[:, None]
        q = self.ln_q(self.query)[:, None]
        out = self.attn(q, x + pos, x)[0][:, 0]
        return self.ln_post(out) @ self.proj


def test_minicpm_matches_the_official_structure_64_queries_over_640_tokens():
    rng = np.random.default_rng(7)
    d, kv = 64, 48
    w = random_minicpm_weights(d, queries=64, kv_dim=kv, rng=rng, dtype=np.float64)
    module = _MiniCPMResampler(64, d, 4, kv).double()
    module.load_state_dict({k: torch.from_numpy(v) for k, v in w.items()}, strict=True)
    x = rng.standard_normal((640, kv))  # a 32 x 20 slice
    with torch.no_grad():
        want = module(torch.from_numpy(x), 32, 20).numpy()
    got = minicpm_resampler(x, w, tgt_size=(32, 20), heads=4)
    assert got.shape == (64, d)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------------------ MiniCPM-V
def _minicpm(kv_dim=12, d=16, q=8, seed=0, dtype=np.float64):
    return random_minicpm_weights(d, queries=q, kv_dim=kv_dim, rng=np.random.default_rng(seed), dtype=dtype)


@given(h=st.integers(1, 6), w=st.integers(1, 6))
def test_minicpm_output_size_is_fixed(h, w):
    x = np.random.default_rng(h * 7 + w).standard_normal((h * w, 12))
    assert minicpm_resampler(x, _minicpm(), tgt_size=(h, w), heads=2).shape == (8, 16)


def test_minicpm_is_permutation_invariant_only_without_the_position_embedding():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((12, 12))
    perm = rng.permutation(12)
    w = _minicpm()
    a = minicpm_resampler(x, w, tgt_size=(3, 4), heads=2, use_pos_embed=False)
    b = minicpm_resampler(x[perm], w, tgt_size=(3, 4), heads=2, use_pos_embed=False)
    np.testing.assert_allclose(a, b, atol=1e-12)
    a = minicpm_resampler(x, w, tgt_size=(3, 4), heads=2)
    b = minicpm_resampler(x[perm], w, tgt_size=(3, 4), heads=2)
    assert np.abs(a - b).max() > 1e-6


def test_minicpm_without_kv_proj_needs_matching_widths():
    w = _minicpm(kv_dim=None)
    assert "kv_proj.weight" not in w
    assert minicpm_resampler(np.ones((4, 16)), w, tgt_size=(2, 2), heads=2).shape == (8, 16)
    with pytest.raises(ValueError, match="x must have width 16"):
        minicpm_resampler(np.ones((4, 12)), w, tgt_size=(2, 2), heads=2)


def test_sincos_table_columns_first():
    p = sincos_2d(8, 2, 3)  # quarter = 2 frequencies: 1 and 1/100
    assert p.shape == (6, 8)
    # token (row 1, col 2) = index 5: first half encodes the column 2, second half the row 1
    np.testing.assert_allclose(p[5, :4], [np.sin(2), np.sin(0.02), np.cos(2), np.cos(0.02)])
    np.testing.assert_allclose(p[5, 4:], [np.sin(1), np.sin(0.01), np.cos(1), np.cos(0.01)])


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"tgt_size": (3, 3)}, ValueError, "tgt_size"),
        ({"tgt_size": 12}, TypeError, "tgt_size"),
        ({"heads": 5}, ValueError, "heads"),
        ({"use_pos_embed": 1}, TypeError, "use_pos_embed"),
        ({"eps": 0.0}, ValueError, "eps"),
    ],
)
def test_minicpm_bad_input(kwargs, error, words):
    args = {"tgt_size": (3, 4), "heads": 2} | kwargs
    with pytest.raises(error, match=words):
        minicpm_resampler(np.ones((12, 12)), _minicpm(), **args)
