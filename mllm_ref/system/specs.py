"""Shapes of vision-language models, for the cost model: the tiny VLM and three published configurations.

A :class:`ModelSpec` holds what the FLOP, byte and parameter counts of :mod:`mllm_ref.system.complexity` and
:mod:`mllm_ref.system.memory` need: the vision encoder (:class:`VisionSpec`), the connector
(:class:`ConnectorSpec`) and the causal decoder (:class:`DecoderSpec`, with grouped-query key/value heads). Every
constructor checks its fields (positive integers, consistent token counts and widths) and names the field it
rejects.

Published configurations, each constant citing the configuration files its numbers come from:

- :data:`LLAVA_15_7B`: CLIP ViT-L/14 at 336 px + 2-layer GELU MLP + Vicuna-7B v1.5;
- :data:`QWEN2_VL_2B`: Qwen2-VL's 675M ViT + 2x2 patch merger + Qwen2-1.5B (448 x 448 input by default; other
  resolutions with :func:`qwen2_vl_2b`);
- :data:`MOBILEVLM_1_7B`: CLIP ViT-L/14 at 336 px + lightweight downsample projector (LDP) + MobileLLaMA-1.4B.

:func:`spec_from_tinyvlm` builds the spec of the project's tiny VLM from its configuration object.

Conventions the parameter count relies on (true of the three models above and of the tiny VLM): vision blocks are
pre-norm with two LayerNorms (weight and bias), Q/K/V/O and MLP linears with biases; decoder blocks have two
RMSNorms (weight only), no output or FFN biases, and Q/K/V biases only when ``qkv_bias``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace

from mllm_ref import _checks

__all__ = [
    "VisionSpec",
    "ConnectorSpec",
    "DecoderSpec",
    "ModelSpec",
    "CONNECTOR_KINDS",
    "LLAVA_15_7B",
    "QWEN2_VL_2B",
    "MOBILEVLM_1_7B",
    "PUBLISHED",
    "qwen2_vl_2b",
    "spec_from_tinyvlm",
]

#: Connector kinds the cost model knows: ``"mlp"`` (LLaVA-1.5: ``layers`` linears with GELU between them, on every
#: token), ``"merger"`` (Qwen2-VL: LayerNorm over the encoder width, groups of ``tokens_in / tokens_out``
#: neighbouring tokens concatenated, then the MLP), ``"ldp"`` (MobileVLM: the MLP, then two MobileNetV3 blocks,
#: depthwise 3x3 + squeeze-excitation + pointwise, the second with stride 2).
CONNECTOR_KINDS = ("mlp", "merger", "ldp")


def _check_ints(obj, low: dict[str, int]) -> None:
    """Check the integer fields named in ``low`` (field -> lowest value) and store them as ``int``."""
    cls = type(obj).__name__
    for name, lo in low.items():
        object.__setattr__(obj, name, _checks.integer(getattr(obj, name), f"{cls}.{name}", low=lo))


def _check_flags(obj, names: tuple[str, ...]) -> None:
    cls = type(obj).__name__
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, bool):
            raise TypeError(f"{cls}.{name} must be a bool, got {type(value).__name__}")


@dataclass(frozen=True)
class VisionSpec:
    """A ViT encoder.

    Fields:
        image_size: input side in pixels (int) or ``(height, width)``; each a multiple of ``patch_size``.
        patch_size, channels: patch side and input channels.
        dim, layers, heads, mlp_dim: width, depth, attention heads (``dim % heads == 0``), MLP hidden width.
        n_tokens: tokens every encoder layer processes and outputs: the patches plus ``cls_tokens``.
        gated_mlp: the MLP has three matrices (SwiGLU-style) instead of two (GELU).
        cls_tokens: learned class tokens prepended to the patches (CLIP: 1).
        learned_pos_embed: a learned absolute position embedding of ``n_tokens x dim`` (CLIP, the tiny VLM);
            ``False`` for rotary positions (Qwen2-VL).
        patch_bias: the patch-embedding projection has a bias.
        extra_norms: LayerNorms outside the blocks (CLIP: pre and post = 2; the tiny VLM: a final one = 1).
        temporal_patch: frames per patch (Qwen2-VL's 3-D patch embedding: 2; a still image is repeated).
    """

    image_size: int | tuple[int, int]
    patch_size: int
    channels: int
    dim: int
    layers: int
    heads: int
    mlp_dim: int
    n_tokens: int
    gated_mlp: bool = False
    cls_tokens: int = 0
    learned_pos_embed: bool = True
    patch_bias: bool = True
    extra_norms: int = 1
    temporal_patch: int = 1

    def __post_init__(self):
        size = self.image_size
        if isinstance(size, numbers.Integral) and not isinstance(size, bool):
            hw = (size, size)
        elif isinstance(size, tuple) and len(size) == 2:
            hw = size
        else:
            raise TypeError(f"VisionSpec.image_size must be an int or a (height, width) tuple, got {size!r}")
        hw = tuple(_checks.integer(s, "VisionSpec.image_size", low=1) for s in hw)
        object.__setattr__(self, "image_size", hw[0] if isinstance(size, numbers.Integral) else hw)
        _check_ints(self, dict(patch_size=1, channels=1, dim=1, layers=0, heads=1, mlp_dim=1, n_tokens=1,
                               cls_tokens=0, extra_norms=0, temporal_patch=1))  # fmt: skip
        _check_flags(self, ("gated_mlp", "learned_pos_embed", "patch_bias"))
        if self.dim % self.heads:
            raise ValueError(f"VisionSpec.dim ({self.dim}) must be a multiple of VisionSpec.heads ({self.heads})")
        if any(s % self.patch_size for s in hw):
            raise ValueError(
                f"VisionSpec.image_size {hw} must be a multiple of VisionSpec.patch_size ({self.patch_size})"
            )
        patches = (hw[0] // self.patch_size) * (hw[1] // self.patch_size)
        if self.n_tokens != patches + self.cls_tokens:
            raise ValueError(
                f"VisionSpec.n_tokens ({self.n_tokens}) must be the {patches} patches of a {hw[0]}x{hw[1]} image "
                f"plus VisionSpec.cls_tokens ({self.cls_tokens})"
            )

    @property
    def image_hw(self) -> tuple[int, int]:
        return self.image_size if isinstance(self.image_size, tuple) else (self.image_size, self.image_size)

    @property
    def grid(self) -> tuple[int, int]:
        """Patches per column and per row."""
        h, w = self.image_hw
        return h // self.patch_size, w // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.n_tokens - self.cls_tokens

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def patch_in(self) -> int:
        """Inputs of the patch-embedding projection: ``temporal_patch * patch_size^2 * channels``."""
        return self.temporal_patch * self.patch_size**2 * self.channels


@dataclass(frozen=True)
class ConnectorSpec:
    """A connector from encoder features (``in_dim`` per row) to decoder embeddings (``out_dim``).

    Fields:
        kind: one of :data:`CONNECTOR_KINDS`.
        in_dim, hidden_dim, out_dim: widths of the MLP (``in_dim -> hidden_dim -> ... -> out_dim``). For
            ``"merger"``, ``in_dim`` is the concatenated width (encoder width x tokens merged). For ``"ldp"``,
            ``hidden_dim == out_dim`` (MobileVLM's MLP is ``in -> out -> out``).
        tokens_in: encoder tokens the connector takes (class tokens are dropped before it).
        tokens_out: visual tokens handed to the decoder. ``"mlp"``: ``== tokens_in``; ``"merger"``: divides
            ``tokens_in``; ``"ldp"``: ``tokens_in`` is a square ``g x g`` grid and ``tokens_out = ceil(g/2)^2``.
        layers: linear layers of the MLP (>= 1; 1 is a single projection; ``"ldp"`` has 2).
    """

    kind: str
    in_dim: int
    hidden_dim: int
    out_dim: int
    tokens_in: int
    tokens_out: int
    layers: int = 2

    def __post_init__(self):
        if not isinstance(self.kind, str):
            raise TypeError(f"ConnectorSpec.kind must be a str, got {type(self.kind).__name__}")
        _checks.choice(self.kind, "ConnectorSpec.kind", CONNECTOR_KINDS)
        _check_ints(self, dict(in_dim=1, hidden_dim=1, out_dim=1, tokens_in=1, tokens_out=1, layers=1))
        tin, tout = self.tokens_in, self.tokens_out
        if self.kind == "mlp" and tin != tout:
            raise ValueError(f"an mlp connector keeps every token: ConnectorSpec.tokens_out ({tout}) must equal "
                             f"ConnectorSpec.tokens_in ({tin})")  # fmt: skip
        if self.kind == "merger" and tin % tout:
            raise ValueError(f"a merger joins groups of tokens: ConnectorSpec.tokens_out ({tout}) must divide "
                             f"ConnectorSpec.tokens_in ({tin})")  # fmt: skip
        if self.kind == "ldp":
            g = math.isqrt(tin)
            if g * g != tin or tout != ((g + 1) // 2) ** 2:
                raise ValueError(f"an ldp connector downsamples a square grid by 2: ConnectorSpec.tokens_in ({tin}) "
                                 f"must be g*g and ConnectorSpec.tokens_out ({tout}) ceil(g/2)^2")  # fmt: skip
            if self.hidden_dim != self.out_dim or self.layers != 2:
                raise ValueError("an ldp connector's MLP is in_dim -> out_dim -> out_dim: ConnectorSpec.hidden_dim "
                                 f"({self.hidden_dim}) must equal ConnectorSpec.out_dim ({self.out_dim}) and "
                                 f"ConnectorSpec.layers ({self.layers}) be 2")  # fmt: skip

    @property
    def mlp_dims(self) -> tuple[int, ...]:
        """Widths through the MLP: ``(in_dim, hidden_dim, ..., hidden_dim, out_dim)``, ``layers + 1`` entries."""
        return (self.in_dim,) + (self.hidden_dim,) * (self.layers - 1) + (self.out_dim,)

    @property
    def mlp_rows(self) -> int:
        """Rows the MLP runs on: the merged tokens for ``"merger"``, every input token otherwise."""
        return self.tokens_out if self.kind == "merger" else self.tokens_in


@dataclass(frozen=True)
class DecoderSpec:
    """A causal decoder: ``layers`` blocks of grouped-query attention and a (gated) feed-forward network.

    Fields: ``heads`` query heads and ``kv_heads`` key/value heads (``heads % kv_heads == 0``) of size ``head_dim``
    (``heads * head_dim`` need not equal ``dim``), FFN width ``ffn_dim`` (SwiGLU: three matrices when
    ``gated_ffn``), vocabulary ``vocab``, LM head tied to the input embedding when ``tied_embeddings``, biases on
    Q/K/V when ``qkv_bias`` (Qwen2).
    """

    layers: int
    dim: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab: int
    gated_ffn: bool = True
    tied_embeddings: bool = False
    qkv_bias: bool = False

    def __post_init__(self):
        _check_ints(self, dict(layers=1, dim=1, heads=1, kv_heads=1, head_dim=1, ffn_dim=1, vocab=1))
        _check_flags(self, ("gated_ffn", "tied_embeddings", "qkv_bias"))
        if self.heads % self.kv_heads:
            raise ValueError(
                f"DecoderSpec.heads ({self.heads}) must be a multiple of DecoderSpec.kv_heads ({self.kv_heads})"
            )


@dataclass(frozen=True)
class ModelSpec:
    """A vision-language model: encoder, connector, decoder, and ``source``, where the numbers come from."""

    name: str
    vision: VisionSpec
    connector: ConnectorSpec
    decoder: DecoderSpec
    source: str = ""

    def __post_init__(self):
        for f, cls in (("name", str), ("vision", VisionSpec), ("connector", ConnectorSpec),
                       ("decoder", DecoderSpec), ("source", str)):  # fmt: skip
            if not isinstance(getattr(self, f), cls):
                raise TypeError(f"ModelSpec.{f} must be a {cls.__name__}, got {type(getattr(self, f)).__name__}")
        v, c, d = self.vision, self.connector, self.decoder
        if c.tokens_in != v.n_patches:
            raise ValueError(f"ConnectorSpec.tokens_in ({c.tokens_in}) must be the encoder's VisionSpec.n_patches "
                             f"({v.n_patches}; class tokens are dropped)")  # fmt: skip
        width = v.dim * (c.tokens_in // c.tokens_out) if c.kind == "merger" else v.dim
        if c.in_dim != width:
            raise ValueError(f"ConnectorSpec.in_dim ({c.in_dim}) must be {width} (VisionSpec.dim {v.dim}"
                             + (f" x {c.tokens_in // c.tokens_out} merged tokens)" if c.kind == "merger" else ")"))
        if c.out_dim != d.dim:
            raise ValueError(f"ConnectorSpec.out_dim ({c.out_dim}) must equal DecoderSpec.dim ({d.dim})")

    @property
    def n_visual(self) -> int:
        """Visual tokens of one image that reach the decoder."""
        return self.connector.tokens_out


# ------------------------------------------------------------------------------------------ published configurations

# LLaVA-1.5-7B (liuhaotian/llava-v1.5-7b config.json: mm_vision_tower openai/clip-vit-large-patch14-336,
# mm_projector_type "mlp2x_gelu", mm_hidden_size 1024, hidden_size 4096).
# - Vision: openai/clip-vit-large-patch14-336 config.json, vision_config: image_size 336, patch_size 14,
#   hidden_size 1024, num_hidden_layers 24, num_attention_heads 16, intermediate_size 4096 (quick_gelu).
#   (336/14)^2 = 576 patches + CLS = 577 tokens; learned position embedding of 577, patch conv without bias,
#   pre_layrnorm and post_layernorm (2 extra norms). LLaVA takes the penultimate layer (mm_vision_select_layer -2)
#   and drops the CLS token (select_feature "patch"), so 576 tokens go on; the 24th layer still runs in the
#   reference implementation (all hidden states are computed), so all 24 layers are counted.
# - Projector: Linear(1024, 4096) - GELU - Linear(4096, 4096), with biases: 20.98M parameters.
# - LLM: lmsys/vicuna-7b-v1.5 config.json (LLaMA-2-7B): num_hidden_layers 32, hidden_size 4096,
#   num_attention_heads 32, num_key_value_heads 32, intermediate_size 11008 (SiLU, gated), vocab_size 32000,
#   tie_word_embeddings false. Head dim 4096/32 = 128.
LLAVA_15_7B = ModelSpec(
    name="LLaVA-1.5-7B",
    vision=VisionSpec(336, 14, 3, dim=1024, layers=24, heads=16, mlp_dim=4096, n_tokens=577, cls_tokens=1,
                      patch_bias=False, extra_norms=2),  # fmt: skip
    connector=ConnectorSpec("mlp", in_dim=1024, hidden_dim=4096, out_dim=4096, tokens_in=576, tokens_out=576),
    decoder=DecoderSpec(layers=32, dim=4096, heads=32, kv_heads=32, head_dim=128, ffn_dim=11008, vocab=32000),
    source="liuhaotian/llava-v1.5-7b, openai/clip-vit-large-patch14-336 and lmsys/vicuna-7b-v1.5 config.json",
)

# Qwen2-VL-2B-Instruct config.json.
# - vision_config: depth 32, embed_dim 1280, num_heads 16, mlp_ratio 4 (fc1 1280 -> 5120, QuickGELU, fc2),
#   patch_size 14, temporal_patch_size 2 (Conv3d 3 -> 1280 with kernel 2x14x14, no bias; a still image is
#   repeated over the 2 frames), spatial_merge_size 2, hidden_size 1536 (the merger's output). Positions are 2-D
#   rotary (no learned position embedding, no class token); no norm after the blocks besides the merger's.
#   Merger: LayerNorm(1280), 2x2 neighbouring patches concatenated to 5120, Linear(5120, 5120) - GELU -
#   Linear(5120, 1536).
# - text: num_hidden_layers 28, hidden_size 1536, num_attention_heads 12, num_key_value_heads 2 (head dim 128),
#   intermediate_size 8960 (SwiGLU), vocab_size 151936, tie_word_embeddings true; Qwen2 attention has Q/K/V biases.
# - Visual tokens depend on the resolution (the processor resizes to multiples of 28 between min_pixels and
#   max_pixels): 448 x 448 -> 32 x 32 = 1024 patches -> 256 tokens, the default here; see qwen2_vl_2b().
# The three <|vision_start|>/<|image_pad|>/<|vision_end|> bookkeeping tokens are text, not counted here.
QWEN2_VL_2B = ModelSpec(
    name="Qwen2-VL-2B",
    vision=VisionSpec(448, 14, 3, dim=1280, layers=32, heads=16, mlp_dim=5120, n_tokens=1024,
                      learned_pos_embed=False, patch_bias=False, extra_norms=0, temporal_patch=2),  # fmt: skip
    connector=ConnectorSpec("merger", in_dim=5120, hidden_dim=5120, out_dim=1536, tokens_in=1024, tokens_out=256),
    decoder=DecoderSpec(layers=28, dim=1536, heads=12, kv_heads=2, head_dim=128, ffn_dim=8960, vocab=151936,
                        tied_embeddings=True, qkv_bias=True),  # fmt: skip
    source="Qwen/Qwen2-VL-2B-Instruct config.json (vision_config and text settings), 448x448 input",
)

# MobileVLM-1.7B (mtgv/MobileVLM-1.7B config.json: mm_vision_tower openai/clip-vit-large-patch14-336,
# mm_projector_type "ldp", mm_hidden_size 1024, hidden_size 2048).
# - Vision: as LLaVA-1.5 (penultimate layer, CLS dropped: 576 tokens).
# - LDP (MobileVLM v1, mobilevlm/model/vision_projector.py LDPBlock): Linear(1024, 2048) - GELU -
#   Linear(2048, 2048), then two torchvision InvertedResidual blocks at width 2048 with no expansion: depthwise 3x3
#   (no bias) + LayerNorm + Hardswish, squeeze-excitation 2048 -> 512 -> 2048 (with biases, hard-sigmoid),
#   pointwise 1x1 (no bias) + LayerNorm; the first with stride 1 (residual), the second with stride 2:
#   24 x 24 = 576 -> 12 x 12 = 144 tokens. About 18.9M parameters.
# - LLM: mtgv/MobileLLaMA-1.4B-Chat config.json: num_hidden_layers 24, hidden_size 2048, num_attention_heads 16,
#   num_key_value_heads 16 (head dim 128), intermediate_size 5632, vocab_size 32000. Doubt: we read
#   tie_word_embeddings as false (the LLaMA default); tied, the total would be 65.5M lower (1.62B instead of 1.69B).
MOBILEVLM_1_7B = ModelSpec(
    name="MobileVLM-1.7B",
    vision=LLAVA_15_7B.vision,
    connector=ConnectorSpec("ldp", in_dim=1024, hidden_dim=2048, out_dim=2048, tokens_in=576, tokens_out=144),
    decoder=DecoderSpec(layers=24, dim=2048, heads=16, kv_heads=16, head_dim=128, ffn_dim=5632, vocab=32000),
    source="mtgv/MobileVLM-1.7B, openai/clip-vit-large-patch14-336 and mtgv/MobileLLaMA-1.4B-Chat config.json",
)

#: The published specs by name.
PUBLISHED: dict[str, ModelSpec] = {s.name: s for s in (LLAVA_15_7B, QWEN2_VL_2B, MOBILEVLM_1_7B)}


def qwen2_vl_2b(height: int = 448, width: int | None = None) -> ModelSpec:
    """Qwen2-VL-2B on a ``height x width`` image (``width`` defaults to ``height``).

    Both sides must be multiples of 28 (patch 14 x merge 2), as Qwen2-VL's processor resizes them; the encoder sees
    ``(height/14) * (width/14)`` patches and the decoder a quarter as many tokens. 448 x 448 -> 256 tokens.
    """
    height = _checks.integer(height, "height", low=28)
    width = height if width is None else _checks.integer(width, "width", low=28)
    for name, side in (("height", height), ("width", width)):
        if side % 28:
            raise ValueError(f"{name} must be a multiple of 28 (patch 14 x merge 2), got {side}")
    patches = (height // 14) * (width // 14)
    size = height if height == width else (height, width)
    vision = replace(QWEN2_VL_2B.vision, image_size=size, n_tokens=patches)
    connector = replace(QWEN2_VL_2B.connector, tokens_in=patches, tokens_out=patches // 4)
    return replace(QWEN2_VL_2B, name=f"Qwen2-VL-2B@{height}x{width}", vision=vision, connector=connector)


_TINY_ATTRS = ("image_size", "patch_size", "channels", "vis_dim", "vis_layers", "vis_heads", "vis_mlp",
               "proj_hidden", "dim", "layers", "heads", "kv_heads", "ffn_dim", "vocab_size")  # fmt: skip


def spec_from_tinyvlm(cfg) -> ModelSpec:
    """The :class:`ModelSpec` of a tiny-VLM configuration.

    ``cfg`` is any object with the attributes of :class:`mllm_ref.tinyvlm.config.TinyVLMConfig` (read by name
    only): ``image_size, patch_size, channels, vis_dim, vis_layers, vis_heads, vis_mlp, proj_hidden, dim, layers,
    heads, kv_heads, ffn_dim, vocab_size`` and optionally ``head_dim`` (default ``dim // heads``). The tiny VLM:
    ViT without class token (learned positions, a final LayerNorm, GELU MLP), a 2-layer MLP connector
    ``vis_dim -> proj_hidden -> dim`` on all ``(image_size / patch_size)^2`` tokens, a SwiGLU decoder with an
    untied LM head.
    """
    values = {}
    for attr in _TINY_ATTRS + ("head_dim",):
        if not hasattr(cfg, attr):
            if attr == "head_dim":
                continue
            raise TypeError(f"cfg must have the attribute {attr!r} of a tiny-VLM configuration")
        values[attr] = _checks.integer(getattr(cfg, attr), f"cfg.{attr}", low=1)
    v = values
    if v["image_size"] % v["patch_size"]:
        raise ValueError(f"cfg.image_size ({v['image_size']}) must be a multiple of cfg.patch_size "
                         f"({v['patch_size']})")  # fmt: skip
    n = (v["image_size"] // v["patch_size"]) ** 2
    return ModelSpec(
        name="tiny VLM",
        vision=VisionSpec(v["image_size"], v["patch_size"], v["channels"], v["vis_dim"], v["vis_layers"],
                          v["vis_heads"], v["vis_mlp"], n_tokens=n),  # fmt: skip
        connector=ConnectorSpec("mlp", v["vis_dim"], v["proj_hidden"], v["dim"], n, n),
        decoder=DecoderSpec(v["layers"], v["dim"], v["heads"], v["kv_heads"], v.get("head_dim", v["dim"] // v["heads"]),
                            v["ffn_dim"], v["vocab_size"]),  # fmt: skip
        source=f"tiny VLM configuration ({type(cfg).__name__})",
    )
