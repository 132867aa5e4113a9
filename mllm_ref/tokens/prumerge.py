"""LLaVA-PruMerge: keep the visual tokens the class token attends to unusually much, and fold their neighbours in.

Y. Shang, M. Cai, B. Xu, Y. J. Lee, Y. Yan, "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large
Multimodal Models", 2024 (arXiv 2403.15388); the authors' code is ``token_prune_merge_advanced`` and
``token_prune_merge_advanced_plus`` in ``llava/model/multimodal_encoder/clip_encoder.py`` of 42Shawn/LLaVA-PruMerge.
Survey section: token compression before the LLM (prune + merge).

The algorithm, on the ``N`` patch tokens of the vision encoder's penultimate layer:

1. **Adaptive selection by outliers.** ``a_j`` is the attention the class token pays patch ``j`` (softmax of the
   layer's ``q_cls . k_j``). With ``Q1``, ``Q3`` the 25th and 75th percentiles of ``a`` (linear interpolation, as
   ``np.percentile``), the kept set is the upper outliers of the interquartile-range rule::

       S = { j : a_j > Q3 + 1.5 (Q3 - Q1) }                    (|S| is adaptive: about 5.5% of 576 on LLaVA-1.5)

2. **PruMerge+ (``plus=True``)** adds spatially uniform samples: with ``r = |S| / N``, ``step = int(1 / r)`` and
   ``stride = int(step / 3)``, the indices ``0, stride, 2 stride, ... < N - 1`` join ``S`` (about 25% of tokens).

3. **Merge by key similarity.** For each kept token ``p``, ``nbr(p)`` is its ``k`` nearest tokens among all the
   others (kept or not) by cosine similarity of the layer's keys (``k = 32`` in the code), and the kept token
   becomes (the code's exact rule: the neighbours are weighted by their class attention, the token itself by 1,
   and nothing is normalised)::

       y_p = x_p + sum_{j in nbr(p)} a_j x_j

4. **The extra token** (the code appends it; ``extra_token=True``): one more token ``sum_{j not in S} a_j x_j``,
   the attention-weighted sum of every pruned token, after the kept ones.

A forced kept fraction (``keep_ratio``, for plotting accuracy against the kept share, not in the paper) replaces
the outlier rule by the top ``round(keep_ratio N)`` tokens by ``a``; with ``plus=True`` a quarter of that budget
(at least one token) goes to the top tokens by ``a`` and the rest to tokens spread evenly over the remaining
indices (PruMerge+'s proportion of attention-chosen to sampled tokens, 1 : 3).

Shape legend:
    cls_attn: ``float[N]`` >= 0, class-token attention over the ``N`` patches.
    keys: ``float[N, C]`` the same layer's keys (all heads concatenated).
    features: ``float[N, D]`` the tokens to merge (the encoder's patch features, or the connector's outputs).
    returns: ``keep`` ``int64[K]`` kept indices in increasing order, and ``merged`` ``float[K (+1), D]``: the
    merged kept tokens in that order, then the extra token when ``extra_token`` and ``K < N``.

Deviations from the paper: the kept tokens are returned in their original (spatial) order, where the code keeps
them in decreasing attention order, then the sampled ones; the count is ``|S|`` itself, where the code's
``int(N * (|S| / N))`` could round down by one; when no token is an outlier (a flat attention map) the token with
the highest attention is kept (the code would keep none); the stride is at least 1 and the samples stop before
``N - 1`` for any ``N`` (the code writes 575, for ``N = 576``); nearest-neighbour ties go to the lower index.
On the tiny VLM, whose encoder has no class token, ``a`` is the mean attention each patch receives in the last
encoder block (over heads and queries), see :class:`PruMergePolicy`.
"""

from __future__ import annotations

import numpy as np

from mllm_ref import _checks
from mllm_ref.oracle.registry import Technique, register
from mllm_ref.tinyvlm.plugs import EncoderView, Plugs, TokenPolicy, VisualTokens
from mllm_ref.tokens._common import keep_count, l2_normalize, top_k_indices

__all__ = ["prumerge", "select_tokens", "neighbours", "PruMergePolicy", "make_policy"]

