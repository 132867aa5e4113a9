"""DART: duplication-aware reduction of visual tokens (keep what is least like the pivots).

Wen, Gao, Wang, Zhang, Zhang, Li, He, Zhang, "Stop Looking for Important Tokens in Multimodal Language Models:
Duplication Matters More", EMNLP 2025 (arXiv 2502.11494); code github.com/ZichenWen1/DART. Survey: 004
sections 3.1 and 3.8.

Importance scores from attention are biased (toward late positions, and away from FlashAttention, which never
materialises them). DART instead removes *duplicates*: it picks a few pivot tokens and keeps the visual tokens that
are least similar to them. At layer ``K`` (2 of LLaVA-1.5's 32), with the keys ``K_i`` of layer ``K-1`` (all heads
side by side) and its output ``x_i`` (after the model's final RMSNorm in the authors' code):

1. **Pivots.** The ``p_v`` visual tokens and the ``p_t`` text tokens with the largest key norm ``||K_i||_1``
   (the "K-norm"; L1 as in the authors' code, ``norm_ord=2`` for L2), 4 + 4 by default.
2. **Duplication.** ``dup(i, j) = cos(x_i, x_j)``.
3. **Selection.** The visual pivots are kept. The other visual tokens are candidates; the pivots, taken in
   ascending token order, each take in turn their quota of the remaining candidates with the *lowest*
   ``cos(x_pivot, x_j)`` (ties to the lower index), which leave the pool. The quotas split the budget
   ``n_keep - p_v`` as evenly as possible (the first ``(n_keep - p_v) mod P`` pivots take one more; ``P = p_v +
   p_t``).

The kept visual tokens are the visual pivots and everything the pivots selected, ``n_keep`` in all, in their
order. The text is never touched. (With no pivot at all, ``n_pivot_visual = 0`` and no text pivot, the ``n_keep``
visual tokens of largest key norm are kept.)

Shape legend:
    keys: ``float[Hkv, T, d]`` layer ``K-1``'s keys; hidden: ``float[T, D]`` its output; visual tokens
    ``0 .. n-1`` first, text ``n .. T-1``.
    returns ``(keep int64[n_keep], pivots int64[p_v + p_t])``: kept visual tokens (ascending) and the pivots
    (indices into the sequence: visual pivots then text pivots, each ascending).

Deviations from the paper: the code keeps ``p_v + floor(budget / P) * P`` tokens (132 for a budget of 128 with
8 pivots) and visits the pivots in Python set order; here exactly ``n_keep`` tokens are kept and the pivots are
visited in ascending token order. Applying the final norm before the similarity is left to the caller (the tiny-VLM
policy does it when given the norm's weight).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from mllm_ref import _checks
from mllm_ref.oracle.registry import Technique, register
from mllm_ref.tinyvlm.plugs import LayerView, Plugs, TokenPolicy
from mllm_ref.tokens._common import keep_count, l2_normalize, top_k_indices

__all__ = ["dart", "pivots", "key_norms", "quotas", "DartPolicy", "make_policy"]

NORM_ORDS = (1, 2)


def _validate(keys, hidden, n_visual, n_keep, n_pivot_visual, n_pivot_text, norm_ord):
    """Shared entry checks (the fast paths use them too)."""
    keys = _checks.float_array(keys, "keys", ndim=3)
    hidden = _checks.float_array(hidden, "hidden", ndim=2)
    _checks.same_dtype("keys", keys, "hidden", hidden)
    t = hidden.shape[0]
    if keys.shape[1] != t:
        raise ValueError(f"keys must have shape [Hkv, {t}, d] (T from hidden), got {keys.shape}")
    if keys.shape[2] == 0:
        raise ValueError(f"keys must have a non-empty last axis, got {keys.shape}")
    if hidden.shape[1] == 0:
        raise ValueError(f"hidden must have a non-empty last axis, got {hidden.shape}")
    n_visual = _checks.integer(n_visual, "n_visual", low=0, high=t)
    n_keep = _checks.integer(n_keep, "n_keep", low=0, high=n_visual)
    n_pivot_visual = _checks.integer(n_pivot_visual, "n_pivot_visual", low=0)
    n_pivot_text = _checks.integer(n_pivot_text, "n_pivot_text", low=0)
    norm_ord = _checks.choice(norm_ord, "norm_ord", NORM_ORDS)
    if isinstance(norm_ord, bool) or not isinstance(norm_ord, int):
        raise TypeError(f"norm_ord must be the integer 1 or 2, got {norm_ord!r}")
    return keys, hidden, n_visual, n_keep, n_pivot_visual, n_pivot_text, norm_ord


def key_norms(keys: np.ndarray, norm_ord: int = 1) -> np.ndarray:
    """``float64[T]``: each token's key norm over all heads (``||K_i||_1`` or ``||K_i||_2``)."""
    k = keys.astype(np.float64)
    if norm_ord == 1:
        return np.abs(k).sum(axis=(0, 2))
    return np.sqrt((k * k).sum(axis=(0, 2)))


