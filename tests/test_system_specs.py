"""Model shapes: the published configurations, their parameter counts, the tiny VLM's spec, and validation."""

from __future__ import annotations

import dataclasses
import types

import pytest

from mllm_ref.system import memory, specs
from mllm_ref.system.specs import ConnectorSpec, DecoderSpec, ModelSpec, VisionSpec

TINY_CFG = dict(image_size=48, patch_size=4, channels=3, vis_dim=64, vis_layers=3, vis_heads=4, vis_mlp=256,
                proj_hidden=128, dim=128, layers=4, heads=4, kv_heads=2, head_dim=32, ffn_dim=352,
                vocab_size=42)  # fmt: skip


def test_published_shapes():
    llava = specs.LLAVA_15_7B
    assert (llava.vision.n_tokens, llava.vision.n_patches, llava.n_visual) == (577, 576, 576)
    assert llava.decoder.heads * llava.decoder.head_dim == llava.decoder.dim == 4096
    qwen = specs.QWEN2_VL_2B
    assert (qwen.vision.n_tokens, qwen.n_visual, qwen.decoder.kv_heads) == (1024, 256, 2)
    assert qwen.connector.in_dim == 4 * qwen.vision.dim
    mobile = specs.MOBILEVLM_1_7B
    assert (mobile.connector.tokens_in, mobile.n_visual) == (576, 144)
    assert set(specs.PUBLISHED) == {"LLaVA-1.5-7B", "Qwen2-VL-2B", "MobileVLM-1.7B"}


@pytest.mark.parametrize(
    "spec, billions",
    [(specs.LLAVA_15_7B, 7.06), (specs.QWEN2_VL_2B, 2.21), (specs.MOBILEVLM_1_7B, 1.7)],
    ids=["llava-7b", "qwen2vl-2b", "mobilevlm-1.7b"],
)
def test_published_parameter_counts(spec, billions):
    assert memory.param_count(spec)["total"] / 1e9 == pytest.approx(billions, rel=0.03)


def test_parameter_counts_by_part():
    llava = memory.param_count(specs.LLAVA_15_7B)
    assert llava["vision"] / 1e6 == pytest.approx(303.5, rel=0.01)  # CLIP ViT-L/14-336 vision tower
    assert llava["connector"] == 1024 * 4096 + 4096 + 4096 * 4096 + 4096  # 20.98M
    assert llava["decoder"] == 6_738_415_616  # LLaMA-2-7B / Vicuna-7B v1.5, exactly
    assert llava["total"] == 7_062_902_784
    qwen = memory.param_count(specs.QWEN2_VL_2B)
    assert qwen["decoder"] == 1_543_714_304  # Qwen2-1.5B with tied embeddings, exactly
    assert qwen["vision"] + qwen["connector"] == pytest.approx(675e6, rel=0.02)  # "675M ViT" of the Qwen2-VL paper
    mobile = memory.param_count(specs.MOBILEVLM_1_7B)
    assert mobile["decoder"] / 1e9 == pytest.approx(1.36, rel=0.01)  # MobileLLaMA-1.4B
    assert mobile["connector"] / 1e6 == pytest.approx(18.9, rel=0.01)  # LDP
    for pc in (llava, qwen, mobile):
        assert pc["total"] == pc["vision"] + pc["connector"] + pc["decoder"]


def test_tiny_vlm_parameter_count():
    spec = specs.spec_from_tinyvlm(types.SimpleNamespace(**TINY_CFG))
    assert memory.param_count(spec)["total"] == 936_448  # the torch model's count (next test)


def test_tiny_vlm_parameter_count_matches_the_torch_weights():
    pytest.importorskip("torch")
    from kernels_torch.tinyvlm.model import TinyVLM, param_count

    from mllm_ref.tinyvlm.config import TinyVLMConfig

    cfg = TinyVLMConfig()
    assert memory.param_count(specs.spec_from_tinyvlm(cfg))["total"] == param_count(TinyVLM(cfg))


def test_spec_from_tinyvlm_reads_attributes_only():
    spec = specs.spec_from_tinyvlm(types.SimpleNamespace(**TINY_CFG))
    assert (spec.vision.n_tokens, spec.vision.cls_tokens, spec.n_visual) == (144, 0, 144)
    assert (spec.connector.kind, spec.connector.mlp_dims) == ("mlp", (64, 128, 128))
    d = spec.decoder
    assert (d.layers, d.dim, d.heads, d.kv_heads, d.head_dim, d.ffn_dim, d.vocab) == (4, 128, 4, 2, 32, 352, 42)
    assert d.gated_ffn and not d.tied_embeddings and not spec.vision.gated_mlp
    no_head_dim = {k: v for k, v in TINY_CFG.items() if k != "head_dim"}
    assert specs.spec_from_tinyvlm(types.SimpleNamespace(**no_head_dim)) == spec