#: The code's neighbour count for 576 patches, and the IQR factor of the outlier rule.
K_NEIGHBOURS = 32
IQR_FACTOR = 1.5


def _flag(x, name: str) -> bool:
    if not isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(x).__name__}")
    return bool(x)


def _validate(cls_attn, keys, features, k_neighbors, plus, keep_ratio, extra_token):
    """Shared entry checks (also used by the fast paths)."""
    cls_attn = _checks.float_array(cls_attn, "cls_attn", ndim=1)
    keys = _checks.float_array(keys, "keys", ndim=2)
    features = _checks.float_array(features, "features", ndim=2)
    for name, arr in (("cls_attn", cls_attn), ("keys", keys), ("features", features)):
        if arr.dtype == np.float16:
            raise TypeError(f"{name} must be float32 or float64, got float16")
    _checks.same_dtype("cls_attn", cls_attn, "keys", keys)
    _checks.same_dtype("cls_attn", cls_attn, "features", features)
    n = cls_attn.shape[0]
    _checks.dim("keys", keys, 0, n, "one key per token of cls_attn")
    _checks.dim("features", features, 0, n, "one feature row per token of cls_attn")
    if cls_attn.min() < 0:
        raise ValueError("cls_attn must hold attention weights (>= 0)")
    k_neighbors = _checks.integer(k_neighbors, "k_neighbors", low=0)
    plus = _flag(plus, "plus")
    extra_token = _flag(extra_token, "extra_token")
    if keep_ratio is not None:
        keep_ratio = _checks.real(keep_ratio, "keep_ratio", low=0.0, high=1.0, low_open=True)
    return cls_attn, keys, features, k_neighbors, plus, keep_ratio, extra_token


def outlier_threshold(a: np.ndarray) -> float:
    """``Q3 + 1.5 (Q3 - Q1)`` of ``a`` (percentiles with linear interpolation, computed in float64)."""
    q1, q3 = np.percentile(np.asarray(a, dtype=np.float64), [25.0, 75.0])
    return float(q3 + IQR_FACTOR * (q3 - q1))


def _spread(candidates: np.ndarray, r: int) -> np.ndarray:
    """``r`` of the sorted ``candidates``, evenly spread: positions ``floor((i + 1/2) len / r)``."""
    if r <= 0:
        return np.zeros(0, dtype=np.int64)
    pos = np.floor((np.arange(r) + 0.5) * (candidates.size / r)).astype(np.int64)
    return candidates[pos]


def select_tokens(cls_attn: np.ndarray, *, plus: bool = False, keep_ratio: float | None = None) -> np.ndarray:
    """PruMerge's kept set (steps 1-2 of the module docstring): ``int64[K]`` indices in increasing order.

    Args:
        cls_attn: ``float[N]`` >= 0, already validated.
        plus: add PruMerge+'s spatially uniform samples.
        keep_ratio: ``None`` for the paper's adaptive IQR rule, else the forced kept fraction in (0, 1].
    """
    a = np.asarray(cls_attn, dtype=np.float64)
    n = a.size
    if keep_ratio is not None:
        k = keep_count(n, keep_ratio)
        if not plus:
            return top_k_indices(a, k)
        k_attn = max(1, int(np.floor(k / 4 + 0.5)))
        top = top_k_indices(a, k_attn)
        rest = np.setdiff1d(np.arange(n, dtype=np.int64), top)
        return np.sort(np.concatenate([top, _spread(rest, k - k_attn)])).astype(np.int64)
    chosen = np.flatnonzero(a > outlier_threshold(a)).astype(np.int64)
    if chosen.size == 0:  # a flat map has no outlier: keep the most attended token
        chosen = np.array([int(np.argmax(a))], dtype=np.int64)
    if plus:
        ratio = chosen.size / n
        stride = max(1, int(int(1.0 / ratio) / 3))
        samples = np.arange(0, n - 1, stride, dtype=np.int64)
        chosen = np.union1d(chosen, samples).astype(np.int64)
    return chosen


