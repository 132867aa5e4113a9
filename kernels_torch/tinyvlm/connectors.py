"""Trainable torch connectors for the tiny VLM's connector variants (issue: connectors on the tiny VLM).

Each module maps the frozen encoder's features ``[B, N, vis_dim]`` to the visual tokens the frozen decoder reads,
``[B, Q, dim]``, and its ``state_dict`` names are the ones the NumPy references of :mod:`mllm_ref.connectors` load
(so :mod:`mllm_ref.tinyvlm.variants` runs the trained weights through those references unchanged):

- :class:`QFormerConnector`: learned ``query_tokens``, a BLIP-2 Q-Former under ``qformer.`` with Hugging Face's
  ``Blip2QFormerModel`` names, and a linear ``proj`` to the decoder width (BLIP-2's language projection).
- :class:`ResamplerConnector`: a Flamingo Perceiver Resampler under ``resampler.`` (open_flamingo's names), then a
  linear ``proj`` to the decoder width.
- :class:`LDPConnector`: MobileVLM V2's LDPv2 under ``ldp.`` (the official module's names): MLP to the decoder
  width, 2 x 2 average pooling of the 12 x 12 grid, PEG (depthwise 3 x 3 convolution plus residual).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _heads(x: torch.Tensor, h: int) -> torch.Tensor:
    b, t, w = x.shape
    return x.view(b, t, h, w // h).transpose(1, 2)


def _mha(q, k, v, h):
    """Multi-head attention over ``[B, T, H*d]`` projections (no mask)."""
    q, k, v = _heads(q, h), _heads(k, h), _heads(v, h)
    out = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v
    return out.transpose(1, 2).reshape(q.shape[0], -1, q.shape[1] * q.shape[-1])


class _Attention(nn.Module):
    """``attention.{query,key,value}`` and ``output.{dense,LayerNorm}``, as Hugging Face names a BERT block."""

    def __init__(self, h: int, kv_dim: int, eps: float):
        super().__init__()
        self.attention = nn.Module()
        self.attention.query = nn.Linear(h, h)
        self.attention.key = nn.Linear(kv_dim, h)
        self.attention.value = nn.Linear(kv_dim, h)
        self.output = nn.Module()
        self.output.dense = nn.Linear(h, h)
        self.output.LayerNorm = nn.LayerNorm(h, eps=eps)

    def forward(self, x, kv, heads):
        a = self.attention
        o = _mha(a.query(x), a.key(kv), a.value(kv), heads)
        return self.output.LayerNorm(self.output.dense(o) + x)


class _Dense(nn.Module):
    def __init__(self, n_in: int, n_out: int, eps: float | None = None):
        super().__init__()
        self.dense = nn.Linear(n_in, n_out)
        if eps is not None:
            self.LayerNorm = nn.LayerNorm(n_out, eps=eps)


class _QFormerLayer(nn.Module):
    def __init__(self, h: int, e: int, inter: int, cross: bool, eps: float):
        super().__init__()
        self.attention = _Attention(h, h, eps)
        if cross:
            self.crossattention = _Attention(h, e, eps)
        self.intermediate_query = _Dense(h, inter)
        self.output_query = _Dense(inter, h, eps)

    def forward(self, x, image, heads):
        x = self.attention(x, x, heads)
        if hasattr(self, "crossattention"):
            x = self.crossattention(x, image, heads)
        y = self.output_query.dense(F.gelu(self.intermediate_query.dense(x)))
        return self.output_query.LayerNorm(y + x)


class QFormer(nn.Module):
    """BLIP-2's Q-Former over the queries alone (no text), as :func:`mllm_ref.connectors.qformer.qformer`."""

    def __init__(self, h: int, e: int, layers: int, heads: int, inter: int, cross_attention_frequency: int,
                 eps: float = 1e-12):  # fmt: skip
        super().__init__()
        self.heads = heads
        self.layernorm = nn.LayerNorm(h, eps=eps)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            _QFormerLayer(h, e, inter, i % cross_attention_frequency == 0, eps) for i in range(layers)
        )

    def forward(self, queries, image):
        x = self.layernorm(queries)
        for layer in self.encoder.layer:
            x = layer(x, image, self.heads)
        return x


