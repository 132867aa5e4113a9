"""StreamingLLM: keep the attention sinks and a window of recent tokens, at positions inside the cache.

G. Xiao, Y. Tian, B. Chen, S. Han, M. Lewis, "Efficient Streaming Language Models with Attention Sinks",
ICLR 2024 (arXiv 2309.17453).

The observation: the first few tokens of a sequence receive a large share of every query's attention whatever
their content (the softmax must put its mass somewhere; the tokens every query can see become "sinks"). A
sliding window that evicts them collapses; keeping them rescues it. The cache of a sequence of length ``T`` keeps

    keep = [0, 1, ..., s - 1]  U  [T - r, ..., T - 1]          (when T > s + r; else every token)

``s = start_size`` sinks and ``r = recent_size`` recent tokens, ``s + r`` tokens in all. The authors' code
(mit-han-lab/streaming-llm, ``StartRecentKVCache``) cuts the cache to this set before each new token, and its
modified attention ("pos_shift") gives RoPE the positions *inside the cache* instead of the positions in the
text: the kept keys at ``0 .. K-1`` and the query at ``K``. Keys are cached unrotated there and rotated at every
step; here the cache holds keys rotated at their original positions and re-rotates them
(:func:`mllm_ref.nn.rope.rerotate`, ``R(new) = R(new - old) R(old)``), as kvpress's ``KeyRerotationPress`` does.

Positions inside the cache (:func:`cache_positions`): the kept tokens' position ids renumbered consecutively in
their order, equal ids staying equal (the dense rank of each id among the kept ones). With distinct ids this is
exactly the authors' ``0 .. K-1``; in the tiny VLM, whose visual tokens all share position id 0, the kept visual
tokens keep one shared id. RoPE depends only on the difference of the query's and the key's positions, so the
policy leaves the model's query position ``p`` as it is and moves the kept keys to ``p - U + rank`` (``U`` distinct
ranks): the keys end just before the query, the same differences as the authors' positions. Each time the window
slides, every kept key (the sinks included) moves by the same offsets again; keys are always re-rotated from their
original rotation, so rounding does not pile up over steps.

This module also holds what the family's eviction policies share: :class:`EvictedCache`, the cache value
(kept keys, values, their original position ids per KV head, the accumulated scores of H2O), and
:class:`EvictionPolicy`, the KV plug that reads it, re-rotating on request.

Shapes: ``T`` tokens before eviction, ``K`` kept, ``Hkv`` key/value heads, ``H`` query heads, ``d`` head size,
``S`` cached tokens.

Deviations from the paper: (1) the authors evict before each step so that the new token is one of the ``r``
recent ones (the step attends over ``s + r`` keys); here the cache holds ``s + r`` tokens between steps, as H2O's
code does, and the step attends over them and the new token (``s + r + 1``), so every policy of the family keeps
exactly its budget between steps. (2) The prompt is prefilled with full attention and then cut to the budget (the
authors' chat demo does the same: it evicts between prompts, not inside one); on the tiny VLM the answer's first
token comes from the prefill logits and only later tokens see the evicted cache. (3) Keys are re-rotated from
their original rotation instead of cached unrotated (the same numbers up to rounding; the test checks it against
keys rotated at the new positions directly). (4) Positions with ties (the tiny VLM's visual tokens) are ranked
densely, which the paper, written for text, does not need. Default on the tiny VLM (a 150-175-token context):
4 sinks, as the paper, and 60 recent tokens, a budget of 64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mllm_ref import _checks
from mllm_ref.nn.rope import rerotate
from mllm_ref.oracle.registry import Technique, register
from mllm_ref.tinyvlm.plugs import KVPolicy, Plugs, PromptInfo

__all__ = ["make_policy", "streaming", "streaming_keep", "cache_positions", "EvictedCache", "EvictionPolicy", "StreamingPolicy",
           "DEFAULT_START", "DEFAULT_RECENT"]  # fmt: skip


# ---------------------------------------------------------------------------------------------- the reference
def streaming_keep(length: int, start_size: int, recent_size: int) -> np.ndarray:
    """The tokens StreamingLLM keeps of a sequence of ``length``: ``int64[min(length, s + r)]``, ascending."""
    t = _checks.integer(length, "length", low=0)
    s = _checks.integer(start_size, "start_size", low=0)
    r = _checks.integer(recent_size, "recent_size", low=0)
    if t <= s + r:
        return np.arange(t, dtype=np.int64)
    return np.concatenate([np.arange(s, dtype=np.int64), np.arange(t - r, t, dtype=np.int64)])


def cache_positions(positions) -> np.ndarray:
    """Positions inside the cache: each id's dense rank among ``positions`` (last axis), in ``int64``.

    ``positions`` ``int[..., S]`` are the kept tokens' position ids, >= 0, non-decreasing along the last axis (the
    cache keeps tokens in their order). Distinct ids become ``0 .. S-1``; equal ids share one rank.
    """
    pos = _checks.int_array(positions, "positions", ndim=(1, 2), low=0)
    if pos.shape[-1] and np.any(np.diff(pos, axis=-1) < 0):
        raise ValueError("positions must be non-decreasing along the last axis (the tokens' order in the cache)")
    pos = pos.astype(np.int64)
    if pos.shape[-1] == 0:
        return pos.copy()
    new = np.concatenate([np.zeros(pos.shape[:-1] + (1,), dtype=np.int64), (np.diff(pos, axis=-1) > 0)], axis=-1)
    return np.cumsum(new, axis=-1, dtype=np.int64)


def streaming(positions, start_size: int, recent_size: int) -> tuple[np.ndarray, np.ndarray]:
    """StreamingLLM's eviction of a cache whose tokens have position ids ``positions``.

    Args:
        positions: ``int[T]`` the cached tokens' position ids, in cache order (non-decreasing, >= 0).
        start_size: ``s``, the attention sinks (the first tokens), >= 0.
        recent_size: ``r``, the recent tokens, >= 0.

    Returns:
        ``(keep, new_positions)``: ``int64[K]`` the kept indices, ascending, ``K = min(T, s + r)``; and
        ``int64[K]`` their positions inside the cache (:func:`cache_positions`, ``0 .. K-1`` for distinct ids).
    """
    pos = _checks.int_array(positions, "positions", ndim=1, low=0)
    keep = streaming_keep(pos.size, start_size, recent_size)
    return keep, cache_positions(pos[keep])


# ------------------------------------------------------------------------------ the family's cache and plug
@dataclass(frozen=True)
class EvictedCache:
    """A layer's cache after eviction.

    Attributes:
        k: ``float32[Hkv, S, d]`` kept keys, rotated at their *original* positions.
        v: ``float32[Hkv, S, dv]`` kept values.
        positions: ``int64[Hkv, S]`` the kept tokens' original position ids (per head: H2O and SnapKV keep
            different tokens in each head), non-decreasing along ``S``.
        next_position: the position id of the next token (the query of the next step).
        scores: ``float64[Hkv, S]`` accumulated attention (H2O), or ``None``.
        index: ``int64[Hkv, S]`` each kept token's index in the sequence the layer's prefill saw (visual tokens
            first, then the prompt), generated tokens numbered on (what :meth:`KVPolicy.kept_tokens` reports;
            bookkeeping for drawing, not counted in :meth:`EvictionPolicy.nbytes`).
        next_index: the index the next token gets.
    """

    k: np.ndarray
    v: np.ndarray
    positions: np.ndarray
    next_position: int
    scores: np.ndarray | None = None
    index: np.ndarray | None = None
    next_index: int = 0

    def take(self, keep: np.ndarray) -> "EvictedCache":
        """Keep ``keep`` ``int[Hkv, K]`` (per head, ascending indices into ``S``)."""
        idx = keep[:, :, None]
        scores = None if self.scores is None else np.take_along_axis(self.scores, keep, axis=1)
        index = None if self.index is None else np.take_along_axis(self.index, keep, axis=1)
        return EvictedCache(np.take_along_axis(self.k, idx, axis=1), np.take_along_axis(self.v, idx, axis=1),
                            np.take_along_axis(self.positions, keep, axis=1), self.next_position, scores, index,
                            self.next_index)  # fmt: skip


class EvictionPolicy(KVPolicy):
    """Base of the family's eviction plugs: holds an :class:`EvictedCache` and reads it, re-rotating the kept keys
    to positions inside the cache (ending just before the query) when ``rerotate`` is true.

    Subclasses choose what to keep in :meth:`store` and :meth:`extend`.
    """

    name = "eviction"

    def __init__(self, *, rerotate: bool = False, theta: float = 10000.0):
        if not isinstance(rerotate, bool):
            raise TypeError(f"rerotate must be a bool, got {type(rerotate).__name__}")
        self.rerotate = rerotate
        self.theta = _checks.real(theta, "theta", low=0.0, low_open=True)

    @staticmethod
    def _new(k, v, positions, scores=None) -> EvictedCache:
        pos = np.broadcast_to(np.asarray(positions, dtype=np.int64), k.shape[:2]).copy()
        nxt = int(pos.max()) + 1 if pos.size else 0
        index = np.tile(np.arange(k.shape[1], dtype=np.int64), (k.shape[0], 1))
        return EvictedCache(np.ascontiguousarray(k, dtype=np.float32), np.ascontiguousarray(v, dtype=np.float32),
                            pos, nxt, scores, index, int(k.shape[1]))  # fmt: skip

    @staticmethod
    def _append(cache: EvictedCache, k, v, position: int, score=None) -> EvictedCache:
        hkv = cache.k.shape[0]
        pos = np.concatenate([cache.positions, np.full((hkv, 1), int(position), dtype=np.int64)], axis=1)
        scores = None
        if cache.scores is not None:
            scores = np.concatenate([cache.scores, np.zeros((hkv, 1)) if score is None else score], axis=1)
        index = None
        if cache.index is not None:
            index = np.concatenate([cache.index, np.full((hkv, 1), cache.next_index, dtype=np.int64)], axis=1)
        return EvictedCache(np.concatenate([cache.k, k.astype(np.float32)], axis=1),
                            np.concatenate([cache.v, v.astype(np.float32)], axis=1), pos, int(position) + 1,
                            scores, index, cache.next_index + 1)  # fmt: skip

    def read_positions(self, cache: EvictedCache) -> np.ndarray:
        """``int64[Hkv, S]`` the positions the keys are read at: the original ids, or with ``rerotate`` the
        positions inside the cache shifted to end at ``next_position - 1``."""
        if not self.rerotate:
            return cache.positions
        rank = cache_positions(cache.positions)
        u = rank[:, -1:] + 1 if rank.shape[1] else 0
        return rank + (cache.next_position - u)

    def read(self, layer: int, cache: EvictedCache) -> tuple[np.ndarray, np.ndarray]:
        if not self.rerotate:
            return cache.k, cache.v
        new = self.read_positions(cache)
        k = np.stack([rerotate(cache.k[h], cache.positions[h], new[h], self.theta) for h in range(cache.k.shape[0])])
        return k.astype(np.float32, copy=False), cache.v

    def length(self, layer: int, cache: EvictedCache) -> int:
        return int(cache.k.shape[1])

    def kept_tokens(self, layer: int, cache: EvictedCache) -> np.ndarray:
        return cache.index.copy()

    def nbytes(self, cache: EvictedCache) -> int:
        """Keys, values, the position ids and the scores the cache holds."""
        extra = 0 if cache.scores is None else cache.scores.nbytes
        return int(cache.k.nbytes + cache.v.nbytes + cache.positions.nbytes + extra)


#: The tiny VLM's default: the paper's 4 sinks and 60 recent tokens, a budget of 64 of its ~150-175 tokens.
DEFAULT_START = 4
DEFAULT_RECENT = 60


class StreamingPolicy(EvictionPolicy):
    """StreamingLLM on the tiny VLM: after the prefill and after every decode step, each layer keeps its first
    ``start_size`` tokens and its last ``recent_size`` ones; keys are read at positions inside the cache."""

    name = "streaming"

    def __init__(self, start_size: int = DEFAULT_START, recent_size: int = DEFAULT_RECENT, *,
                 rerotate: bool = True, theta: float = 10000.0):  # fmt: skip
        super().__init__(rerotate=rerotate, theta=theta)
        self.start_size = _checks.integer(start_size, "start_size", low=0)
        self.recent_size = _checks.integer(recent_size, "recent_size", low=0)
        if self.start_size + self.recent_size < 1:
            raise ValueError("start_size + recent_size must be >= 1")

    @property
    def budget(self) -> int:
        return self.start_size + self.recent_size

    def _evict(self, cache: EvictedCache) -> EvictedCache:
        s = cache.k.shape[1]
        if s <= self.budget:
            return cache
        keep = streaming_keep(s, self.start_size, self.recent_size)
        return cache.take(np.broadcast_to(keep, (cache.k.shape[0], keep.size)))

    def store(self, layer, k, v, attn, info: PromptInfo, *, positions, n_visual) -> EvictedCache:
        return self._evict(self._new(k, v, positions))

    def extend(self, layer, cache: EvictedCache, k, v, attn, *, position: int) -> EvictedCache:
        return self._evict(self._append(cache, k, v, position))


def make_policy(budget: int, theta: float = 10000.0) -> StreamingPolicy:
    """StreamingLLM keeping ``budget`` tokens per layer: the paper's 4 sinks and ``budget - 4`` recent ones (the
    chapter's sweep knob)."""
    budget = _checks.integer(budget, "budget", low=DEFAULT_START + 1)
    return StreamingPolicy(DEFAULT_START, budget - DEFAULT_START, theta=theta)