def safe_scale(keys: np.ndarray) -> np.ndarray:
    """``keys`` times a power of two (exact) bringing the largest magnitude into [0.5, 1) when it lies outside
    [1e-15, 1e15], so that products of keys in the keys' precision neither overflow nor underflow; ``keys`` itself
    otherwise. Cosine similarities do not change (the fast paths use it before their products)."""
    peak = float(np.abs(keys).max())
    if peak == 0.0 or 1e-15 <= peak <= 1e15:
        return keys
    return np.ldexp(keys, -int(np.frexp(peak)[1])).astype(keys.dtype)


def neighbours(keys: np.ndarray, keep: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each kept token's ``k`` nearest other tokens by cosine similarity of the keys (step 3).

    Args:
        keys: ``float[N, C]``; keep: ``int[K]``; k: neighbours per kept token (at most ``N - 1`` are used).

    Returns:
        ``(nbr int64[K, k'], sim float[K, k'])`` with ``k' = min(k, N - 1)``: neighbour indices in decreasing
        similarity (ties to the lower index; a token is never its own neighbour) and their similarities.
    """
    n = keys.shape[0]
    kk = min(k, n - 1)
    unit = l2_normalize(keys)
    sims = unit[keep] @ unit.T  # [K, N]
    sims[np.arange(keep.size), keep] = -np.inf  # not its own neighbour
    order = np.argsort(-sims, axis=1, kind="stable")[:, :kk].astype(np.int64)
    return order, np.take_along_axis(sims, order, axis=1)


def prumerge(
    cls_attn: np.ndarray,
    keys: np.ndarray,
    features: np.ndarray,
    *,
    k_neighbors: int = K_NEIGHBOURS,
    plus: bool = False,
    keep_ratio: float | None = None,
    extra_token: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """LLaVA-PruMerge (``plus=False``) or PruMerge+ (``plus=True``) on one image's tokens.

    Args:
        cls_attn: ``float[N]`` >= 0, the class token's attention over the patches.
        keys: ``float[N, C]`` keys of the same layer (heads concatenated), for the neighbour search.
        features: ``float[N, D]`` the tokens to merge; same dtype as ``cls_attn`` and ``keys``.
        k_neighbors: neighbours folded into each kept token (the code's 32; at most ``N - 1`` are used).
        plus: PruMerge+'s spatially uniform samples join the outliers.
        keep_ratio: ``None`` (the paper: adaptive IQR outliers) or a forced kept fraction in (0, 1].
        extra_token: append the attention-weighted sum of the pruned tokens, as the authors' code does.

    Returns:
        ``(keep int64[K], merged float[K + e, D])``: kept indices in increasing order and
        ``merged[i] = x_keep[i] + sum_{j in nbr(keep[i])} a_j x_j``; ``e = 1`` (the extra token
        ``sum_{j not kept} a_j x_j``, last) when ``extra_token`` and ``K < N``, else 0. ``features``' dtype.
    """
    cls_attn, keys, features, k_neighbors, plus, keep_ratio, extra_token = _validate(
        cls_attn, keys, features, k_neighbors, plus, keep_ratio, extra_token
    )
    keep = select_tokens(cls_attn, plus=plus, keep_ratio=keep_ratio)
    nbr, _ = neighbours(keys, keep, k_neighbors)
    weights = cls_attn[nbr]  # [K, k']
    merged = features[keep] + np.einsum("kj,kjd->kd", weights, features[nbr])
    if extra_token and keep.size < cls_attn.size:
        pruned = np.setdiff1d(np.arange(cls_attn.size), keep)
        extra = cls_attn[pruned] @ features[pruned]
        merged = np.concatenate([merged, extra[None]], axis=0)
    return keep, merged.astype(features.dtype)


# ----------------------------------------------------------------------------------------------- the tiny VLM
class PruMergePolicy(TokenPolicy):
    """PruMerge / PruMerge+ on the tiny VLM, on the encoder's output before the connector (as LLaVA-PruMerge merges
    CLIP features before LLaVA's projector).

    The tiny encoder has no class token, so ``a_j`` is the mean attention patch ``j`` receives in the last encoder
    block, over heads and queries (it sums to 1 like a class-token row). The keys are that block's keys with the
    heads concatenated, and the merged tokens are the encoder's output features. Patch map: a kept patch maps to its
    token; a pruned patch maps to the kept token that counts it among its neighbours with the highest similarity,
    or else to the extra token (or is dropped, ``-1``, without one). ``size`` counts the patches a token carries.
    """

    name = "prumerge"

    def __init__(
        self,
        plus: bool = True,
        keep_ratio: float | None = None,
        k_neighbors: int = 8,
        extra_token: bool = True,
    ):
        self.plus = _flag(plus, "plus")
        self.keep_ratio = None if keep_ratio is None else _checks.real(keep_ratio, "keep_ratio", low=0.0,
                                                                       high=1.0, low_open=True)  # fmt: skip
        self.k_neighbors = _checks.integer(k_neighbors, "k_neighbors", low=0)
        self.extra_token = _flag(extra_token, "extra_token")

    def needs_encoder_attention(self) -> bool:
        return True

    def after_encoder(self, tokens: VisualTokens, prompt_ids: np.ndarray, encoder: EncoderView) -> VisualTokens:
        n = tokens.n
        score = encoder.attn.astype(np.float32).mean(axis=(0, 1))  # [N]: mean attention received
        keys = encoder.keys.transpose(1, 0, 2).reshape(n, -1).astype(np.float32)
        x = tokens.x.astype(np.float32)
        keep, merged = prumerge(score, keys, x, k_neighbors=self.k_neighbors, plus=self.plus,
                                keep_ratio=self.keep_ratio, extra_token=self.extra_token)  # fmt: skip
        k = keep.size
        has_extra = merged.shape[0] > k
        slot = np.full(n, k if has_extra else -1, dtype=np.int64)  # token -> new token
        nbr, sim = neighbours(keys, keep, self.k_neighbors)
        best = np.full(n, -np.inf)
        for i in range(k):  # a pruned token goes to the kept token that finds it most similar
            for j, s in zip(nbr[i], sim[i]):
                if s > best[j]:
                    best[j], slot[j] = s, i
        slot[keep] = np.arange(k)
        live = tokens.source >= 0
        source = np.full(tokens.source.shape, -1, dtype=np.int64)
        source[live] = slot[tokens.source[live]]
        size = np.bincount(source[source >= 0], minlength=merged.shape[0]).astype(np.float32)
        return VisualTokens(merged.astype(np.float32), np.maximum(size, 1.0), source, tokens.grid)


def make_policy(keep_ratio: float | None = None, *, plus: bool = False) -> PruMergePolicy:
    """PruMerge on the tiny VLM keeping ``keep_ratio`` of the 144 visual tokens (top by attention, forced count; the
    extra token comes on top), or the paper's adaptive IQR rule with ``keep_ratio=None``. ``plus`` for PruMerge+."""
    return PruMergePolicy(plus=plus, keep_ratio=keep_ratio)


# ----------------------------------------------------------------------------------------------- registration
_SIZES = {
    # name: (N, C, D, k_neighbors, plus, keep_ratio, extra_token)
    "tiny": (9, 4, 3, 2, False, None, True),
    "small": (40, 16, 8, 6, False, None, True),
    "plus": (64, 16, 8, 8, True, None, True),
    "forced": (50, 12, 6, 5, False, 0.2, False),
    "forced-plus": (48, 12, 6, 4, True, 0.25, True),
    "tinyvlm": (144, 64, 128, 8, True, None, True),
    "llava": (576, 1024, 1024, 32, False, None, True),
    "llava-plus": (576, 1024, 1024, 32, True, None, True),
}

_MARGIN = 1e-3


def _attention(n: int, plus: bool, keep_ratio, rng: np.random.Generator) -> np.ndarray:
    """A class-attention row with a few clear outliers, no value within 0.1% of the IQR threshold, and (for a
    forced count) a clear gap at the top-k boundary."""
    for _ in range(200):
        a = rng.uniform(1.0, 2.0, n)
        n_out = max(1, int(round(0.06 * n)))
        a[rng.choice(n, n_out, replace=False)] = rng.uniform(6.0, 20.0, n_out)
        a = (a / a.sum()).astype(np.float32).astype(np.float64)
        thr = outlier_threshold(a)
        ok = np.abs(a - thr).min() > _MARGIN * thr
        if keep_ratio is not None:
            k = keep_count(n, keep_ratio)
            s = -np.sort(-a)
            for b in {k, max(1, int(np.floor(k / 4 + 0.5)))} if plus else {k}:
                if b < n:
                    ok = ok and s[b - 1] - s[b] > _MARGIN * s[0]
        if ok:
            return a
    raise RuntimeError("could not draw a well-separated attention row")


def _keys(n: int, c: int, keep: np.ndarray, kk: int, rng: np.random.Generator, check: bool) -> np.ndarray:
    """Keys whose nearest-neighbour sets have a clear boundary (a gap of 1e-3 in cosine similarity)."""
    for _ in range(200):
        keys = rng.standard_normal((n, c))
        if not check or kk == 0 or kk >= n - 1:
            return keys
        unit = keys / np.linalg.norm(keys, axis=1, keepdims=True)
        sims = unit[keep] @ unit.T
        sims[np.arange(keep.size), keep] = np.inf
        s = -np.sort(-sims, axis=1)[:, 1:]  # drop self, decreasing
        if (s[:, kk - 1] - s[:, kk]).min() > _MARGIN:
            return keys
    raise RuntimeError("could not draw keys with a clear neighbour boundary")


def _case(size: str, rng: np.random.Generator) -> dict:
    n, c, d, k, plus, keep_ratio, extra = _SIZES[size]
    bench = size.startswith("llava")
    a = _attention(n, plus, keep_ratio, rng)
    keep = select_tokens(a, plus=plus, keep_ratio=keep_ratio)
    keys = _keys(n, c, keep, min(k, n - 1), rng, check=not bench)
    features = rng.standard_normal((n, d))
    return {
        "cls_attn": a.astype(np.float32),
        "keys": keys.astype(np.float32),
        "features": features.astype(np.float32),
        "k_neighbors": k,
        "plus": plus,
        "keep_ratio": keep_ratio,
        "extra_token": extra,
    }


def _cost(kwargs: dict) -> dict:
    n, c = kwargs["keys"].shape
    d = kwargs["features"].shape[1]
    keep = select_tokens(kwargs["cls_attn"], plus=kwargs["plus"], keep_ratio=kwargs["keep_ratio"])
    k, kk = keep.size, min(kwargs["k_neighbors"], n - 1)
    flops = 3.0 * n * c + 2.0 * k * n * c + 2.0 * k * kk * d + 2.0 * n * d
    nbytes = float(kwargs["cls_attn"].nbytes + kwargs["keys"].nbytes + kwargs["features"].nbytes + (k + 1) * d * 4)
    return {"flops": flops, "bytes": nbytes}


def _strategy():
    from hypothesis import strategies as st

    sizes = st.sampled_from(["tiny", "small", "plus", "forced", "forced-plus"])
    return st.builds(lambda size, seed: _case(size, np.random.default_rng(seed)), sizes, st.integers(0, 2**32 - 1))


register(
    Technique(
        id="tokens.prumerge",
        reference=prumerge,
        make_case=_case,
        paper=(
            "Y. Shang, M. Cai, B. Xu, Y. J. Lee, Y. Yan, LLaVA-PruMerge: Adaptive Token Reduction for Efficient "
            "Large Multimodal Models, 2024 (arXiv 2403.15388)"
        ),
        test_sizes=("tiny", "small", "plus", "forced", "forced-plus", "tinyvlm"),
        bench_sizes=("llava", "llava-plus"),
        compare="tolerance",
        strategy=_strategy,
        cost=_cost,
        chapter="book/02-fewer-visual-tokens.md",
        model_level=True,
        notes=(
            "the tiny encoder has no class token: a_j is the mean attention patch j receives in the last encoder "
            "block; merge rule y_p = x_p + sum_nbr a_j x_j and the extra token as in the authors' code; k=32 "
            "neighbours of 576 become 8 of 144; kept tokens in spatial order"
        ),
        extra={
            "plugs": lambda model: Plugs(token_policy=PruMergePolicy(plus=True)),
            "setting": "PruMerge+ (adaptive IQR + stride samples), k=8",
        },
    )
)
