"""H2O, the Heavy-Hitter Oracle: keep the tokens with the most accumulated attention, plus the recent ones.

Z. Zhang, Y. Sheng, T. Zhou, T. Chen, L. Zheng, R. Cai, Z. Song, Y. Tian, C. Ré, C. Barrett, Z. Wang, B. Chen,
"H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models", NeurIPS 2023
(arXiv 2306.14048).

The observation: the attention a token receives, summed over the queries that have seen it, follows a power law;
a few "heavy hitters" collect most of it and keep collecting it. H2O keeps a cache of ``h + r`` tokens per head:
the ``r`` most recent and the ``h`` others with the highest accumulated score. With ``A`` a head's attention
weights (rows are queries), the score of cached token ``j`` is

    score_j = sum over every query i that attended to j of A[i, j]

accumulated across steps: a token's score starts with the prefill's column sum (or the weight it gives itself
when it arrives at a decode step) and each step adds the new query's weight on it. When the cache of ``S`` tokens
exceeds ``h + r`` (the authors' ``H2OKVCache_LayerWise`` in FMInference/H2O, ``utils_real_drop``):

    heavy = the h indices of [0, S - r) with the highest score;   keep = sorted(heavy) U [S - r, S)

and the evicted tokens' scores are dropped with them. Ties go to the lower index (``torch.topk`` leaves them
unspecified).

Grouped-query attention: the authors' code is for multi-head attention; here the ``H / Hkv`` query heads that
share a KV head score its tokens with the mean of their weights, the aggregation kvpress uses for its
attention-based presses. Each KV head keeps its own ``h + r`` tokens.

Shapes: ``H`` query heads, ``Hkv`` key/value heads, ``Q`` queries, ``S`` cached tokens, ``d`` head size.

Deviations from the paper: (1) GQA aggregation by the group mean (above). (2) The prompt is prefilled with full
attention and then cut to the budget (the authors' real-drop code does the same); on the tiny VLM the answer's
first token comes from the prefill logits and only later tokens see the evicted cache. (3) Positions: by default
the kept keys keep their original rotation (the authors' ``H2OLlamaAttention``); ``rerotate=True`` gives their
"position rolling" variant (``H2OLlamaAttention_streaming``): keys read at positions inside the cache, as
:mod:`mllm_ref.kvcache.streaming` does. (4) Scores accumulate in float64. Default on the tiny VLM (a 150-175-token
context): a budget of 64 per KV head, half heavy hitters and half recent (the authors' equal split).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from mllm_ref import _checks
from mllm_ref.kvcache.streaming import EvictedCache, EvictionPolicy
from mllm_ref.oracle.registry import Technique, register
from mllm_ref.tinyvlm.plugs import Plugs, PromptInfo

__all__ = ["make_policy", "h2o", "h2o_scores", "top_indices", "H2OPolicy", "DEFAULT_HEAVY", "DEFAULT_RECENT"]


def top_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Per row, the ``k`` indices of the highest ``scores`` (ties to the lower index), ascending: ``int64[R, k]``."""
    order = np.argsort(-scores, axis=-1, kind="stable")[:, :k]
    return np.sort(order, axis=-1).astype(np.int64)