# ----------------------------------------------------------------------------------------------- registration
_SIZES = {
    # name: (length T, start_size, recent_size, visual tokens sharing position 0)
    "tiny": (7, 1, 3, 0),
    "small": (40, 4, 12, 0),
    "short": (5, 4, 12, 0),
    "tinyvlm": (152, DEFAULT_START, DEFAULT_RECENT, 144),
    "long": (100_000, 4, 2044, 0),
}


def _positions(t: int, n_visual: int) -> np.ndarray:
    return np.concatenate([np.zeros(n_visual, dtype=np.int64), np.arange(1, t - n_visual + 1, dtype=np.int64)]) \
        if n_visual else np.arange(t, dtype=np.int64)  # fmt: skip


def _case(size: str, rng: np.random.Generator) -> dict:
    t, s, r, nv = _SIZES[size]
    pos = _positions(t, nv)
    if size == "small":  # a cache that already lost tokens: gaps between ids
        pos = np.sort(rng.choice(4 * t, t, replace=False)).astype(np.int64)
    return {"positions": pos, "start_size": s, "recent_size": r}


def _cost(kw: dict) -> dict:
    k = min(kw["positions"].size, kw["start_size"] + kw["recent_size"])
    return {"flops": float(k), "bytes": float(kw["positions"].nbytes + 16 * k)}


