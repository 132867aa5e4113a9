"""SnapKV: an observation window at the end of the prompt votes, per head, for the prefix tokens to keep.

Y. Li, Y. Huang, B. Yang, B. Venkitesh, A. Locatelli, H. Ye, T. Cai, P. Lewis, D. Chen, "SnapKV: LLM Knows What
You are Looking for Before Generation", NeurIPS 2024 (arXiv 2404.14469).

The observation: each head attends to a consistent set of prompt tokens during generation, and the last few
prompt tokens (the "observation window", usually where the question is) already attend to that set. SnapKV
compresses the prompt's cache once, after the prefill, per layer and per head. With ``A`` a head's prefill
attention weights, a prompt of ``T`` tokens and a window of ``w``:

    vote_j   = sum_{i = T-w}^{T-1} A[i, j]                          j = 0 .. T-w-1   (the prefix)
    pooled_j = pool(vote)_j      1-D pooling of width k, stride 1, padding k // 2
                                 (avgpool counts the zero padding, divides by k; maxpool pads with -inf)
    keep     = the C - w prefix tokens with the highest pooled vote, then the window's w tokens

where ``C = max_capacity_prompt`` is the cache budget. A prompt shorter than ``C`` is left as it is. The pooling
keeps neighbours of a selected token with it (the paper: "clustering", so a selected fact is not cut in pieces).
Tokens generated afterwards are appended without eviction. This follows the authors' ``SnapKVCluster.update_kv``
(FasterDecoding/SnapKV, ``snapkv_utils.py``): defaults there are ``window_size`` 32, ``kernel_size`` 5,
``pooling`` "avgpool".

Grouped-query attention: as kvpress's ``SnapKVPress`` does, each query head's vote is pooled, then the pooled
votes of the ``H / Hkv`` query heads that share a KV head are averaged; each KV head keeps its own tokens.
Ties go to the lower index (``torch.topk`` leaves them unspecified). The kept indices are returned sorted (the
authors gather in ``topk``'s order; attention does not depend on the order of the keys).

Shapes: ``H`` query heads, ``Hkv`` key/value heads, ``T`` prompt tokens, ``Q`` rows of the weights given
(the last ``w`` are the window's queries), ``d`` head size.

Deviations from the paper: (1) GQA aggregation as kvpress (above). (2) ``kernel_size`` must be odd: with an even
kernel the authors' padding makes the pooled vote one longer than the prefix. (3) The prompt includes the image:
on the tiny VLM the window is the last 8 tokens (the question, or the end of the image for a short prompt) and
the budget 64 of its ~150-175 tokens, scaled from the paper's window of 32 over prompts of thousands; the
answer's first token comes from the prefill logits, so only later tokens see the compressed cache. (4) Kept
keys keep their original rotation, as the authors' code; ``rerotate=True`` reads them at positions inside the
cache (kvpress's ``KeyRerotationPress``), see :mod:`mllm_ref.kvcache.streaming`.
"""

from __future__ import annotations

import numpy as np

from mllm_ref import _checks
from mllm_ref.kvcache.h2o import top_indices
from mllm_ref.kvcache.streaming import EvictedCache, EvictionPolicy
from mllm_ref.oracle.registry import Technique, register
from mllm_ref.tinyvlm.plugs import Plugs, PromptInfo

__all__ = ["make_policy", "snapkv", "snapkv_votes", "pool1d", "SnapKVPolicy", "POOLINGS", "DEFAULT_WINDOW", "DEFAULT_CAPACITY",
           "DEFAULT_KERNEL"]  # fmt: skip

POOLINGS = ("avgpool", "maxpool")


def pool1d(x: np.ndarray, kernel_size: int, pooling: str) -> np.ndarray:
    """Stride-1 pooling of width ``kernel_size`` (odd) along the last axis with padding ``kernel_size // 2``,
    keeping the length: ``avgpool`` sums the window and divides by ``kernel_size`` (zero padding counted, as
    ``torch.nn.functional.avg_pool1d`` does by default), ``maxpool`` takes the window's maximum (padding ignored)."""
    kernel_size = _checks.integer(kernel_size, "kernel_size", low=1)
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd, got {kernel_size}")
    _checks.choice(pooling, "pooling", POOLINGS)
    pad = kernel_size // 2
    n = x.shape[-1]
    fill = 0.0 if pooling == "avgpool" else -np.inf
    padded = np.concatenate([np.full(x.shape[:-1] + (pad,), fill), x.astype(np.float64),
                             np.full(x.shape[:-1] + (pad,), fill)], axis=-1)  # fmt: skip
    windows = np.stack([padded[..., i : i + n] for i in range(kernel_size)], axis=0)
    if pooling == "avgpool":
        return windows.sum(axis=0) / kernel_size
    return windows.max(axis=0)


