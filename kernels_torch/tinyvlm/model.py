"""The torch twin of the tiny VLM: the same network as :mod:`mllm_ref.tinyvlm.model`, used to train it.

Parameter names and layouts are those of the shipped weights file (PyTorch ``[out, in]`` linear weights), so a
state dict maps one to one onto the NumPy reference. Besides the plain forward, :meth:`TinyVLM.forward` takes an
explicit attention mask and text positions, which lets training pack several question/answer segments after one
image: each segment sees the image and its own earlier tokens, and its positions restart after the image, so
every segment computes exactly what a single-question prompt computes at inference.

Position ids (as in :mod:`mllm_ref.tinyvlm.model`): every visual token has position 0 and text follows at 1, 2, ...
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mllm_ref.tinyvlm.config import TinyVLMConfig


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """``[B, H, W, C]`` -> ``[B, N, patch*patch*C]``, patches row-major, pixels row-major then channels."""
    b, h, w, c = images.shape
    x = images.reshape(b, h // patch, patch, w // patch, patch, c)
    x = x.permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE. ``x``: ``[B, H, T, d]``; ``positions``: ``[B, T]`` (integers)."""
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d // 2, dtype=torch.float64, device=x.device) * 2.0 / d)
    ang = positions.to(torch.float64)[..., None] * inv  # [B, T, d/2]
    cos = torch.cos(ang).to(x.dtype)[:, None]
    sin = torch.sin(ang).to(x.dtype)[:, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class VisionBlock(nn.Module):
    def __init__(self, cfg: TinyVLMConfig):
        super().__init__()
        d = cfg.vis_dim
        self.heads = cfg.vis_heads
        self.ln1 = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln2 = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.fc1 = nn.Linear(d, cfg.vis_mlp)
        self.fc2 = nn.Linear(cfg.vis_mlp, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.ln1(x)
        q, k, v = (p(h).view(b, n, self.heads, d // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.o(a.transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: TinyVLMConfig):
        super().__init__()
        d, hd = cfg.dim, cfg.head_dim
        self.cfg = cfg
        self.norm1 = nn.RMSNorm(d, eps=cfg.rms_eps)
        self.q = nn.Linear(d, cfg.heads * hd, bias=False)
        self.k = nn.Linear(d, cfg.kv_heads * hd, bias=False)
        self.v = nn.Linear(d, cfg.kv_heads * hd, bias=False)
        self.o = nn.Linear(cfg.heads * hd, d, bias=False)
        self.norm2 = nn.RMSNorm(d, eps=cfg.rms_eps)
        self.gate = nn.Linear(d, cfg.ffn_dim, bias=False)
        self.up = nn.Linear(d, cfg.ffn_dim, bias=False)
        self.down = nn.Linear(cfg.ffn_dim, d, bias=False)

    def attention_half(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor):
        """``x + o(attention(norm1(x)))``, and the rotated queries and (repeated) keys ``[B, H, T, d]``."""
        cfg = self.cfg
        b, t, d = x.shape
        h = self.norm1(x)
        q = self.q(h).view(b, t, cfg.heads, cfg.head_dim).transpose(1, 2)
        k = self.k(h).view(b, t, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        v = self.v(h).view(b, t, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
        rep = cfg.heads // cfg.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
        return x + self.o(a.transpose(1, 2).reshape(b, t, cfg.heads * cfg.head_dim)), q, k

    def ffn_half(self, x: torch.Tensor, width: int | None = None) -> torch.Tensor:
        """``x + FFN(norm2(x))``; with ``width``, only the FFN's first ``width`` hidden units (MatFormer)."""
        h = self.norm2(x)
        if width is None:
            return x + self.down(F.silu(self.gate(h)) * self.up(h))
        g, u = F.linear(h, self.gate.weight[:width]), F.linear(h, self.up.weight[:width])
        return x + F.linear(F.silu(g) * u, self.down.weight[:, :width])

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, probe: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """One layer. With ``probe``, also the log attention weights ``[B, T, T]`` of head 0 (for training)."""
        cfg = self.cfg
        x, q, k = self.attention_half(x, positions, mask)
        x = self.ffn_half(x)
        if not probe:
            return x
        scores = (q[:, 0] @ k[:, 0].transpose(-1, -2)) / math.sqrt(cfg.head_dim)
        return x, torch.log_softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)


class TinyVLM(nn.Module):
    """The tiny VLM in torch. Parameter names are the keys of the shipped weights file."""

    def __init__(self, cfg: TinyVLMConfig):
        super().__init__()
        self.cfg = cfg
        pp = cfg.patch_size * cfg.patch_size * cfg.channels
        self.patch = nn.Linear(pp, cfg.vis_dim)
        self.pos = nn.Parameter(torch.randn(cfg.n_patches, cfg.vis_dim) * 0.02)
        self.vis = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.vis_layers))
        self.vis_norm = nn.LayerNorm(cfg.vis_dim, eps=cfg.ln_eps)
        self.proj1 = nn.Linear(cfg.vis_dim, cfg.proj_hidden)
        self.proj2 = nn.Linear(cfg.proj_hidden, cfg.dim)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.dec = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def vision_features(self, images: torch.Tensor) -> torch.Tensor:
        """``images``: float ``[B, H, W, 3]`` in [0, 1] (uint8 / 255) -> encoder output ``[B, N, vis_dim]``."""
        x = self.patch(patchify(images - 0.5, self.cfg.patch_size)) + self.pos
        for blk in self.vis:
            x = blk(x)
        return self.vis_norm(x)

    def connector(self, features: torch.Tensor) -> torch.Tensor:
        """Encoder output ``[B, N, vis_dim]`` -> visual tokens ``[B, N, dim]``."""
        return self.proj2(F.gelu(self.proj1(features), approximate="tanh"))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """``images``: float ``[B, H, W, 3]`` in [0, 1] (uint8 / 255) -> visual tokens ``[B, N, dim]``."""
        return self.connector(self.vision_features(images))

    def forward(
        self,
        images: torch.Tensor,
        tokens: torch.Tensor,
        text_positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        return_features: bool = False,
        visual_keep: torch.Tensor | None = None,
        drop_after: int = 0,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits ``[B, N + T, vocab]`` for the sequence ``[visual tokens, text tokens]``.

        ``text_positions``: ``[B, T]`` positions of the text tokens (default ``1, 2, ...``; visual tokens are at
        0); ``mask``: bool ``[B, N+T, N+T]``, True where a query may attend a key (default causal). With
        ``return_features`` the encoder output ``[B, N, vis_dim]``, the visual tokens ``[B, N, dim]`` and the log
        attention weights of decoder layer 0, head 0 (``[B, N+T, N+T]``) are returned too (training supervises
        them). ``visual_keep``: bool ``[B, N]``; decoder layers after layer ``drop_after`` see only the kept
        visual tokens as keys, which is what a token policy's dropping after prefill layer ``drop_after`` does for
        every token that stays (training uses it to make the model robust to dropped tokens).
        """
        features = self.vision_features(images)
        vis = self.connector(features)
        b, n, _ = vis.shape
        t = tokens.shape[1]
        x = torch.cat([vis, self.embed(tokens)], dim=1)
        if text_positions is None:
            text_positions = torch.arange(1, 1 + t, device=x.device).expand(b, t)
        positions = torch.cat([torch.zeros(b, n, dtype=torch.long, device=x.device), text_positions], dim=1)
        if mask is None:
            mask = torch.ones(n + t, n + t, dtype=torch.bool, device=x.device).tril().expand(b, -1, -1)
        log_attn0 = None
        dropped = None
        if visual_keep is not None:
            keys = torch.cat([visual_keep, torch.ones(b, t, dtype=torch.bool, device=x.device)], dim=1)
            # a dropped token still attends itself, so its (unused) row is never empty
            dropped = (mask & keys[:, None, :]) | (torch.eye(n + t, dtype=torch.bool, device=x.device) & ~keys[:, :, None])
        for i, blk in enumerate(self.dec):
            if dropped is not None and i > drop_after:
                x = blk(x, positions, dropped)
            elif return_features and i == 0:
                x, log_attn0 = blk(x, positions, mask, probe=True)
            else:
                x = blk(x, positions, mask)
        logits = self.lm_head(self.norm(x))
        return (logits, features, vis, log_attn0) if return_features else logits


def param_count(model: nn.Module) -> int:
    """Number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())
