"""LLaVA-Mini (connectors.llava_mini): fixed number of compressed tokens, permutation invariance of the C = 1
compression, the bicubic position resize of ``get_abs_pos``, parity of the compressor with torch's
``nn.MultiheadAttention`` + ``F.interpolate`` as the official ``Resampler`` uses them, parity of the pre-fusion
with transformers' ``LlamaDecoderLayer`` (strict state-dict loading checks the names), bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mllm_ref.connectors.llava_mini import bicubic_resize, compress, llava_mini, random_weights
from mllm_ref.connectors.perceiver_resampler import sincos_2d

DV, D = 16, 24


def _w(queries=1, layers=2, heads=4, kv_heads=2, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return random_weights(DV, D, queries=queries, layers=layers, heads=heads, kv_heads=kv_heads, rng=rng, dtype=dtype)


def _inputs(n=16, t=5, seed=1, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, DV)).astype(dtype), rng.standard_normal((t, D)).astype(dtype)


@given(g=st.integers(1, 8), queries=st.sampled_from([1, 4, 9]))
def test_compressed_size_is_fixed_whatever_the_patch_count(g, queries):
    v, e = _inputs(n=g * g)
    comp, text = llava_mini(v, e, _w(queries=queries), heads=4, kv_heads=2, compressor_heads=2)
    assert comp.shape == (queries, D) and text.shape == e.shape
    assert np.isfinite(comp).all() and np.isfinite(text).all()


def test_one_query_compression_is_invariant_to_permuting_the_patches():
    # with C = 1 the keys' position embedding is the single query position resized: a constant
    w = _w(queries=1)
    v, _ = _inputs(n=25)
    perm = np.random.default_rng(3).permutation(25)
    np.testing.assert_allclose(compress(v, w, compressor_heads=2), compress(v[perm], w, compressor_heads=2), atol=1e-12)
    w4 = _w(queries=4)  # with C = 4 the resized sincos grid tells the patches apart
    assert np.abs(compress(v, w4, compressor_heads=2) - compress(v[perm], w4, compressor_heads=2)).max() > 1e-6


def test_no_prefusion_layers_give_the_raw_text():
    v, e = _inputs()
    comp, text = llava_mini(v, e, _w(layers=0), heads=4, kv_heads=2, compressor_heads=2)
    np.testing.assert_array_equal(text, e)


def test_text_fusion_depends_on_the_image_and_compression_not_on_the_text():
    w = _w()
    v, e = _inputs()
    comp, text = llava_mini(v, e, w, heads=4, kv_heads=2, compressor_heads=2)
    comp2, text2 = llava_mini(v + 0.5, e, w, heads=4, kv_heads=2, compressor_heads=2)
    assert np.abs(text2 - text).max() > 1e-6  # the text saw the image in the pre-fusion
    e2 = e.copy()
    e2[-1] += 1.0
    comp3, text3 = llava_mini(v, e2, w, heads=4, kv_heads=2, compressor_heads=2)
    np.testing.assert_array_equal(comp3, comp)  # causal: the compressed tokens precede the text
    np.testing.assert_array_equal(text3[:-1], text[:-1])


def test_float32_in_float32_out():
    v, e = _inputs(dtype=np.float32)
    comp, text = llava_mini(v, e, _w(dtype=np.float32), heads=4, kv_heads=2, compressor_heads=2)
    assert comp.dtype == text.dtype == np.float32


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "change, error, words",
    [
        (lambda a: a | {"image_features": a["image_features"][:15]}, ValueError, "image_features"),
        (lambda a: a | {"weights": {**a["weights"], "compressor.query": np.ones((2, DV))}}, ValueError, "query"),
        (lambda a: a | {"text_embeds": a["text_embeds"][:, :20]}, ValueError, "text_embeds"),
        (lambda a: a | {"text_embeds": a["text_embeds"].astype(np.float32)}, TypeError, "text_embeds"),
        (lambda a: a | {"kv_heads": 3}, ValueError, "kv_heads"),
        (lambda a: a | {"heads": 5}, ValueError, "heads"),
        (lambda a: a | {"compressor_heads": 3}, ValueError, "compressor_heads"),
        (lambda a: a | {"rms_eps": 0.0}, ValueError, "rms_eps"),
        (lambda a: a | {"weights": {k: x for k, x in a["weights"].items() if "mm_projector.2" not in k}},
         ValueError, "missing"),
    ],
)  # fmt: skip
def test_bad_input_is_named(change, error, words):
    v, e = _inputs()
    args = change({"image_features": v, "text_embeds": e, "weights": _w(), "heads": 4, "kv_heads": 2,
                   "compressor_heads": 2})  # fmt: skip
    with pytest.raises(error, match=words):
        llava_mini(**args)


# ------------------------------------------------------------------------------------------------ torch parity
torch = pytest.importorskip("torch")
F = torch.nn.functional


@pytest.mark.parametrize("c, g", [(1, 4), (2, 4), (2, 5), (3, 7), (2, 2)])
def test_bicubic_resize_matches_torch(c, g):
    grid = np.random.default_rng(c * 10 + g).standard_normal((c, c, 6))
    want = F.interpolate(torch.from_numpy(grid).permute(2, 0, 1)[None], size=(g, g), mode="bicubic",
                         align_corners=False)[0].permute(1, 2, 0).numpy()  # fmt: skip
    np.testing.assert_allclose(bicubic_resize(grid, g, g), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("queries, n", [(1, 16), (4, 16), (4, 36), (9, 9)])
def test_compressor_matches_the_official_resampler_structure(queries, n):
    w = _w(queries=queries)
    v, _ = _inputs(n=n)
    mha = torch.nn.MultiheadAttention(DV, 2, batch_first=True).double()
    mha.load_state_dict({k[len("compressor.attn."):]: torch.from_numpy(x) for k, x in w.items()
                         if k.startswith("compressor.attn.")}, strict=True)  # fmt: skip
    ln_q, ln_kv = torch.nn.LayerNorm(DV).double(), torch.nn.LayerNorm(DV).double()
    ln_q.load_state_dict({"weight": torch.from_numpy(w["compressor.ln_q.weight"]),
                          "bias": torch.from_numpy(w["compressor.ln_q.bias"])})  # fmt: skip
    ln_kv.load_state_dict({"weight": torch.from_numpy(w["compressor.ln_kv.weight"]),
                           "bias": torch.from_numpy(w["compressor.ln_kv.bias"])})  # fmt: skip
    c = int(round(queries**0.5))
    pos = torch.from_numpy(sincos_2d(DV, c, c))  # the MAE table (checked against the formula elsewhere)
    s, g = c, int(round(n**0.5))
    pos_k = pos
    if s != g:  # get_abs_pos: bicubic resize of the query grid's table to the patch grid
        grid = pos.reshape(1, s, s, -1).permute(0, 3, 1, 2)
        pos_k = F.interpolate(grid, size=(g, g), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).flatten(0, 2)
    x = ln_kv(torch.from_numpy(v))
    q = ln_q(torch.from_numpy(w["compressor.query"]))
    with torch.no_grad():
        want = mha((q + pos)[None], (x + pos_k)[None], x[None])[0][0].numpy()
    np.testing.assert_allclose(compress(v, w, compressor_heads=2), want, rtol=1e-10, atol=1e-10)


def test_prefusion_matches_transformers_llama_layers():
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    layers, heads, kv_heads = 2, 4, 2
    w = _w(layers=layers, heads=heads, kv_heads=kv_heads)
    ffn = w["prefusion_layers.0.mlp.gate_proj.weight"].shape[0]
    config = LlamaConfig(hidden_size=D, intermediate_size=ffn, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         num_hidden_layers=layers, rms_norm_eps=1e-5, rope_theta=10000.0, vocab_size=8,
                         max_position_embeddings=128, attention_bias=False, mlp_bias=False)  # fmt: skip
    config._attn_implementation = "sdpa"  # the eager path takes its softmax in float32
    mods = torch.nn.ModuleList(LlamaDecoderLayer(config, layer_idx=i) for i in range(layers)).double()
    mods.load_state_dict({k[len("prefusion_layers."):]: torch.from_numpy(x) for k, x in w.items()
                          if k.startswith("prefusion_layers.")}, strict=True)  # fmt: skip
    rotary = LlamaRotaryEmbedding(config)
    for layer in mods:  # LlamaRMSNorm computes in float32 even for float64 input: run the same formula in float64
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.forward = lambda h, n=norm: n.weight * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
    v, e = _inputs(n=16, t=5)
    # the sequence [Proj(v); Proj(compress(v)); e], as encode_images_mini builds it
    wt = {k: torch.from_numpy(x) for k, x in w.items()}

    def proj(z):  # mlp2x_gelu
        h = F.gelu(torch.from_numpy(z) @ wt["mm_projector.0.weight"].T + wt["mm_projector.0.bias"])
        return h @ wt["mm_projector.2.weight"].T + wt["mm_projector.2.bias"]

    seq = torch.cat([proj(v), proj(compress(v, w, compressor_heads=2)), torch.from_numpy(e)])[None]
    length = seq.shape[1]
    pos_ids = torch.arange(length)[None]
    cos32, _ = rotary(seq, pos_ids)  # HF computes the table in float32: rebuild its definition in float64
    hd = D // heads
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    emb = torch.cat([pos_ids[0, :, None] * inv_freq] * 2, dim=-1)[None]
    cos, sin = emb.cos(), emb.sin()
    torch.testing.assert_close(cos32.double(), cos, rtol=0, atol=1e-5)  # the same table
    mask = torch.full((length, length), float("-inf"), dtype=torch.float64).triu(1)[None, None]
    with torch.no_grad():
        h = seq
        for layer in mods:
            out = layer(h, attention_mask=mask, position_ids=pos_ids, position_embeddings=(cos.double(), sin.double()))
            h = out[0] if isinstance(out, tuple) else out
    h = h[0].numpy()
    comp, text = llava_mini(v, e, w, heads=heads, kv_heads=kv_heads, compressor_heads=2)
    np.testing.assert_allclose(comp, h[16:17], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(text, h[17:], rtol=1e-9, atol=1e-9)