def _validate(attn, kv_heads, window_size, max_capacity_prompt, kernel_size, pooling):
    attn = _checks.float_array(attn, "attn", ndim=3)
    kv_heads = _checks.integer(kv_heads, "kv_heads", low=1)
    h, q, t = attn.shape
    if h % kv_heads:
        raise ValueError(f"kv_heads must divide the query heads of attn (H = {h}), got {kv_heads}")
    w = _checks.integer(window_size, "window_size", low=1)
    c = _checks.integer(max_capacity_prompt, "max_capacity_prompt", low=2)
    if c <= w:
        raise ValueError(f"max_capacity_prompt must exceed window_size, got {c} <= {w}")
    if q < min(w, t):
        raise ValueError(f"attn must hold at least the window_size = {w} query rows, got {q}")
    kernel_size = _checks.integer(kernel_size, "kernel_size", low=1)
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd, got {kernel_size}")
    _checks.choice(pooling, "pooling", POOLINGS)
    if attn.min() < 0:
        raise ValueError("attn must hold attention weights (>= 0)")
    return attn, kv_heads, w, c, kernel_size, pooling


def snapkv_votes(attn: np.ndarray, kv_heads: int, window_size: int, kernel_size: int, pooling: str) -> np.ndarray:
    """The pooled votes of the window for the prefix, averaged per KV head: ``float64[kv_heads, T - w]``.

    ``attn`` is ``float[H, Q, T]``; its last ``window_size`` rows are the window's queries (the prompt's last
    ``w`` tokens).
    """
    h, _, t = attn.shape
    vote = np.sum(attn[:, -window_size:, : t - window_size], axis=1, dtype=np.float64)
    pooled = pool1d(vote, kernel_size, pooling)
    return pooled.reshape(kv_heads, h // kv_heads, t - window_size).mean(axis=1)


def snapkv(
    attn: np.ndarray,
    kv_heads: int,
    window_size: int,
    max_capacity_prompt: int,
    kernel_size: int = 5,
    pooling: str = "avgpool",
) -> np.ndarray:
    """SnapKV's selection of the prompt tokens each KV head keeps.

    Args:
        attn: ``float[H, Q, T]`` the prefill attention weights of the prompt's last ``Q >= window_size`` tokens
            over all ``T`` prompt tokens (the whole ``[H, T, T]`` will do; only the last ``w`` rows are read).
        kv_heads: ``Hkv``, dividing ``H``; query head ``i`` belongs to KV head ``i // (H / Hkv)``.
        window_size: ``w`` >= 1, the observation window.
        max_capacity_prompt: ``C`` > ``w``, the tokens kept per head when the prompt has at least ``C``.
        kernel_size: odd pooling width.
        pooling: ``"avgpool"`` or ``"maxpool"``.

    Returns:
        ``int64[Hkv, K]`` per KV head the kept prompt indices, ascending: every token when ``T < C`` (``K = T``),
        else ``K = C``: the ``C - w`` prefix tokens with the highest pooled vote (ties to the lower index) and
        the window's ``w`` tokens.
    """
    attn, hkv, w, c, kernel_size, pooling = _validate(attn, kv_heads, window_size, max_capacity_prompt,
                                                      kernel_size, pooling)  # fmt: skip
    t = attn.shape[2]
    if t < c:
        return np.broadcast_to(np.arange(t, dtype=np.int64), (hkv, t)).copy()
    votes = snapkv_votes(attn, hkv, w, kernel_size, pooling)
    chosen = top_indices(votes, c - w)
    window = np.broadcast_to(np.arange(t - w, t, dtype=np.int64), (hkv, w))
    return np.concatenate([chosen, window], axis=1)


# ------------------------------------------------------------------------------------------- the tiny VLM plug
#: The tiny VLM's default: an 8-token window and a budget of 64 of its ~150-175 prompt tokens, the authors'
#: kernel 5 with average pooling.
DEFAULT_WINDOW = 8
DEFAULT_CAPACITY = 64
DEFAULT_KERNEL = 5


class SnapKVPolicy(EvictionPolicy):
    """SnapKV on the tiny VLM: each layer compresses its prompt cache after the prefill to ``max_capacity_prompt``
    tokens per KV head; decode tokens are appended without eviction."""

    name = "snapkv"

    def __init__(self, window_size: int = DEFAULT_WINDOW, max_capacity_prompt: int = DEFAULT_CAPACITY,
                 kernel_size: int = DEFAULT_KERNEL, pooling: str = "avgpool", *, rerotate: bool = False,
                 theta: float = 10000.0):  # fmt: skip
        super().__init__(rerotate=rerotate, theta=theta)
        self.window = _checks.integer(window_size, "window_size", low=1)
        self.capacity = _checks.integer(max_capacity_prompt, "max_capacity_prompt", low=2)
        if self.capacity <= self.window:
            raise ValueError(f"max_capacity_prompt must exceed window_size, got {self.capacity} <= {self.window}")
        self.kernel = _checks.integer(kernel_size, "kernel_size", low=1)
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.pooling = _checks.choice(pooling, "pooling", POOLINGS)

    def needs_attention(self, layer: int) -> bool:
        return True  # the prefill's (the plug has no prefill-only switch; decode weights go unused)

    def store(self, layer, k, v, attn, info: PromptInfo, *, positions, n_visual) -> EvictedCache:
        if attn is None:
            raise ValueError("SnapKV needs the prefill attention weights (attn is None)")
        cache = self._new(k, v, positions)
        if k.shape[1] < self.capacity:
            return cache
        return cache.take(snapkv(attn, k.shape[0], self.window, self.capacity, self.kernel, self.pooling))

    def extend(self, layer, cache: EvictedCache, k, v, attn, *, position: int) -> EvictedCache:
        return self._append(cache, k, v, position)


def make_policy(budget: int, theta: float = 10000.0) -> SnapKVPolicy:
    """SnapKV compressing the prompt to ``budget`` tokens per KV head and layer (the observation window of
    :data:`DEFAULT_WINDOW` included; the chapter's sweep knob)."""
    budget = _checks.integer(budget, "budget", low=DEFAULT_WINDOW + 1)
    return SnapKVPolicy(DEFAULT_WINDOW, budget, theta=theta)


# ----------------------------------------------------------------------------------------------- registration
_SIZES = {
    # name: (heads, kv heads, prompt T, window, capacity, kernel, pooling)
    "tiny": (2, 1, 9, 2, 5, 3, "avgpool"),
    "small": (4, 2, 40, 6, 20, 5, "avgpool"),
    "small-max": (4, 2, 40, 6, 20, 5, "maxpool"),
    "short": (4, 2, 12, 4, 16, 5, "avgpool"),
    "tinyvlm": (4, 2, 152, DEFAULT_WINDOW, DEFAULT_CAPACITY, DEFAULT_KERNEL, "avgpool"),
    "llama": (32, 8, 4096, 32, 1024, 5, "avgpool"),
}


def _window_weights(rng: np.random.Generator, h: int, t: int, w: int) -> np.ndarray:
    """The last ``w`` causal rows of softmax attention, with logits spaced so that pooled votes are far from
    tied (a random permutation of well-spaced values per head)."""
    logits = np.empty((h, w, t))
    spaced = np.linspace(0.0, 8.0, t)
    for i in range(h):
        logits[i] = spaced[rng.permutation(t)][None, :] + 0.01 * rng.standard_normal((w, t))
    rows = np.arange(t - w, t)[:, None]
    logits = np.where(np.arange(t)[None, :] <= rows, logits, -np.inf)
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def _case(size: str, rng: np.random.Generator) -> dict:
    h, hkv, t, w, c, k, pooling = _SIZES[size]
    return {"attn": _window_weights(rng, h, t, w), "kv_heads": hkv, "window_size": w, "max_capacity_prompt": c,
            "kernel_size": k, "pooling": pooling}  # fmt: skip


def _cost(kw: dict) -> dict:
    h, w, t = kw["attn"].shape
    return {"flops": float(h * t * (w + kw["kernel_size"])), "bytes": float(kw["attn"].nbytes)}


def _strategy():
    from hypothesis import strategies as st

    @st.composite
    def cases(draw):
        hkv = draw(st.integers(1, 2))
        h = hkv * draw(st.integers(1, 3))
        t = draw(st.integers(1, 50))
        w = draw(st.integers(1, max(1, min(t, 10))))
        c = draw(st.integers(w + 1, w + 40))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        return {"attn": _window_weights(rng, h, t, min(w, t)), "kv_heads": hkv, "window_size": w,
                "max_capacity_prompt": c, "kernel_size": draw(st.sampled_from([1, 3, 5, 7])),
                "pooling": draw(st.sampled_from(POOLINGS))}  # fmt: skip

    return cases()


register(
    Technique(
        id="kvcache.snapkv",
        reference=snapkv,
        make_case=_case,
        paper=(
            "Y. Li, Y. Huang, B. Yang, B. Venkitesh, A. Locatelli, H. Ye, T. Cai, P. Lewis, D. Chen, SnapKV: LLM "
            "Knows What You are Looking for Before Generation, NeurIPS 2024 (arXiv 2404.14469)"
        ),
        test_sizes=("tiny", "small", "small-max", "short", "tinyvlm"),
        bench_sizes=("llama",),
        compare="exact",
        strategy=_strategy,
        cost=_cost,
        chapter="book/04-kv-cache.md",
        model_level=True,
        notes=(
            "window votes summed, pooled per query head (avg counts the padding), group mean per KV head "
            "(kvpress); top C - w of the prefix + the window, ties to the lower index, sorted; prompt only, "
            "decode tokens appended; odd kernels only"
        ),
        extra={
            "question_after_image": True,
            "plugs": lambda model: Plugs(kv_policy=SnapKVPolicy(theta=model.config.rope_theta)),
            "setting": f"window {DEFAULT_WINDOW}, capacity {DEFAULT_CAPACITY} per KV head, avgpool {DEFAULT_KERNEL}",
        },
    )
)