def h2o_scores(attn: np.ndarray, kv_heads: int) -> np.ndarray:
    """Accumulated attention per KV head: ``attn`` ``float[H, Q, S]`` summed over the queries, averaged over each
    group of ``H / kv_heads`` query heads (head ``i`` belongs to KV head ``i // (H / kv_heads)``).

    Returns:
        ``float64[kv_heads, S]``.
    """
    attn = _checks.float_array(attn, "attn", ndim=3, allow_empty=True)
    kv_heads = _checks.integer(kv_heads, "kv_heads", low=1)
    h, _, s = attn.shape
    if h % kv_heads:
        raise ValueError(f"kv_heads must divide the query heads of attn (H = {h}), got {kv_heads}")
    if attn.size and attn.min() < 0:
        raise ValueError("attn must hold attention weights (>= 0)")
    col = np.sum(attn, axis=1, dtype=np.float64)
    return col.reshape(kv_heads, h // kv_heads, s).mean(axis=1)


def h2o(scores: np.ndarray, heavy_budget: int, recent_budget: int) -> np.ndarray:
    """H2O's eviction of a cache of ``S`` tokens with accumulated scores ``scores``.

    Args:
        scores: ``float[Hkv, S]`` accumulated attention per KV head (:func:`h2o_scores`), >= 0.
        heavy_budget: ``h``, heavy hitters kept per head, >= 0.
        recent_budget: ``r``, recent tokens kept per head, >= 0.

    Returns:
        ``int64[Hkv, K]``, per head the kept indices ascending, ``K = min(S, h + r)``: the last ``r`` tokens and
        the ``h`` of the others with the highest score (ties to the lower index).
    """
    scores = _checks.float_array(scores, "scores", ndim=2, allow_empty=True)
    h = _checks.integer(heavy_budget, "heavy_budget", low=0)
    r = _checks.integer(recent_budget, "recent_budget", low=0)
    if scores.size and scores.min() < 0:
        raise ValueError("scores must be accumulated attention weights (>= 0)")
    hkv, s = scores.shape
    if s <= h + r:
        return np.broadcast_to(np.arange(s, dtype=np.int64), (hkv, s)).copy()
    heavy = top_indices(scores[:, : s - r].astype(np.float64), h)
    recent = np.broadcast_to(np.arange(s - r, s, dtype=np.int64), (hkv, r))
    return np.concatenate([heavy, recent], axis=1)


# ------------------------------------------------------------------------------------------- the tiny VLM plug
#: The tiny VLM's default: 32 heavy hitters + 32 recent tokens = 64 per KV head, of its ~150-175 tokens.
DEFAULT_HEAVY = 32
DEFAULT_RECENT = 32


class H2OPolicy(EvictionPolicy):
    """H2O on the tiny VLM: every layer scores its cached tokens with the attention they receive (prefill and
    every decode step, group mean over the query heads of a KV head) and keeps ``heavy + recent`` per KV head."""

    name = "h2o"

    def __init__(self, heavy_budget: int = DEFAULT_HEAVY, recent_budget: int = DEFAULT_RECENT, *,
                 rerotate: bool = False, theta: float = 10000.0):  # fmt: skip
        super().__init__(rerotate=rerotate, theta=theta)
        self.heavy = _checks.integer(heavy_budget, "heavy_budget", low=0)
        self.recent = _checks.integer(recent_budget, "recent_budget", low=0)
        if self.heavy + self.recent < 1:
            raise ValueError("heavy_budget + recent_budget must be >= 1")

    def needs_attention(self, layer: int) -> bool:
        return True

    def _evict(self, cache: EvictedCache) -> EvictedCache:
        if cache.k.shape[1] <= self.heavy + self.recent:
            return cache
        return cache.take(h2o(cache.scores, self.heavy, self.recent))

    def store(self, layer, k, v, attn, info: PromptInfo, *, positions, n_visual) -> EvictedCache:
        if attn is None:
            raise ValueError("H2O needs the prefill attention weights (attn is None)")
        return self._evict(self._new(k, v, positions, h2o_scores(attn, k.shape[0])))

    def extend(self, layer, cache: EvictedCache, k, v, attn, *, position: int) -> EvictedCache:
        s = cache.k.shape[1]
        if attn is None:  # a token whose attention did not run (an early exit's propagated state): no votes
            return self._evict(self._append(cache, k, v, position))
        add = h2o_scores(attn, k.shape[0])
        if add.shape[1] != s + 1:
            raise ValueError(f"attn must cover the {s} cached tokens and the new one, got {add.shape[1]}")
        grown = replace(cache, scores=cache.scores + add[:, :s])
        return self._evict(self._append(grown, k, v, position, add[:, s:]))


def make_policy(budget: int, theta: float = 10000.0) -> H2OPolicy:
    """H2O keeping ``budget`` tokens per KV head and layer, half heavy hitters and half recent (the paper's split;
    the chapter's sweep knob)."""
    budget = _checks.integer(budget, "budget", low=2)
    return H2OPolicy(budget // 2, budget - budget // 2, theta=theta)


# ----------------------------------------------------------------------------------------------- registration
_SIZES = {
    # name: (kv heads, cached tokens S, heavy, recent)
    "tiny": (1, 7, 2, 2),
    "small": (2, 40, 8, 6),
    "short": (2, 9, 8, 6),
    "tinyvlm": (2, 152, DEFAULT_HEAVY, DEFAULT_RECENT),
    "llama": (8, 4096, 512, 512),
}


def _scores(rng: np.random.Generator, hkv: int, s: int) -> np.ndarray:
    """Accumulated scores far from tied: a permutation of well-spaced values per head."""
    base = np.linspace(0.5, 40.0, s)
    return np.stack([base[rng.permutation(s)] for _ in range(hkv)]).astype(np.float32)


def _case(size: str, rng: np.random.Generator) -> dict:
    hkv, s, h, r = _SIZES[size]
    return {"scores": _scores(rng, hkv, s), "heavy_budget": h, "recent_budget": r}


def _cost(kw: dict) -> dict:
    hkv, s = kw["scores"].shape
    return {"flops": float(hkv * s * max(np.log2(max(s, 2)), 1.0)), "bytes": float(kw["scores"].nbytes)}


def _strategy():
    from hypothesis import strategies as st

    @st.composite
    def cases(draw):
        hkv, s = draw(st.integers(1, 3)), draw(st.integers(0, 50))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        scores = _scores(rng, hkv, s) if draw(st.booleans()) else rng.integers(0, 4, (hkv, s)).astype(np.float64)
        return {"scores": scores, "heavy_budget": draw(st.integers(0, 20)), "recent_budget": draw(st.integers(0, 20))}

    return cases()


register(
    Technique(
        id="kvcache.h2o",
        reference=h2o,
        make_case=_case,
        paper=(
            "Z. Zhang, Y. Sheng, T. Zhou, T. Chen, L. Zheng, R. Cai, Z. Song, Y. Tian, C. Ré, C. Barrett, Z. Wang, "
            "B. Chen, H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models, "
            "NeurIPS 2023 (arXiv 2306.14048)"
        ),
        test_sizes=("tiny", "small", "short", "tinyvlm"),
        bench_sizes=("llama",),
        compare="exact",
        strategy=_strategy,
        cost=_cost,
        chapter="book/04-kv-cache.md",
        model_level=True,
        notes=(
            "heavy hitters by accumulated attention + recent window per KV head, as the authors' real-drop cache; "
            "GQA: group mean of the query heads' weights (kvpress); ties to the lower index; original positions "
            "by default (rerotate=True: their position rolling)"
        ),
        extra={
            "question_after_image": True,
            "plugs": lambda model: Plugs(kv_policy=H2OPolicy(theta=model.config.rope_theta)),
            "setting": f"{DEFAULT_HEAVY} heavy + {DEFAULT_RECENT} recent = {DEFAULT_HEAVY + DEFAULT_RECENT} tokens "
            "per KV head and layer",
        },
    )
)
