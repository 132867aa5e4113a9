"""Flamingo's GATED XATTN-DENSE layer (connectors.cross_attention): identity at zero gates, the media_locations
rule of the official code (immediate / all previous, text before the first image), parity with a torch module
built like open_flamingo's ``GatedCrossAttentionBlock`` (strict state-dict loading checks the names), the FLOPs
function, bad input. Fast paths are checked by the generic registry tests; here they also run on these cases."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mllm_ref.connectors.cross_attention import gated_xattn_dense, media_mask, random_weights, xattn_dense_flops
from mllm_ref.oracle import registry

TECH = registry.get("connectors.cross_attention")
IMPLS = {"reference": gated_xattn_dense} | {
    b: TECH.fast_path(b) for b in registry.BACKENDS if TECH.fast_path(b) is not None
}
D, DV, HEADS, DH = 16, 12, 2, 8


def _setup(gates=(0.7, -0.4), t=10, m=3, n=4, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    w = random_weights(D, DV, heads=HEADS, dim_head=DH, gates=gates, rng=rng, dtype=dtype)
    x = rng.standard_normal((t, D)).astype(dtype)
    media = rng.standard_normal((m, n, DV)).astype(dtype)
    return x, media, w


def _locations(t, places):
    loc = np.zeros(t, dtype=bool)
    loc[list(places)] = True
    return loc


# ------------------------------------------------------------------------------------------------ gates
@pytest.mark.parametrize("impl", sorted(IMPLS))
@given(seed=st.integers(0, 2**16), immediate=st.booleans(), masked=st.booleans())
def test_zero_gates_make_the_layer_the_identity_exactly(impl, seed, immediate, masked):
    x, media, w = _setup(gates=(0.0, 0.0), seed=seed, dtype=np.float32)
    loc = _locations(10, (1, 6)) if masked else None
    out = IMPLS[impl](x, media, w, media_locations=loc, heads=HEADS, only_attend_immediate_media=immediate)
    np.testing.assert_array_equal(out, x)


def test_open_gates_change_the_output():
    x, media, w = _setup()
    assert np.abs(gated_xattn_dense(x, media, w, heads=HEADS) - x).max() > 1e-3


def test_attention_gate_alone_scales_the_cross_attention_by_tanh():
    x, media, w = _setup(gates=(0.5, 0.0))
    w1 = {**w, "attn_gate": np.array([np.arctanh(1.0 * np.tanh(0.5) * 2)])}  # tanh(gate) doubled
    d1 = gated_xattn_dense(x, media, w, heads=HEADS) - x
    d2 = gated_xattn_dense(x, media, w1, heads=HEADS) - x
    np.testing.assert_allclose(d2, 2 * d1, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------------ media masking
def test_media_mask_rule():
    loc = _locations(7, (1, 4))
    imm = media_mask(loc, 2)
    prev = media_mask(loc, 2, only_attend_immediate_media=False)
    assert imm.tolist() == [[False, False], [True, False], [True, False], [True, False],
                            [False, True], [False, True], [False, True]]  # fmt: skip
    assert prev.tolist() == [[False, False], [True, False], [True, False], [True, False],
                             [True, True], [True, True], [True, True]]  # fmt: skip


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_text_before_the_first_image_gets_no_cross_attention(impl):
    x, media, w = _setup(gates=(0.9, 0.0))  # FFN gate closed: the output is x + gated cross-attention
    loc = _locations(10, (3, 7))
    out = IMPLS[impl](x, media, w, media_locations=loc, heads=HEADS)
    np.testing.assert_array_equal(out[:3], x[:3])  # before the first <image>: exactly unchanged
    assert np.abs(out[3:] - x[3:]).max(axis=1).min() > 1e-6  # from the <image> token on: changed


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_each_token_sees_only_its_latest_image(impl):
    x, media, w = _setup(gates=(0.9, 0.3))
    loc = _locations(10, (0, 4, 8))
    base = IMPLS[impl](x, media, w, media_locations=loc, heads=HEADS)
    other = media.copy()
    other[1] += 1.0  # change image 1 (seen by tokens 4..7 only)
    out = IMPLS[impl](x, other, w, media_locations=loc, heads=HEADS)
    changed = np.abs(out - base).max(axis=1) > 1e-9
    assert changed.tolist() == [False] * 4 + [True] * 4 + [False] * 2
    out = IMPLS[impl](x, other, w, media_locations=loc, heads=HEADS, only_attend_immediate_media=False)
    base = IMPLS[impl](x, media, w, media_locations=loc, heads=HEADS, only_attend_immediate_media=False)
    changed = np.abs(out - base).max(axis=1) > 1e-9
    assert changed.tolist() == [False] * 4 + [True] * 6  # every later token sees all previous images


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_all_previous_mode_keeps_the_codes_uniform_attention_before_the_first_image(impl):
    x, media, w = _setup(gates=(0.9, 0.0))
    loc = _locations(10, (5,))
    out = IMPLS[impl](x, media, w, media_locations=loc, heads=HEADS, only_attend_immediate_media=False)
    # the official code masks every key with the same finite -max: a uniform softmax, mean of all values
    v = media.reshape(-1, DV) @ w["attn.to_kv.weight"][HEADS * DH :].T
    want = x[:5] + np.tanh(0.9) * (v.mean(axis=0) @ w["attn.to_out.weight"].T)
    np.testing.assert_allclose(out[:5], want, rtol=1e-10, atol=1e-12)


def test_without_media_locations_every_token_sees_every_image():
    x, media, w = _setup()
    full = gated_xattn_dense(x, media, w, heads=HEADS)
    loc = _locations(10, (0, 1, 2))  # after token 2 every image precedes
    prev = gated_xattn_dense(x, media, w, media_locations=loc, heads=HEADS, only_attend_immediate_media=False)
    np.testing.assert_allclose(prev[2:], full[2:], rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------ torch parity
def test_matches_an_open_flamingo_style_block():
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class MaskedCrossAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(D)
            self.to_q = nn.Linear(D, HEADS * DH, bias=False)
            self.to_kv = nn.Linear(DV, 2 * HEADS * DH, bias=False)
            self.to_out = nn.Linear(HEADS * DH, D, bias=False)

        def forward(self, x, media, media_locations, immediate):
            t_img, n = media.shape[:2]
            q = self.to_q(self.norm(x))
            k, v = self.to_kv(media.flatten(0, 1)).chunk(2, dim=-1)
            q, k, v = (z.reshape(z.shape[0], HEADS, DH).transpose(0, 1) for z in (q, k, v))
            sim = (q * DH**-0.5) @ k.transpose(-1, -2)
            text_time = media_locations.long().cumsum(-1)
            media_time = torch.arange(t_img) + 1
            op = torch.eq if immediate else torch.ge
            mask = op(text_time[None, :, None], media_time.repeat_interleave(n)[None, None, :])
            sim = sim.masked_fill(~mask, -torch.finfo(sim.dtype).max)
            sim = sim - sim.amax(dim=-1, keepdim=True)
            attn = sim.softmax(dim=-1)
            if immediate:
                attn = attn.masked_fill((text_time == 0)[None, :, None], 0.0)
            return self.to_out((attn @ v).transpose(0, 1).flatten(1))

    class GatedCrossAttentionBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = MaskedCrossAttention()
            self.attn_gate = nn.Parameter(torch.tensor([0.0]))
            self.ff = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, 4 * D, bias=False), nn.GELU(),
                                    nn.Linear(4 * D, D, bias=False))  # fmt: skip
            self.ff_gate = nn.Parameter(torch.tensor([0.0]))

        def forward(self, x, media, loc, immediate):
            x = self.attn(x, media, loc, immediate) * self.attn_gate.tanh() + x
            return self.ff(x) * self.ff_gate.tanh() + x

    x, media, w = _setup(t=12, seed=4)
    block = GatedCrossAttentionBlock().double()
    block.load_state_dict({k: torch.from_numpy(v) for k, v in w.items()}, strict=True)
    loc = _locations(12, (2, 6, 9))
    for immediate in (True, False):
        with torch.no_grad():
            want = block(torch.from_numpy(x), torch.from_numpy(media), torch.from_numpy(loc), immediate).numpy()
        got = gated_xattn_dense(x, media, w, media_locations=loc, heads=HEADS, only_attend_immediate_media=immediate)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------------ FLOPs
def test_flops_by_hand_and_scaling():
    # T=2, N=3, D=4, Dv=5, H d = 1*2, f=1, one layer
    want = 2 * 2 * 4 * 2 + 4 * 3 * 5 * 2 + 4 * 2 * 3 * 2 + 2 * 2 * 2 * 4 + 4 * 1 * 2 * 16 + 9 * 8 + 10 * 8 + 4 * 8
    got = xattn_dense_flops(2, 3, 4, d_visual=5, heads=1, dim_head=2, ff_mult=1)
    assert got == want
    one = xattn_dense_flops(100, 256, 512, n_layers=1)
    assert xattn_dense_flops(100, 256, 512, n_layers=32, every=4) == 8 * one  # 32 // 4 inserted layers
    assert xattn_dense_flops(100, 256, 512, n_layers=3, every=4) == 0.0
    # doubling the media tokens grows only the k/v and score terms
    assert xattn_dense_flops(100, 512, 512) - one == 4.0 * 256 * 512 * 512 + 4.0 * 100 * 256 * 512


def test_flops_bad_input():
    with pytest.raises(ValueError, match="every"):
        xattn_dense_flops(1, 1, 1, every=0)
    with pytest.raises(TypeError, match="d_model"):
        xattn_dense_flops(1, 1, 1.5)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "change, error, words",
    [
        (lambda a: a | {"media_locations": np.ones(10, dtype=bool)}, ValueError, "media_locations marks 10"),
        (lambda a: a | {"media_locations": np.ones(9, dtype=bool)}, ValueError, "media_locations"),
        (lambda a: a | {"media_locations": np.ones(10, dtype=np.int64)}, TypeError, "media_locations"),
        (lambda a: a | {"media": a["media"][..., :5]}, ValueError, "to_kv"),
        (lambda a: a | {"media": a["media"].astype(np.float32)}, TypeError, "media"),
        (lambda a: a | {"weights": {**a["weights"], "attn_gate": np.array(0.0)}}, ValueError, "attn_gate"),
        (lambda a: a | {"weights": {**a["weights"], "ff_gate": np.array([np.inf])}}, ValueError, "ff_gate"),
        (lambda a: a | {"only_attend_immediate_media": 1}, TypeError, "only_attend_immediate_media"),
        (lambda a: a | {"heads": 3}, ValueError, "heads"),
    ],
)
def test_bad_input_is_named(change, error, words):
    x, media, w = _setup()
    args = change({"x": x, "media": media, "weights": w, "heads": HEADS})
    for fn in IMPLS.values():
        with pytest.raises(error, match=words):
            fn(**args)
