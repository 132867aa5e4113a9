"""Parallel blocks: attention and FFN computed side by side from the same input instead of one after the other.

Papers: B. Wang, A. Komatsuzaki, GPT-J-6B (2021) and A. Chowdhery et al., PaLM, JMLR 2023 (arXiv 2204.02311) use the
parallel formulation; M. Shukor, M. Cord, Skipping Computations in Multimodal LLMs, 2024 (arXiv 2410.09454) turn a
trained multimodal LLM's sequential blocks into parallel ones. Survey: parallelism / dynamic computation.

A pre-norm decoder block, sequential and parallel (:func:`decoder_block`, the reference)::

    sequential:  y = x + A(N1(x));   out = y + F(N2(y))
    parallel:    out = x + A(N1(x)) + F(N2(x))

where ``A`` is grouped-query attention with RoPE (over the block's own tokens, causally) and ``F`` the SwiGLU FFN.
In the parallel block both branches read ``x``, so they can run at the same time (two streams, or one fused input
projection); the depth of the dependency chain halves. A model trained sequentially loses accuracy when its blocks
are run in parallel; Shukor & Cord measure how much, and the tour does the same on the tiny VLM
(:class:`ParallelBlocks`: the chosen layers run as parallel blocks in the prefill and in decoding).

Shapes: T tokens, D width, H/Hkv query/key-value heads, d head size, F FFN hidden units.

Deviations from the papers: none in the block; the tiny VLM is not retrained for the parallel form.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mllm_ref import _checks
from mllm_ref.nn.activations import silu
from mllm_ref.nn.attention import attention
from mllm_ref.nn.rmsnorm import rmsnorm
from mllm_ref.nn.rope import rope
from mllm_ref.oracle.registry import Technique, register
from mllm_ref.tinyvlm.plugs import ExitPolicy


def decoder_block(
    x: np.ndarray, norm1: np.ndarray, wq: np.ndarray, wk: np.ndarray, wv: np.ndarray, wo: np.ndarray,
    norm2: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray, *, heads: int, kv_heads: int,
    parallel: bool = False, theta: float = 10000.0, eps: float = 1e-6,
) -> np.ndarray:  # fmt: skip
    """One pre-norm decoder block over ``x`` ``float[T, D]`` at positions ``0 .. T-1``, causal.

    Weights are ``[out, in]``: ``wq`` ``[H d, D]``, ``wk``/``wv`` ``[Hkv d, D]``, ``wo`` ``[D, H d]``, ``gate``/``up``
    ``[F, D]``, ``down`` ``[D, F]``; ``norm1``/``norm2`` ``[D]``. Returns ``float[T, D]``.
    """
    x = _checks.float_array(x, "x", ndim=2)
    arrays = {"norm1": norm1, "wq": wq, "wk": wk, "wv": wv, "wo": wo, "norm2": norm2, "gate": gate, "up": up,
              "down": down}  # fmt: skip
    for name, a in arrays.items():
        arrays[name] = _checks.float_array(a, name, ndim=1 if name.startswith("norm") else 2)
        _checks.same_dtype("x", x, name, arrays[name])
    heads = _checks.integer(heads, "heads", low=1)
    kv_heads = _checks.integer(kv_heads, "kv_heads", low=1)
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    if not isinstance(parallel, bool):
        raise TypeError(f"parallel must be a bool, got {type(parallel).__name__}")
    d_model = x.shape[1]
    for name in ("norm1", "norm2"):
        _checks.dim(name, arrays[name], 0, d_model, "the width of x")
    for name in ("wq", "wk", "wv", "gate", "up"):
        _checks.dim(name, arrays[name], 1, d_model, "the width of x")
    if arrays["wq"].shape[0] % heads or arrays["wk"].shape[0] % kv_heads:
        raise ValueError("wq rows must split into heads and wk rows into kv_heads")
    hd = arrays["wq"].shape[0] // heads
    for name in ("wk", "wv"):
        _checks.dim(name, arrays[name], 0, kv_heads * hd, "kv_heads times the head size of wq")
    if arrays["wo"].shape != (d_model, heads * hd):
        raise ValueError(f"wo must have shape {(d_model, heads * hd)}, got {arrays['wo'].shape}")
    if arrays["up"].shape != arrays["gate"].shape or arrays["down"].shape != (d_model, arrays["gate"].shape[0]):
        raise ValueError("up must have gate's shape and down the shape [D, F]")
    theta = _checks.real(theta, "theta", low=0.0, low_open=True)
    eps = _checks.real(eps, "eps", low=0.0, low_open=True)
    a = arrays
    t = x.shape[0]
    pos = np.arange(t)
    h = rmsnorm(x, a["norm1"], eps=eps)
    q = rope((h @ a["wq"].T).reshape(t, heads, hd).transpose(1, 0, 2), pos, theta=theta)
    k = rope((h @ a["wk"].T).reshape(t, kv_heads, hd).transpose(1, 0, 2), pos, theta=theta)
    v = (h @ a["wv"].T).reshape(t, kv_heads, hd).transpose(1, 0, 2)
    att = attention(q[None], k[None], v[None], causal=True)[0]
    attn_out = att.transpose(1, 0, 2).reshape(t, heads * hd) @ a["wo"].T
    y = x if parallel else x + attn_out
    h2 = rmsnorm(y, a["norm2"], eps=eps)
    ffn = (silu(h2 @ a["gate"].T) * (h2 @ a["up"].T)) @ a["down"].T
    return x + attn_out + ffn


@dataclass
class ParallelBlocks(ExitPolicy):
    """Run the decoder layers in ``layers`` as parallel blocks (prefill and decoding)."""

    layers: tuple[int, ...] = ()

    name = "parallel_block"


    def parallel(self, layer) -> bool:
        return layer in self.layers


# ----------------------------------------------------------------------------------------------- registration
_SIZES = {"tiny": (3, 8, 2, 1, 12), "tinyvlm": (16, 128, 4, 2, 352)}


def _case(size: str, rng: np.random.Generator) -> dict:
    t, d, h, hkv, f = _SIZES[size]
    hd = d // h

    def w(o, i):
        return (rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32)

    return {
        "x": rng.standard_normal((t, d)).astype(np.float32),
        "norm1": (1 + 0.1 * rng.standard_normal(d)).astype(np.float32), "wq": w(h * hd, d), "wk": w(hkv * hd, d),
        "wv": w(hkv * hd, d), "wo": w(d, h * hd), "norm2": (1 + 0.1 * rng.standard_normal(d)).astype(np.float32),
        "gate": w(f, d), "up": w(f, d), "down": w(d, f), "heads": h, "kv_heads": hkv, "parallel": size == "tinyvlm",
    }  # fmt: skip


def _rows(model):
    n = model.config.layers
    return [
        ("the last 2 layers parallel", ParallelBlocks(tuple(range(n - 2, n))).plugs()),
        ("every other layer parallel", ParallelBlocks(tuple(range(1, n, 2))).plugs()),
        ("all 12 layers parallel (not retrained)", ParallelBlocks(tuple(range(n))).plugs()),
    ]


register(
    Technique(
        id="dynamic.parallel_block",
        reference=decoder_block,
        make_case=_case,
        paper=(
            "A. Chowdhery et al., PaLM: Scaling Language Modeling with Pathways, JMLR 2023 (arXiv 2204.02311); "
            "M. Shukor, M. Cord, Skipping Computations in Multimodal LLMs, 2024 (arXiv 2410.09454)"
        ),
        test_sizes=("tiny", "tinyvlm"),
        chapter="book/06-early-exit.md",
        model_level=True,
        notes="x + A(N1 x) + F(N2 x) instead of the sequential block; the tiny VLM converted without retraining",
        extra={"rows": _rows},
    )
)
