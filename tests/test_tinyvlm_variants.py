"""Connector variants of the tiny VLM: shipped, checked against their base, run by the NumPy references, equal to
the torch connectors they were trained as, and toured."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from mllm_ref.oracle import registry
from mllm_ref.tinyvlm import tokenizer, world
from mllm_ref.tinyvlm.model import Trace, encode_tokens, prefill
from mllm_ref.tinyvlm.plugs import Plugs
from mllm_ref.tinyvlm.variants import (
    PREFIX,
    VARIANTS_DIR,
    available,
    connector_flops,
    connector_inputs,
    load_variant,
)

#: The variants the connectors issue ships, with the visual tokens each feeds the decoder.
SHIPPED = {"qformer16": 16, "qformer32": 32, "resampler32": 32, "ldp": 36}


@pytest.fixture(scope="module")
def variants(model):
    return {name: load_variant(name, model) for name in SHIPPED}


@pytest.fixture(scope="module")
def example():
    return world.vqa_set(world.EVAL_SEED, 2)[1]


def test_every_variant_is_shipped_with_its_manifest(model):
    assert set(SHIPPED) <= set(available())
    for name in SHIPPED:
        m = json.loads((VARIANTS_DIR / name / "manifest.json").read_text())
        assert m["base_sha256"] == model.manifest["sha256"]
        assert m["visual_tokens"] == SHIPPED[name]
        assert "train_connector" in m["command"] and m["history"] and 0 <= m["eval"]["accuracy"] <= 1


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_the_decoder_reads_the_variant_tokens_and_the_rest_is_the_base(variants, model, example, name):
    v = variants[name]
    assert v.config == model.config and v.connector["name"] == name
    assert all(np.array_equal(v[k], model[k]) for k in model.params)  # encoder and decoder untouched
    tokens, _, _ = encode_tokens(v, example.image)
    assert tokens.x.shape == (SHIPPED[name], model.config.dim) and tokens.x.dtype == np.float32
    trace = Trace()
    ids = tokenizer.prompt_ids(example.qa.question)
    logits, _ = prefill(v, example.image, ids, Plugs(), trace)
    assert np.isfinite(logits).all() and trace.n_visual == SHIPPED[name]
    assert trace.layer_tokens == [SHIPPED[name] + len(ids)] * model.config.layers


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_the_numpy_reference_equals_the_trained_torch_connector(variants, model, name):
    torch = pytest.importorskip("torch")
    from kernels_torch.tinyvlm.connectors import build
    from kernels_torch.tinyvlm.model import TinyVLM as TorchVLM

    v = variants[name]
    cfg = model.config
    conn = build(v.connector["kind"], v.connector["args"], cfg.vis_dim, cfg.dim, cfg.grid)
    conn.load_state_dict({k[len(PREFIX) :]: torch.from_numpy(a) for k, a in v.params.items() if k.startswith(PREFIX)})
    twin = TorchVLM(cfg)
    twin.load_state_dict({k: torch.from_numpy(a) for k, a in model.params.items()})
    images = [e.image for e in world.vqa_set(world.EVAL_SEED, 3)]
    with torch.no_grad():
        feats = twin.vision_features(torch.from_numpy(np.stack(images).astype(np.float32) / 255.0))
        want = conn(feats).numpy()
    for img, w in zip(images, want):
        got = encode_tokens(v, img)[0].x
        assert np.abs(got - w).max() <= 1e-5 * max(1.0, np.abs(w).max())


@pytest.mark.parametrize("kind", ["qformer", "resampler", "ldp"])
def test_the_torch_training_connectors_are_what_the_references_compute(model, example, kind):
    """Independent of the shipped weights: a randomly initialised torch connector, loaded into the NumPy model by
    its parameter names, gives the same visual tokens (the names and the structure agree)."""
    torch = pytest.importorskip("torch")
    from dataclasses import replace

    from kernels_torch.tinyvlm.connectors import build
    from kernels_torch.tinyvlm.model import TinyVLM as TorchVLM
    from kernels_torch.tinyvlm.train_connector import DEFAULTS

    torch.manual_seed(1)
    cfg = model.config
    conn = build(kind, DEFAULTS[kind], cfg.vis_dim, cfg.dim, cfg.grid)
    for p in conn.parameters():  # away from the init's zeros and ones, so that every parameter matters
        p.data.add_(0.1 * torch.randn_like(p))
    params = {PREFIX + k: v.detach().numpy().copy() for k, v in conn.state_dict().items()}
    spec = {"name": kind, "kind": kind, "args": DEFAULTS[kind]}
    v = replace(model, params={**model.params, **params}, connector=spec)
    twin = TorchVLM(cfg)
    twin.load_state_dict({k: torch.from_numpy(a) for k, a in model.params.items()})
    image = torch.from_numpy(example.image.astype(np.float32)[None] / 255.0)
    with torch.no_grad():
        want = conn(twin.vision_features(image))[0].numpy()
    got = encode_tokens(v, example.image)[0].x
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


def test_patch_maps_say_what_each_token_carries(variants, example):
    q = encode_tokens(variants["qformer16"], example.image)[0]
    assert np.all(q.source == -1) and np.all(q.size == 1)  # a query reads every patch; none carries one patch
    ldp = encode_tokens(variants["ldp"], example.image)[0]
    grid = ldp.source.reshape(12, 12)
    assert np.array_equal(grid[::2, ::2], np.arange(36).reshape(6, 6))  # 2 x 2 windows, row-major
    assert np.array_equal(grid[1::2, 1::2], grid[::2, ::2]) and np.all(ldp.size == 4)


def test_connector_flops_come_from_the_registered_cost_models(variants, model):
    for name, v in variants.items():
        tid, kw = connector_inputs(v, np.zeros((model.config.n_patches, model.config.vis_dim), np.float32))
        base = registry.get(tid).cost(kw)["flops"]
        extra = 0 if name == "ldp" else 2.0 * SHIPPED[name] * model.config.dim * v[PREFIX + "proj.weight"].shape[1]
        assert connector_flops(v) == pytest.approx(base + extra) and base > 0


def test_a_variant_refuses_another_base_a_tampered_file_and_merged_encoder_tokens(tmp_path, model, example):
    from mllm_ref.tokens.tome import ToMePolicy

    folder = tmp_path / "qformer16"
    shutil.copytree(VARIANTS_DIR / "qformer16", folder)
    m = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**m, "base_sha256": "0" * 64}))
    with pytest.raises(ValueError, match="another base model"):
        load_variant("qformer16", model, folder=folder)
    (folder / "manifest.json").write_text(json.dumps({**m, "sha256": "0" * 64}))
    with pytest.raises(ValueError, match="sha256"):
        load_variant("qformer16", model, folder=folder)
    with pytest.raises(FileNotFoundError, match="shipped"):
        load_variant("no_such_variant", model)
    v = load_variant("qformer16", model)
    with pytest.raises(ValueError, match="connector variant needs all 144"):
        prefill(v, example.image, tokenizer.prompt_ids(example.qa.question), Plugs(token_policy=ToMePolicy(24)))


def test_the_tour_has_a_row_per_connector_variant(model):
    from mllm_ref.tinyvlm.tour import run_tour

    rows = run_tour(model, only="connectors", n_per_type=2, n_captions=0)
    got = {(r["id"], r["visual_tokens"]) for r in rows}
    assert got == {("baseline", 144), ("connectors.qformer", 16), ("connectors.qformer", 32),
                   ("connectors.perceiver_resampler", 32), ("connectors.ldp", 36)}  # the baseline is the MLP
    q16 = next(r for r in rows if r["id"] == "connectors.qformer" and r["visual_tokens"] == 16)
    assert q16["llm_prefill_flops_ratio"] < 0.3  # 16 + P tokens instead of 144 + P in every decoder layer


def test_query_maps_show_where_each_query_looks(variants, example):
    from mllm_ref.tinyvlm.variants import query_maps

    maps = query_maps(variants["qformer16"], example.image)
    assert maps.shape == (2, 16, 144)  # cross-attention in both layers (frequency 1)
    np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="Q-Former variant"):
        query_maps(variants["ldp"], example.image)


def test_the_complexity_table_grows_as_the_orders_say(model):
    from mllm_ref.connectors import costs

    rows = {r["kind"]: r for r in costs.table(model)}
    assert set(rows) == set(costs.ORDERS)
    # query-based connectors and dense cross-attention: linear in N; a projector feeding every token to the LLM:
    # faster than linear (the LLM's attention is quadratic)
    for kind in ("qformer16", "qformer32", "resampler32", "cross_attention"):
        assert abs(rows[kind]["growth"] - 1.0) < 0.02, (kind, rows[kind]["growth"])
    assert 1.2 < rows["mlp"]["growth"] < 2.0 and 1.05 < rows["ldp"]["growth"] < rows["mlp"]["growth"]
    # the LLM's share: constant for the query-based ones (K tokens whatever N), text only for cross-attention
    assert costs.counted_flops("qformer16", 576, model)[1] == costs.counted_flops("qformer16", 2304, model)[1]
    from mllm_ref.system.complexity import prefill_cost
    from mllm_ref.system.specs import spec_from_tinyvlm

    assert rows["cross_attention"]["llm_flops"] == prefill_cost(spec_from_tinyvlm(model.config), 0, 6).flops
    assert rows["qformer16"]["llm_flops"] < rows["ldp"]["llm_flops"] < rows["mlp"]["llm_flops"]
    with pytest.raises(ValueError, match="square"):
        costs.counted_flops("ldp", 150, model)