def test_spec_from_tinyvlm_bad_config():
    missing = {k: v for k, v in TINY_CFG.items() if k != "vis_mlp"}
    with pytest.raises(TypeError, match="vis_mlp"):
        specs.spec_from_tinyvlm(types.SimpleNamespace(**missing))
    with pytest.raises(TypeError, match="cfg.vis_dim"):
        specs.spec_from_tinyvlm(types.SimpleNamespace(**{**TINY_CFG, "vis_dim": 64.0}))
    with pytest.raises(ValueError, match="cfg.layers"):
        specs.spec_from_tinyvlm(types.SimpleNamespace(**{**TINY_CFG, "layers": 0}))
    with pytest.raises(ValueError, match="cfg.image_size"):
        specs.spec_from_tinyvlm(types.SimpleNamespace(**{**TINY_CFG, "image_size": 50}))


def test_qwen2_vl_resolution():
    assert specs.qwen2_vl_2b() == dataclasses.replace(specs.QWEN2_VL_2B, name="Qwen2-VL-2B@448x448")
    wide = specs.qwen2_vl_2b(448, 672)
    assert (wide.vision.n_tokens, wide.n_visual, wide.vision.grid) == (1536, 384, (32, 48))
    assert memory.param_count(wide) == memory.param_count(specs.QWEN2_VL_2B)  # no learned position table
    assert specs.qwen2_vl_2b(28).n_visual == 1
    with pytest.raises(ValueError, match="height"):
        specs.qwen2_vl_2b(450)
    with pytest.raises(ValueError, match="width"):
        specs.qwen2_vl_2b(448, 100)
    with pytest.raises(TypeError, match="height"):
        specs.qwen2_vl_2b(448.0)


def test_specs_are_frozen_and_checked():
    with pytest.raises(dataclasses.FrozenInstanceError):
        specs.LLAVA_15_7B.decoder.layers = 3  # type: ignore[misc]
    v = dict(image_size=32, patch_size=8, channels=3, dim=16, layers=1, heads=2, mlp_dim=32, n_tokens=16)
    assert VisionSpec(**v).n_patches == 16
    with pytest.raises(ValueError, match="VisionSpec.dim"):
        VisionSpec(**{**v, "dim": 0})
    with pytest.raises(ValueError, match="VisionSpec.heads"):
        VisionSpec(**{**v, "heads": 3})
    with pytest.raises(ValueError, match="VisionSpec.n_tokens"):
        VisionSpec(**{**v, "n_tokens": 17})
    assert VisionSpec(**{**v, "n_tokens": 17, "cls_tokens": 1}).n_patches == 16
    with pytest.raises(TypeError, match="VisionSpec.layers"):
        VisionSpec(**{**v, "layers": 1.0})
    with pytest.raises(TypeError, match="VisionSpec.gated_mlp"):
        VisionSpec(**v, gated_mlp=1)
    with pytest.raises(TypeError, match="VisionSpec.image_size"):
        VisionSpec(**{**v, "image_size": "32"})
    with pytest.raises(ValueError, match="ConnectorSpec.kind"):
        ConnectorSpec("qformer", 16, 16, 16, 16, 16)
    with pytest.raises(ValueError, match="ConnectorSpec.tokens_out"):
        ConnectorSpec("mlp", 16, 16, 16, 16, 8)
    with pytest.raises(ValueError, match="ConnectorSpec.tokens_out"):
        ConnectorSpec("ldp", 16, 16, 16, 16, 9)
    with pytest.raises(ValueError, match="ConnectorSpec.tokens_out"):
        ConnectorSpec("merger", 64, 64, 16, 16, 5)
    with pytest.raises(ValueError, match="ConnectorSpec.layers"):
        ConnectorSpec("mlp", 16, 16, 16, 16, 16, layers=0)
    with pytest.raises(ValueError, match="DecoderSpec.kv_heads"):
        DecoderSpec(layers=2, dim=16, heads=4, kv_heads=3, head_dim=4, ffn_dim=32, vocab=10)
    vision = VisionSpec(**v)
    dec = DecoderSpec(layers=2, dim=16, heads=4, kv_heads=2, head_dim=4, ffn_dim=32, vocab=10)
    ModelSpec("ok", vision, ConnectorSpec("mlp", 16, 32, 16, 16, 16), dec)
    ModelSpec("merged", vision, ConnectorSpec("merger", 64, 64, 16, 16, 4), dec)
    with pytest.raises(ValueError, match="ConnectorSpec.in_dim"):
        ModelSpec("bad", vision, ConnectorSpec("mlp", 8, 32, 16, 16, 16), dec)
    with pytest.raises(ValueError, match="ConnectorSpec.out_dim"):
        ModelSpec("bad", vision, ConnectorSpec("mlp", 16, 32, 8, 16, 16), dec)
    with pytest.raises(ValueError, match="ConnectorSpec.tokens_in"):
        ModelSpec("bad", vision, ConnectorSpec("mlp", 16, 32, 16, 9, 9), dec)
    with pytest.raises(TypeError, match="ModelSpec.decoder"):
        ModelSpec("bad", vision, ConnectorSpec("mlp", 16, 32, 16, 16, 16), "decoder")
    with pytest.raises(TypeError, match="spec"):
        memory.param_count("LLaVA")
