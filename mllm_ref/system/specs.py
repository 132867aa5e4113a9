"""Shapes of vision-language models, for the cost model: the tiny VLM and published configurations.

A :class:`ModelSpec` holds what the FLOP and byte counts of :mod:`mllm_ref.system.complexity` need: the vision
encoder's width and depth, the connector, and the decoder (including grouped-query key/value heads). The published
configurations are read from the models' released configuration files; each constant cites its source.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from mllm_ref import _checks


@dataclass(frozen=True)
class VisionSpec:
    """A ViT encoder: ``n_patches`` tokens of width ``dim`` through ``layers`` blocks (+1 for a class token)."""

    image_size: int
    patch_size: int
    channels: int
    dim: int
    layers: int
    heads: int
    mlp_dim: int
    class_token: bool = False
    gated_mlp: bool = False

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def n_tokens(self) -> int:
        """Tokens the encoder processes (patches, plus the class token if any)."""
        return self.n_patches + int(self.class_token)


@dataclass(frozen=True)
class ConnectorSpec:
    """A connector from ``in_dim`` encoder features to ``out_dim`` decoder embeddings.

    ``kind``: ``"mlp"`` (LLaVA-1.5: Linear-GELU-Linear on every token), ``"merger"`` (Qwen2-VL: 2x2 neighbouring
    tokens concatenated, then an MLP), ``"ldp"`` (MobileVLM: MLP then a stride-2 depthwise-conv downsampler).
    ``tokens_in`` -> ``tokens_out`` visual tokens.
    """

    kind: str
    in_dim: int
    hidden_dim: int
    out_dim: int
    tokens_in: int
    tokens_out: int


@dataclass(frozen=True)
class DecoderSpec:
    """A causal decoder: ``layers`` blocks of grouped-query attention and a (gated) feed-forward network."""

    layers: int
    dim: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab: int
    gated_ffn: bool = True
    tied_embeddings: bool = False


@dataclass(frozen=True)
class ModelSpec:
    name: str
    vision: VisionSpec
    connector: ConnectorSpec
    decoder: DecoderSpec
    source: str = ""

    @property
    def n_visual(self) -> int:
        """Visual tokens that reach the decoder."""
        return self.connector.tokens_out


# LLaVA-1.5-7B: vision tower openai/clip-vit-large-patch14-336 (config.json: hidden_size 1024, 24 layers,
# 16 heads, intermediate 4096, image 336, patch 14; LLaVA takes the penultimate layer's 576 patch tokens, so 23
# layers are run in practice; we count all 24), projector "mlp2x_gelu" 1024 -> 4096 -> 4096, language model
# lmsys/vicuna-7b-v1.5 (LLaMA-2-7B: 32 layers, hidden 4096, 32 heads, intermediate 11008, vocab 32000).
LLAVA_15_7B = ModelSpec(
    name="LLaVA-1.5-7B",
    vision=VisionSpec(336, 14, 3, 1024, 24, 16, 4096, class_token=True),
    connector=ConnectorSpec("mlp", 1024, 4096, 4096, 576, 576),
    decoder=DecoderSpec(32, 4096, 32, 32, 128, 11008, 32000),
    source="liuhaotian/llava-v1.5-7b config.json; openai/clip-vit-large-patch14-336; lmsys/vicuna-7b-v1.5",
)

# Qwen2-VL-2B-Instruct config.json: vision depth 32, embed_dim 1280, 16 heads, mlp_ratio 4, patch 14,
# spatial_merge_size 2 (2x2 patches -> one token through an MLP 5120 -> 5120 -> 1536); text: 28 layers, hidden
# 1536, 12 heads, 2 key/value heads, intermediate 8960, vocab 151936, tied word embeddings. The number of visual
# tokens depends on the resolution; 448 x 448 gives 32 x 32 = 1024 patches and 256 tokens.
QWEN2_VL_2B = ModelSpec(
    name="Qwen2-VL-2B",
    vision=VisionSpec(448, 14, 3, 1280, 32, 16, 5120),
    connector=ConnectorSpec("merger", 5120, 5120, 1536, 1024, 256),
    decoder=DecoderSpec(28, 1536, 12, 2, 128, 8960, 151936, tied_embeddings=True),
    source="Qwen/Qwen2-VL-2B-Instruct config.json (vision_config and text settings)",
)

# MobileVLM-1.7B: CLIP ViT-L/14-336 as LLaVA, the lightweight downsample projector (LDP) turning 576 tokens into
# 144, and MobileLLaMA-1.4B (24 layers, hidden 2048, 16 heads, intermediate 5632, vocab 32000).
MOBILEVLM_17B = ModelSpec(
    name="MobileVLM-1.7B",
    vision=VisionSpec(336, 14, 3, 1024, 24, 16, 4096, class_token=True),
    connector=ConnectorSpec("ldp", 1024, 2048, 2048, 576, 144),
    decoder=DecoderSpec(24, 2048, 16, 16, 128, 5632, 32000),
    source="mtgv/MobileVLM-1.7B config.json; mtgv/MobileLLaMA-1.4B-Chat",
)

PUBLISHED: dict[str, ModelSpec] = {s.name: s for s in (LLAVA_15_7B, QWEN2_VL_2B, MOBILEVLM_17B)}


def qwen2_vl_at(resolution: int) -> ModelSpec:
    """Qwen2-VL-2B at a square ``resolution`` (a multiple of 28): (resolution/14)^2 patches, a quarter as tokens."""
    resolution = _checks.integer(resolution, "resolution", low=28)
    if resolution % 28:
        raise ValueError(f"resolution must be a multiple of 28 (patch 14 x merge 2), got {resolution}")
    patches = (resolution // 14) ** 2
    vision = replace(QWEN2_VL_2B.vision, image_size=resolution)
    connector = replace(QWEN2_VL_2B.connector, tokens_in=patches, tokens_out=patches // 4)
    return replace(QWEN2_VL_2B, name=f"Qwen2-VL-2B@{resolution}", vision=vision, connector=connector)


def spec_from_tinyvlm(cfg) -> ModelSpec:
    """The :class:`ModelSpec` of a tiny VLM configuration (any object with its attribute names)."""
    n = (cfg.image_size // cfg.patch_size) ** 2
    return ModelSpec(
        name="tiny VLM",
        vision=VisionSpec(cfg.image_size, cfg.patch_size, cfg.channels, cfg.vis_dim, cfg.vis_layers, cfg.vis_heads, cfg.vis_mlp),
        connector=ConnectorSpec("mlp", cfg.vis_dim, cfg.proj_hidden, cfg.dim, n, n),
        decoder=DecoderSpec(
            cfg.layers, cfg.dim, cfg.heads, cfg.kv_heads, cfg.dim // cfg.heads, cfg.ffn_dim, cfg.vocab_size
        ),
        source="mllm_ref.tinyvlm.config.TinyVLMConfig",
    )