def _strategy():
    from hypothesis import strategies as st

    @st.composite
    def cases(draw):
        t = draw(st.integers(0, 60))
        nv = draw(st.integers(0, t))
        steps = draw(st.lists(st.integers(0, 3), min_size=t, max_size=t))
        pos = np.cumsum(np.array(steps, dtype=np.int64)) if draw(st.booleans()) else _positions(t, nv)
        return {"positions": pos.astype(np.int64), "start_size": draw(st.integers(0, 8)),
                "recent_size": draw(st.integers(0, 40))}  # fmt: skip

    return cases()


register(
    Technique(
        id="kvcache.streaming",
        reference=streaming,
        make_case=_case,
        paper=(
            "G. Xiao, Y. Tian, B. Chen, S. Han, M. Lewis, Efficient Streaming Language Models with Attention "
            "Sinks, ICLR 2024 (arXiv 2309.17453)"
        ),
        test_sizes=("tiny", "small", "short", "tinyvlm"),
        bench_sizes=("long",),
        compare="exact",
        strategy=_strategy,
        cost=_cost,
        chapter="book/04-kv-cache.md",
        model_level=True,
        notes=(
            "sinks + recent window, keys re-rotated to positions inside the cache (dense ranks: the tiny VLM's "
            "visual tokens share id 0); the cache holds s + r tokens between steps (the authors evict before "
            "the step); the prompt is prefilled whole, then cut"
        ),
        extra={
            "question_after_image": True,
            "plugs": lambda model: Plugs(kv_policy=StreamingPolicy(theta=model.config.rope_theta)),
            "setting": f"{DEFAULT_START} sinks + {DEFAULT_RECENT} recent = {DEFAULT_START + DEFAULT_RECENT} tokens "
            "per layer, keys re-rotated",
        },
    )
)