class QFormerConnector(nn.Module):
    def __init__(self, queries: int, vis_dim: int, dim: int, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                 inter: int = 256, cross_attention_frequency: int = 1):  # fmt: skip
        super().__init__()
        self.query_tokens = nn.Parameter(torch.randn(queries, hidden) * 0.02)
        self.qformer = QFormer(hidden, vis_dim, layers, heads, inter, cross_attention_frequency)
        self.proj = nn.Linear(hidden, dim)

    def forward(self, features):
        q = self.query_tokens.expand(features.shape[0], -1, -1)
        return self.proj(self.qformer(q, features))


class PerceiverResampler(nn.Module):
    """Flamingo's Perceiver Resampler with open_flamingo's parameter names (one image: no frame embeddings)."""

    def __init__(self, dim: int, latents: int, depth: int, heads: int, dim_head: int, ff_mult: int = 4):
        super().__init__()
        self.heads = heads
        self.latents = nn.Parameter(torch.randn(latents, dim) * 0.02)
        inner = heads * dim_head
        self.layers = nn.ModuleList()
        for _ in range(depth):
            attn = nn.Module()
            attn.norm_media = nn.LayerNorm(dim)
            attn.norm_latents = nn.LayerNorm(dim)
            attn.to_q = nn.Linear(dim, inner, bias=False)
            attn.to_kv = nn.Linear(dim, 2 * inner, bias=False)
            attn.to_out = nn.Linear(inner, dim, bias=False)
            ff = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, ff_mult * dim, bias=False), nn.GELU(),
                               nn.Linear(ff_mult * dim, dim, bias=False))  # fmt: skip
            self.layers.append(nn.ModuleList([attn, ff]))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        z = self.latents.expand(x.shape[0], -1, -1)
        for attn, ff in self.layers:
            xm, zn = attn.norm_media(x), attn.norm_latents(z)
            kv = attn.to_kv(torch.cat([xm, zn], dim=1))
            k, v = kv.chunk(2, dim=-1)
            z = z + attn.to_out(_mha(attn.to_q(zn), k, v, self.heads))
            z = z + ff(z)
        return self.norm(z)


class ResamplerConnector(nn.Module):
    def __init__(self, queries: int, vis_dim: int, dim: int, *, depth: int = 2, heads: int = 4, dim_head: int = 16):
        super().__init__()
        self.resampler = PerceiverResampler(vis_dim, queries, depth, heads, dim_head)
        self.proj = nn.Linear(vis_dim, dim)

    def forward(self, features):
        return self.proj(self.resampler(features))


class LDPv2(nn.Module):
    """MobileVLM V2's projector with the official names: ``mlp.mlp.{0,2}`` and ``peg.peg.0``."""

    def __init__(self, vis_dim: int, dim: int, grid: int, pool_grid: int):
        super().__init__()
        self.grid, self.pool_grid = grid, pool_grid
        self.mlp = nn.Module()
        self.mlp.mlp = nn.Sequential(nn.Linear(vis_dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.peg = nn.Module()
        self.peg.peg = nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim))

    def forward(self, x):
        b = x.shape[0]
        h = self.mlp.mlp(x)
        h = h.transpose(1, 2).reshape(b, -1, self.grid, self.grid)
        p = F.adaptive_avg_pool2d(h, (self.pool_grid, self.pool_grid))
        y = p + self.peg.peg(p)
        return y.flatten(2).transpose(1, 2)


class LDPConnector(nn.Module):
    def __init__(self, vis_dim: int, dim: int, grid: int):
        super().__init__()
        self.ldp = LDPv2(vis_dim, dim, grid, (grid + 1) // 2)

    def forward(self, features):
        return self.ldp(features)


def build(kind: str, args: dict, vis_dim: int, dim: int, grid: int) -> nn.Module:
    """The connector of ``kind`` (``"qformer"``, ``"resampler"``, ``"ldp"``) with ``args`` from its manifest."""
    if kind == "qformer":
        return QFormerConnector(args["queries"], vis_dim, dim, hidden=args["hidden"], layers=args["layers"],
                                heads=args["heads"], inter=args["intermediate"],
                                cross_attention_frequency=args["cross_attention_frequency"])  # fmt: skip
    if kind == "resampler":
        return ResamplerConnector(args["queries"], vis_dim, dim, depth=args["depth"], heads=args["heads"],
                                  dim_head=args["dim_head"])  # fmt: skip
    if kind == "ldp":
        return LDPConnector(vis_dim, dim, grid)
    raise ValueError(f"kind must be 'qformer', 'resampler' or 'ldp', got {kind!r}")