def pivots(keys: np.ndarray, n_visual: int, n_keep: int, n_pivot_visual: int, n_pivot_text: int, norm_ord: int = 1):
    """``(visual_pivots, text_pivots)``: sequence indices (ascending) of the tokens with the largest key norms;
    at most ``n_keep`` visual pivots and at most the number of text tokens."""
    norms = key_norms(keys, norm_ord)
    pv = top_k_indices(norms[:n_visual], min(n_pivot_visual, n_keep))
    pt = top_k_indices(norms[n_visual:], min(n_pivot_text, norms.size - n_visual)) + n_visual
    return pv, pt.astype(np.int64)


def quotas(budget: int, n_pivots: int) -> np.ndarray:
    """``int64[P]``: ``budget`` split over ``P`` pivots, the first ``budget mod P`` taking one more."""
    if n_pivots == 0:
        return np.zeros(0, dtype=np.int64)
    q = np.full(n_pivots, budget // n_pivots, dtype=np.int64)
    q[: budget % n_pivots] += 1
    return q


def dart(
    keys: np.ndarray,
    hidden: np.ndarray,
    n_visual: int,
    n_keep: int,
    n_pivot_visual: int = 4,
    n_pivot_text: int = 4,
    norm_ord: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """DART's selection of the visual tokens to keep (module docstring).

    Args:
        keys: ``float[Hkv, T, d]`` keys of the layer before the pruning point.
        hidden: ``float[T, D]`` that layer's output (same dtype as ``keys``), visual tokens first.
        n_visual: ``n`` visual tokens at the front, ``0 <= n <= T``.
        n_keep: visual tokens to keep, ``0 <= n_keep <= n`` (``n``: the identity).
        n_pivot_visual, n_pivot_text: pivots taken among the visual and the text tokens (4 and 4 in the paper).
        norm_ord: 1 (the authors' code) or 2, the norm of the keys that picks the pivots.

    Returns:
        ``(keep, pivots)``: ``int64[n_keep]`` kept visual tokens, ascending; ``int64[P]`` the pivots (visual
        ones then text ones, each ascending). Cosine similarities are computed in float64.
    """
    keys, hidden, n, n_keep, npv, npt, norm_ord = _validate(
        keys, hidden, n_visual, n_keep, n_pivot_visual, n_pivot_text, norm_ord
    )
    pv, pt = pivots(keys, n, n_keep, npv, npt, norm_ord)
    piv = np.concatenate([pv, pt])
    budget = n_keep - pv.size
    taken = np.zeros(n, dtype=bool)
    taken[pv] = True
    if budget > 0 and piv.size == 0:  # no pivot at all (none asked, no text): the largest key norms are kept
        return top_k_indices(key_norms(keys, norm_ord)[:n], n_keep), piv
    unit = l2_normalize(hidden.astype(np.float64))
    sim = unit[piv] @ unit[:n].T  # [P, n]
    for row, q in zip(sim, quotas(budget, piv.size)):
        free = np.flatnonzero(~taken)
        if q == 0 or free.size == 0:
            continue
        taken[free[top_k_indices(-row[free], min(int(q), free.size))]] = True
    return np.flatnonzero(taken).astype(np.int64), piv


# ------------------------------------------------------------------------------------------- the tiny VLM plug
#: The paper prunes at layer K = 2 of LLaVA-1.5's 32 (keys and output of layer K-1 = 1): the same on the tiny VLM's
#: 12 layers, as the FastV row's K = 2; layers 2-11 then run on the kept tokens.
DEFAULT_LAYER = 1
#: The paper's main setting: 128 of 576 visual tokens kept (77.8% fewer), i.e. 32 of the tiny VLM's 144.
DEFAULT_KEEP = 128 / 576
#: Pivots: the paper's 4 visual + 4 text (on the tiny VLM, whose prompts have 4-6 words, 2 + 2 scored lower).
DEFAULT_PIVOTS = (4, 4)


class DartPolicy(TokenPolicy):
    """DART on the tiny VLM: after prefill layer ``layer``, keep ``keep_ratio`` of the visual tokens.

    ``norm_weight`` (``float32[D]``, the model's final RMSNorm weight) is applied to the hidden states before the
    cosine similarity, as the authors' code does; without it the raw layer output is compared.
    """

    name = "dart"

    def __init__(self, layer: int = DEFAULT_LAYER, keep_ratio: float = DEFAULT_KEEP, pivots=DEFAULT_PIVOTS,
                 norm_ord: int = 1, norm_weight: np.ndarray | None = None):  # fmt: skip
        self.layer = _checks.integer(layer, "layer", low=0)
        self.keep_ratio = _checks.real(keep_ratio, "keep_ratio", low=0.0, high=1.0)
        self.pivots = (_checks.integer(pivots[0], "pivots", low=0), _checks.integer(pivots[1], "pivots", low=0))
        self.norm_ord = _checks.choice(norm_ord, "norm_ord", NORM_ORDS)
        self.norm_weight = None if norm_weight is None else _checks.float_array(norm_weight, "norm_weight", ndim=1)

    def in_decoder(self, layer: int, view: LayerView):
        n = view.n_visual
        if layer != self.layer or n == 0:
            return None
        k = keep_count(n, self.keep_ratio)
        if k == n:
            return None
        if self.norm_weight is not None and self.norm_weight.shape[0] != view.hidden.shape[1]:
            raise ValueError(
                f"norm_weight has {self.norm_weight.shape[0]} entries for hidden states of width {view.hidden.shape[1]}"
            )
        h = view.hidden if self.norm_weight is None else view.hidden * self.norm_weight  # RMS scale cancels in cos
        keep, _ = dart(view.keys, h.astype(view.keys.dtype), n, k, self.pivots[0], self.pivots[1], self.norm_ord)
        return np.concatenate([keep, np.arange(n, view.hidden.shape[0], dtype=np.int64)])


@lru_cache(maxsize=1)
def _bundled_norm_weight() -> np.ndarray:
    from mllm_ref.tinyvlm.model import load

    return load()["norm.weight"]


def make_policy(keep_ratio: float = DEFAULT_KEEP, model=None) -> DartPolicy:
    """DART after layer 1 (K = 2) keeping ``keep_count(n, keep_ratio)`` visual tokens (4 + 4 pivots), 1 being the
    identity. The final norm's weight of ``model`` (default: the bundled tiny VLM) is applied before the
    similarity, as in the authors' code."""
    weight = _bundled_norm_weight() if model is None else model["norm.weight"]
    return DartPolicy(DEFAULT_LAYER, keep_ratio, DEFAULT_PIVOTS, 1, weight)


# ----------------------------------------------------------------------------------------------- registration
_SIZES = {
    # name: (kv heads, visual tokens, text tokens, head dim, width, kept, visual pivots, text pivots)
    "tiny": (1, 6, 2, 3, 4, 3, 1, 1),
    "small": (2, 24, 5, 4, 16, 8, 2, 2),
    "tinyvlm": (2, 144, 6, 32, 128, 32, 2, 2),
    "llava": (32, 576, 40, 128, 4096, 128, 4, 4),
}


def _make_case(rng, hkv, n, m, hd, d, n_keep, npv, npt, dtype, norm_ord=1) -> dict:
    """A case far from ties: key norms are well-spaced (each token's keys scaled by a distinct factor), and the
    hidden states are Gaussian, so the cosine similarities of distinct tokens differ by far more than rounding."""
    t = n + m
    keys = rng.standard_normal((hkv, t, hd))
    if norm_ord == 1:
        keys /= np.abs(keys).sum(axis=(0, 2), keepdims=True)
    else:
        keys /= np.sqrt((keys**2).sum(axis=(0, 2), keepdims=True))
    keys *= (1.0 + rng.permutation(t) / max(t, 1) * 3.0)[None, :, None]
    hidden = rng.standard_normal((t, d))
    return {
        "keys": keys.astype(dtype),
        "hidden": hidden.astype(dtype),
        "n_visual": n,
        "n_keep": n_keep,
        "n_pivot_visual": npv,
        "n_pivot_text": npt,
        "norm_ord": norm_ord,
    }


def _case(size: str, rng: np.random.Generator) -> dict:
    hkv, n, m, hd, d, k, npv, npt = _SIZES[size]
    return _make_case(rng, hkv, n, m, hd, d, k, npv, npt, np.float32, 2 if size == "small" else 1)


def _cost(kw: dict) -> dict:
    hkv, t, hd = kw["keys"].shape
    n, d = kw["n_visual"], kw["hidden"].shape[1]
    p = kw["n_pivot_visual"] + kw["n_pivot_text"]
    flops = 2.0 * t * hkv * hd + 3.0 * n * d + 2.0 * p * n * d
    return {"flops": flops, "bytes": float(kw["keys"].nbytes + kw["hidden"].itemsize * (n + p) * d)}


def _strategy():
    from hypothesis import strategies as st

    @st.composite
    def cases(draw):
        hkv = draw(st.integers(1, 3))
        n = draw(st.integers(0, 40))
        m = draw(st.integers(0, 6))
        hd = draw(st.integers(1, 6))
        d = draw(st.integers(2, 10))
        n_keep = draw(st.integers(0, n))
        npv = draw(st.integers(0, 5))
        npt = draw(st.integers(0, 5))
        norm_ord = draw(st.sampled_from(NORM_ORDS))
        dtype = draw(st.sampled_from([np.float32, np.float64]))
        seed = draw(st.integers(0, 2**32 - 1))
        if n + m == 0:
            m = 1
        return _make_case(np.random.default_rng(seed), hkv, n, m, hd, d, n_keep, npv, npt, dtype, norm_ord)

    return cases()


register(
    Technique(
        id="tokens.dart",
        reference=dart,
        make_case=_case,
        paper=(
            "Z. Wen, Y. Gao, S. Wang, J. Zhang, Q. Zhang, W. Li, C. He, L. Zhang, Stop Looking for Important "
            "Tokens in Multimodal Language Models: Duplication Matters More, EMNLP 2025 (arXiv 2502.11494)"
        ),
        test_sizes=("tiny", "small", "tinyvlm"),
        bench_sizes=("llava",),
        compare="exact",
        strategy=_strategy,
        cost=_cost,
        chapter="book/02-fewer-visual-tokens.md",
        model_level=True,
        notes=(
            "L1 key norm picks 4+4 pivots; exactly n_keep kept (code: 132 for 128); "
            "K=2 as the paper (after layer 1 of 12); keep 128/576 -> 32 of 144"
        ),
        extra={
            "plugs": lambda model: Plugs(token_policy=make_policy(DEFAULT_KEEP, model)),
            "setting": "K=2 (after layer 1), keep 32 of 144 (128 of 576), pivots 4 visual + 4 text by key L1 norm",
        },
    )
)
