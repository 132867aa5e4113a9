"""The configuration of the tiny vision-language model."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from mllm_ref.tinyvlm import tokenizer, world


@dataclass(frozen=True)
class TinyVLMConfig:
    """Sizes of the tiny VLM. ``n_patches`` = (image_size / patch_size)^2 visual tokens (144 by default).

    Vision encoder: a pre-norm ViT (LayerNorm, GELU-tanh MLP, learned absolute position embeddings, no class
    token). Connector: a two-layer GELU MLP from ``vis_dim`` to ``dim`` (LLaVA-1.5 style). Decoder: a pre-norm
    causal transformer (RMSNorm, grouped-query attention with 1-D RoPE, SwiGLU feed-forward, untied LM head).
    """

    image_size: int = world.IMAGE_SIZE
    patch_size: int = 4
    channels: int = 3
    vis_dim: int = 64
    vis_layers: int = 3
    vis_heads: int = 4
    vis_mlp: int = 256
    proj_hidden: int = 128
    dim: int = 128
    layers: int = 12
    heads: int = 4
    kv_heads: int = 2
    ffn_dim: int = 352
    vocab_size: int = len(tokenizer.VOCAB)
    rope_theta: float = 10000.0
    ln_eps: float = 1e-5
    rms_eps: float = 1e-6

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.grid * self.grid

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def vis_head_dim(self) -> int:
        return self.vis_dim // self.vis_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TinyVLMConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"config has unknown keys: {sorted(unknown)}")
        return cls(**d)
