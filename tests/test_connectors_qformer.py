"""Tests of the BLIP-2 Q-Former reference (mllm_ref.connectors.qformer) and the NumPy safetensors reader.

(a) Parity with Hugging Face transformers' ``Blip2QFormerModel``: a small random model is saved with
    ``safetensors.torch.save_file``, read back with our NumPy reader and run by both on the same inputs. The bound
    is ``max|ours - hf| <= 1e-5 * max(1, max|hf|)`` in float32 (outputs are LayerNorm-ed, of size ~1-3; float32
    rounding over a few layers is ~1e-6). Covered: cross_attention_frequency 1 and 2, an image attention mask
    (HF ``encoder_attention_mask``), and text tokens under all three stage-1 masks (HF takes the concatenated
    ``[queries; text]`` with ``query_length``; ITM is its default bidirectional mask, ITC and ITG are given to HF as
    a 4-D additive mask built from our ``stage1_mask``).
(b) Properties: output shape independent of the number of image tokens, permutation invariance over image tokens,
    masked image tokens have no influence, stage-1 mask structure, text never sees the image directly.
(c) Bad input: missing / unexpected weight keys, wrong shapes, NaN, cross_attention_frequency inconsistent with the
    weights, an all-False image mask; malformed safetensors files.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from mllm_ref.connectors.qformer import (
    KINDS,
    _make,
    cross_attention_maps,
    qformer,
    random_weights,
    self_attention_blocks,
    stage1_mask,
    strip_prefix,
)
from mllm_ref.connectors.safetensors_io import load_safetensors

HF_TOL = 1e-5


def _small_case(rng, *, q=4, h=16, heads=4, i_sz=32, e=12, n=9, layers=3, freq=2, t=0, kind="itm", masked=0,
                dtype=np.float64):  # fmt: skip
    return _make(q, h, heads, i_sz, e, n, layers, freq, t, kind, masked, rng, dtype)


# ------------------------------------------------------------------------------------------------ (a) HF parity
def _hf_model(layers, freq, text, seed=0):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.Blip2QFormerConfig(
        hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=48,
        encoder_hidden_size=24, cross_attention_frequency=freq, use_qformer_text_input=text,
    )  # fmt: skip
    cfg._attn_implementation = "eager"
    model = transformers.Blip2QFormerModel(cfg).eval()
    # HF initialises LayerNorms to (1, 0) and biases to 0: randomise them so that every parameter is exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif "LayerNorm" in name or name.startswith("layernorm"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 1.0 / np.sqrt(p.shape[1]))
    return model


def _saved_weights(model, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "qformer.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return load_safetensors(path)


def _assert_close_to_hf(ours, hf):
    scale = max(1.0, float(np.abs(hf).max()))
    err = float(np.abs(ours.astype(np.float64) - hf).max())
    assert err <= HF_TOL * scale, f"max abs error {err:.3g} > {HF_TOL} * {scale:.3g}"


@pytest.mark.parametrize("freq,layers", [(1, 2), (2, 3), (2, 4)])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_hf_blip2_qformer(tmp_path, freq, layers, masked):
    torch = pytest.importorskip("torch")
    model = _hf_model(layers, freq, text=False, seed=freq * 10 + layers)
    weights = _saved_weights(model, tmp_path)
    assert all(v.dtype == np.float32 for v in weights.values())
    rng = np.random.default_rng(layers)
    qe = rng.standard_normal((6, 32)).astype(np.float32)
    img = rng.standard_normal((11, 24)).astype(np.float32)
    mask = None
    kwargs = {}
    if masked:
        mask = np.ones(11, dtype=bool)
        mask[[1, 4, 9]] = False
        kwargs["encoder_attention_mask"] = torch.from_numpy(mask[None].astype(np.int64))
    with torch.no_grad():
        hf = model(
            query_embeds=torch.from_numpy(qe[None]), encoder_hidden_states=torch.from_numpy(img[None]), **kwargs
        ).last_hidden_state[0].numpy()
    ours = qformer(qe, img, weights, num_heads=4, cross_attention_frequency=freq, image_mask=mask)
    assert ours.shape == (6, 32) and ours.dtype == np.float32
    _assert_close_to_hf(ours, hf)


@pytest.mark.parametrize("kind", KINDS)
def test_text_path_matches_hf_with_stage1_masks(tmp_path, kind):
    torch = pytest.importorskip("torch")
    model = _hf_model(3, 2, text=True, seed=7)
    weights = _saved_weights(model, tmp_path)
    rng = np.random.default_rng(3)
    q, t = 5, 4
    qe = rng.standard_normal((q, 32)).astype(np.float32)
    te = rng.standard_normal((t, 32)).astype(np.float32)
    img = rng.standard_normal((8, 24)).astype(np.float32)
    kwargs = {}
    if kind != "itm":  # HF returns a 4-D additive mask as given (masking_utils.create_bidirectional_mask)
        allowed = stage1_mask(q, t, kind)
        add = np.where(allowed, 0.0, np.finfo(np.float32).min).astype(np.float32)
        kwargs["attention_mask"] = torch.from_numpy(add[None, None])
    with torch.no_grad():
        hf = model(
            query_embeds=torch.from_numpy(np.concatenate([qe, te])[None]), query_length=q,
            encoder_hidden_states=torch.from_numpy(img[None]), **kwargs,
        ).last_hidden_state[0].numpy()  # fmt: skip
    ours = qformer(qe, img, weights, num_heads=4, text_embeds=te, attention_kind=kind)
    assert ours.shape == (q + t, 32)
    _assert_close_to_hf(ours, hf)


def test_hf_parent_model_names_via_strip_prefix():
    sd = {"qformer.layernorm.weight": 1, "qformer.encoder.layer.0.x": 2, "vision_model.y": 3}
    assert strip_prefix(sd) == {"layernorm.weight": 1, "encoder.layer.0.x": 2}


# ------------------------------------------------------------------------------------------ safetensors reader
def test_load_safetensors_matches_the_safetensors_package(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.numpy import save_file as np_save
    from safetensors.torch import save_file as torch_save

    rng = np.random.default_rng(0)
    arrays = {
        "f32": rng.standard_normal((3, 4)).astype(np.float32),
        "f64": rng.standard_normal(5),
        "f16": rng.standard_normal((2, 3)).astype(np.float16),
        "i64": rng.integers(-(2**40), 2**40, (4,)),
        "i32": rng.integers(-100, 100, (2, 2)).astype(np.int32),
        "u8": rng.integers(0, 255, (7,)).astype(np.uint8),
        "b": rng.random(6) > 0.5,
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }
    path = tmp_path / "a.safetensors"
    np_save(arrays, str(path), metadata={"format": "np"})
    got = load_safetensors(path)
    assert set(got) == set(arrays)
    for k, v in arrays.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        np.testing.assert_array_equal(got[k], v)
        assert got[k].flags.writeable and got[k].flags.owndata

    bf = torch.randn(3, 5, dtype=torch.float32).to(torch.bfloat16)
    path2 = tmp_path / "b.safetensors"
    torch_save({"bf16": bf, "f32": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, str(path2))
    got2 = load_safetensors(str(path2))
    assert got2["bf16"].dtype == np.float32
    np.testing.assert_array_equal(got2["bf16"], bf.float().numpy())  # widening is exact
    np.testing.assert_array_equal(got2["f32"], np.arange(6, dtype=np.float32).reshape(2, 3))


def _write_raw(path, header: dict, buffer: bytes):
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + buffer)


@pytest.mark.parametrize(
    "header,buffer,match",
    [
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 8, "bytes for shape"),
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "outside"),
        ({"x": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8, "unsupported dtype"),
        ({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "shape"),
        ({"x": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "data_offsets"),
        ([1, 2], b"", "JSON object"),
    ],
)
def test_load_safetensors_rejects_malformed_files(tmp_path, header, buffer, match):
    path = tmp_path / "bad.safetensors"
    _write_raw(path, header, buffer)
    with pytest.raises(ValueError, match=match):
        load_safetensors(path)


def test_load_safetensors_rejects_truncated_header(tmp_path):
    path = tmp_path / "t.safetensors"
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(ValueError, match="header length"):
        load_safetensors(path)
    path.write_bytes(b"abc")
    with pytest.raises(ValueError, match="too short"):
        load_safetensors(path)
    with pytest.raises(TypeError, match="path"):
        load_safetensors(3)


# -------------------------------------------------------------------------------------------- (b) properties
def test_output_shape_independent_of_image_tokens():
    rng = np.random.default_rng(1)
    kw = _small_case(rng)
    for n in (1, 9, 40):
        img = rng.standard_normal((n, 12))
        out = qformer(**{**kw, "image_embeds": img})
        assert out.shape == (4, 16) and out.dtype == np.float64


@pytest.mark.parametrize("masked", [0, 3])
def test_permutation_invariance_over_image_tokens(masked):
    rng = np.random.default_rng(2)
    kw = _small_case(rng, masked=masked, t=3, kind="itg")
    perm = rng.permutation(kw["image_embeds"].shape[0])
    assert not np.array_equal(perm, np.arange(perm.size))
    moved = {**kw, "image_embeds": kw["image_embeds"][perm]}
    if kw["image_mask"] is not None:
        moved["image_mask"] = kw["image_mask"][perm]
    np.testing.assert_allclose(qformer(**moved), qformer(**kw), rtol=0, atol=1e-12)
    # ...but not to a permutation of the queries' order against the weights: permuting queries permutes rows.
    qperm = rng.permutation(4)
    out_q = qformer(**{**kw, "query_embeds": kw["query_embeds"][qperm]})
    if kw["attention_kind"] == "itg":  # queries see all queries: their outputs permute with them
        np.testing.assert_allclose(out_q[:4], qformer(**kw)[:4][qperm], rtol=0, atol=1e-12)


def test_masked_image_tokens_have_no_influence():
    rng = np.random.default_rng(3)
    kw = _small_case(rng, masked=4)
    base = qformer(**kw)
    img = kw["image_embeds"].copy()
    img[~kw["image_mask"]] = 1e3 * rng.standard_normal(img[~kw["image_mask"]].shape)
    np.testing.assert_array_equal(qformer(**{**kw, "image_embeds": img}), base)
    # Equivalent to dropping the masked tokens.
    kept = kw["image_mask"]
    dropped = qformer(**{**kw, "image_embeds": kw["image_embeds"][kept], "image_mask": None})
    np.testing.assert_allclose(dropped, base, rtol=0, atol=1e-12)
    # ...and a visible token does change the output (the test can fail).
    img2 = kw["image_embeds"].copy()
    img2[np.flatnonzero(kept)[0]] += rng.standard_normal(img2.shape[1])
    assert np.abs(qformer(**{**kw, "image_embeds": img2}) - base).max() > 1e-6


def test_stage1_mask_structure():
    q, t = 3, 4
    itm, itc, itg = (stage1_mask(q, t, k) for k in KINDS)
    assert itm.all() and itm.shape == (7, 7) and itm.dtype == bool
    assert itc[:q, :q].all() and itc[q:, q:].all() and not itc[:q, q:].any() and not itc[q:, :q].any()
    assert itg[:q, :q].all() and not itg[:q, q:].any() and itg[q:, :q].all()
    np.testing.assert_array_equal(itg[q:, q:], np.tril(np.ones((t, t), dtype=bool)))
    for m in (itm, itc, itg):
        assert m.diagonal().all()  # every row sees itself: no empty softmax row
    # The attention blocks cover exactly the allowed pairs.
    for kind in KINDS:
        rebuilt = np.zeros((q + t, q + t), dtype=bool)
        for rows, keys, causal in self_attention_blocks(q, t, kind):
            nr, nk = rows.stop - rows.start, keys.stop - keys.start
            block = np.ones((nr, nk), dtype=bool)
            if causal:
                block = np.arange(nk)[None, :] <= (nk - nr) + np.arange(nr)[:, None]
            rebuilt[rows, keys] = block
        np.testing.assert_array_equal(rebuilt, stage1_mask(q, t, kind), err_msg=kind)
    with pytest.raises(ValueError, match="kind"):
        stage1_mask(2, 2, "causal")


def test_stage1_semantics_in_the_forward():
    rng = np.random.default_rng(4)
    kw = _small_case(rng, t=4, kind="itg")
    base = qformer(**kw)
    # ITG/ITC: queries never see text, so changing the text leaves the query outputs unchanged.
    te2 = kw["text_embeds"].copy()
    te2[-1] += rng.standard_normal(16)  # not a constant: the input LayerNorm would remove it
    for kind in ("itg", "itc"):
        a = qformer(**{**kw, "attention_kind": kind})
        b = qformer(**{**kw, "attention_kind": kind, "text_embeds": te2})
        np.testing.assert_array_equal(a[:4], b[:4])
    # ITG causal: changing the last text token leaves earlier text outputs unchanged, changes the last one.
    b = qformer(**{**kw, "text_embeds": te2})
    np.testing.assert_array_equal(b[:7], base[:7])
    assert np.abs(b[7] - base[7]).max() > 1e-6
    # ITC: text never sees the image (not even through the queries); ITG: it does, through the queries.
    img2 = kw["image_embeds"] + rng.standard_normal(kw["image_embeds"].shape)
    itc_a = qformer(**{**kw, "attention_kind": "itc"})
    itc_b = qformer(**{**kw, "attention_kind": "itc", "image_embeds": img2})
    np.testing.assert_array_equal(itc_a[4:], itc_b[4:])
    assert np.abs(qformer(**{**kw, "image_embeds": img2})[4:] - base[4:]).max() > 1e-6
    # ITM: queries see the text.
    itm_a = qformer(**{**kw, "attention_kind": "itm"})
    itm_b = qformer(**{**kw, "attention_kind": "itm", "text_embeds": te2})
    assert np.abs(itm_a[:4] - itm_b[:4]).max() > 1e-6


def test_no_text_output_is_queries_only_and_kind_irrelevant():
    rng = np.random.default_rng(5)
    kw = _small_case(rng)
    outs = [qformer(**{**kw, "attention_kind": k}) for k in KINDS]
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])


def test_float32_close_to_float64():
    rng = np.random.default_rng(6)
    kw = _small_case(rng, t=3, kind="itc", masked=2)
    out64 = qformer(**kw)
    kw32 = {k: v.astype(np.float32) if isinstance(v, np.ndarray) and v.dtype == np.float64 else v
            for k, v in kw.items()}  # fmt: skip
    kw32["weights"] = {k: v.astype(np.float32) for k, v in kw["weights"].items()}
    out32 = qformer(**kw32)
    assert out32.dtype == np.float32
    assert np.abs(out32 - out64).max() <= 1e-5 * np.abs(out64).max()


# --------------------------------------------------------------------------------------------- (c) bad input
@pytest.fixture
def case():
    return _small_case(np.random.default_rng(7), t=2, masked=1)


def test_missing_weight_key_is_named(case):
    w = dict(case["weights"])
    del w["encoder.layer.1.output_query.LayerNorm.bias"]
    with pytest.raises(ValueError, match=r"missing the key 'encoder\.layer\.1\.output_query\.LayerNorm\.bias'"):
        qformer(**{**case, "weights": w})
    w = dict(case["weights"])
    del w["encoder.layer.2.intermediate.dense.weight"]  # the text FFN is needed when there is text
    with pytest.raises(ValueError, match=r"encoder\.layer\.2\.intermediate\.dense\.weight"):
        qformer(**{**case, "weights": w})
    # ...but not without text.
    qformer(**{**case, "weights": w, "text_embeds": None})


def test_wrong_weight_shape_and_dtype(case):
    w = dict(case["weights"])
    w["encoder.layer.0.crossattention.attention.key.weight"] = np.zeros((16, 13))
    with pytest.raises(ValueError, match=r"crossattention\.attention\.key\.weight.*image_embeds"):
        qformer(**{**case, "weights": w})
    w = dict(case["weights"])
    w["layernorm.bias"] = w["layernorm.bias"].astype(np.float32)
    with pytest.raises(TypeError, match=r"layernorm\.bias"):
        qformer(**{**case, "weights": w})
    w = dict(case["weights"])
    w["layernorm.weight"] = w["layernorm.weight"].tolist()
    with pytest.raises(TypeError, match=r"layernorm\.weight"):
        qformer(**{**case, "weights": w})
    with pytest.raises(TypeError, match="weights"):
        qformer(**{**case, "weights": list(case["weights"].items())})


def test_nan_in_weights_or_inputs(case):
    w = dict(case["weights"])
    bad = w["encoder.layer.1.attention.attention.value.weight"].copy()
    bad[2, 3] = np.nan
    w["encoder.layer.1.attention.attention.value.weight"] = bad
    with pytest.raises(ValueError, match=r"attention\.value\.weight.*NaN"):
        qformer(**{**case, "weights": w})
    for name in ("query_embeds", "image_embeds", "text_embeds"):
        arr = case[name].copy()
        arr[0, 0] = np.inf
        with pytest.raises(ValueError, match=name):
            qformer(**{**case, name: arr})


def test_unexpected_keys_and_frequency_mismatch(case):
    with pytest.raises(ValueError, match="cross_attention_frequency"):
        qformer(**{**case, "cross_attention_frequency": 1})
    w = {**case["weights"], "encoder.layer.0.attention.attention.qkv.weight": np.zeros((3, 3))}
    with pytest.raises(ValueError, match="unexpected key"):
        qformer(**{**case, "weights": w})
    w = {k: v for k, v in case["weights"].items() if not k.startswith("encoder.")}
    with pytest.raises(ValueError, match="encoder.layer"):
        qformer(**{**case, "weights": w})


def test_bad_masks_heads_and_shapes(case):
    with pytest.raises(ValueError, match="image_mask"):
        qformer(**{**case, "image_mask": np.zeros(9, dtype=bool)})
    with pytest.raises(ValueError, match="image_mask"):
        qformer(**{**case, "image_mask": np.ones(8, dtype=bool)})
    with pytest.raises(TypeError, match="image_mask"):
        qformer(**{**case, "image_mask": np.ones(9)})
    with pytest.raises(ValueError, match="num_heads"):
        qformer(**{**case, "num_heads": 3})
    with pytest.raises(ValueError, match="text_embeds"):
        qformer(**{**case, "text_embeds": np.zeros((2, 15))})
    with pytest.raises(ValueError, match="query_embeds"):
        qformer(**{**case, "query_embeds": np.zeros((4, 17))})
    with pytest.raises(ValueError, match="attention_kind"):
        qformer(**{**case, "attention_kind": "causal"})
    with pytest.raises(ValueError, match="eps"):
        qformer(**{**case, "eps": 0.0})
    with pytest.raises(TypeError, match="query_embeds"):
        qformer(**{**case, "query_embeds": case["query_embeds"].astype(np.float16)})


def test_random_weights_is_a_complete_state_dict():
    w = random_weights(np.random.default_rng(0), hidden=8, intermediate=4, encoder_hidden=3, n_layers=3)
    assert sum(k.startswith("encoder.layer.1.crossattention") for k in w) == 0
    assert sum(k.startswith("encoder.layer.2.crossattention") for k in w) == 10


@pytest.mark.parametrize("freq, layers", [(1, 3), (2, 3), (2, 4)])
def test_cross_attention_maps_are_the_forward_s_weights(freq, layers):
    """One map per cross-attention layer; each row a distribution over the unmasked image tokens; permuting the
    image tokens permutes the maps' last axis; and a one-layer Q-Former's map is the softmax of its own scores."""
    rng = np.random.default_rng(5)
    kw = _small_case(rng, layers=layers, freq=freq, masked=2)
    args = {k: kw[k] for k in ("query_embeds", "image_embeds", "weights", "num_heads", "cross_attention_frequency",
                               "image_mask")}  # fmt: skip
    maps = cross_attention_maps(**args)
    assert maps.shape == (len(range(0, layers, freq)), kw["num_heads"], 4, kw["image_embeds"].shape[0])
    np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-12)
    assert np.all(maps[..., ~kw["image_mask"]] == 0)
    perm = rng.permutation(kw["image_embeds"].shape[0])
    moved = cross_attention_maps(**{**args, "image_embeds": kw["image_embeds"][perm], "image_mask": kw["image_mask"][perm]})
    np.testing.assert_allclose(moved, maps[..., perm], atol=1e-12)
    # layer 0 by hand: LN_in(queries) -> self-attention block -> cross-attention scores
    one = {k: v for k, v in kw["weights"].items() if not k.startswith("encoder.layer.") or k.startswith("encoder.layer.0.")}
    w = one
    from mllm_ref.nn.layernorm import layernorm

    def lin(x, p):
        return x @ w[p + ".weight"].T + w[p + ".bias"]

    def ln(x, p):
        return layernorm(x, w[p + ".weight"], w[p + ".bias"], eps=1e-12)

    def mha(q, k, v, nh, mask=None):
        d = q.shape[1] // nh
        qh, kh, vh = (a.reshape(a.shape[0], nh, d).transpose(1, 0, 2) for a in (q, k, v))
        s = qh @ kh.transpose(0, 2, 1) / np.sqrt(d)
        if mask is not None:
            s = np.where(mask[None, None], s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        return (p @ vh).transpose(1, 0, 2).reshape(q.shape[0], -1), p

    nh, p0 = kw["num_heads"], "encoder.layer.0."
    x = ln(kw["query_embeds"], "layernorm")
    sa, _ = mha(lin(x, p0 + "attention.attention.query"), lin(x, p0 + "attention.attention.key"),
                lin(x, p0 + "attention.attention.value"), nh)  # fmt: skip
    a = ln(lin(sa, p0 + "attention.output.dense") + x, p0 + "attention.output.LayerNorm")
    img = kw["image_embeds"]
    _, want = mha(lin(a, p0 + "crossattention.attention.query"), lin(img, p0 + "crossattention.attention.key"),
                  lin(img, p0 + "crossattention.attention.value"), nh, kw["image_mask"])  # fmt: skip
    got = cross_attention_maps(**{**args, "weights": one})
    np.testing.assert_allclose(got[0], want, atol=1e-10)
