"""LOOK-M: text-prior eviction of the image's KV cache, with the evicted entries merged into the kept ones.

Zhongwei Wan, Ziang Wu, Che Liu, Jinfa Huang, Zhihong Zhu, Peng Jin, Longyue Wang, Li Yuan, "LOOK-M: Look-Once
Optimization in KV Cache for Efficient Multimodal Long-Context Inference", Findings of EMNLP 2024 (arXiv
2406.18139); code SUSTechBruce/LOOK-M. Survey section: KV-cache compression for multimodal inputs.

The observation: in the prefill of a multimodal prompt, the model attends mostly to the *text*. LOOK-M compresses
the cache once, after the prefill ("look once"):

1. **Text-prior scores.** Each cached token ``j`` is scored by the attention the prompt's text tokens pay it,
   summed over those queries: ``s_j = Σ_{i text} A[i, j]`` (per KV head: the mean over the query heads that share it,
   as kvpress aggregates grouped-query attention). Text tokens are never evicted (their score is set above any
   image token's), nor are the ``r`` most recent tokens.
2. **Eviction.** Of the remaining (image) tokens, the ones with the highest scores fill the budget ``B`` (ties to
   the lower index); the others are evicted.
3. **Merging.** Each evicted entry ``e`` is matched to the kept entry ``c(e)`` whose key is most similar (cosine
   similarity of the keys, ties to the lower index), and the keys and values of each kept entry ``c`` absorb the
   entries ``E_c`` matched to it:

   - ``average``:  ``k_c ← (k_c + Σ_{e∈E_c} k_e) / (1 + |E_c|)`` (all entries weigh the same);
   - ``pivotal``:  ``k_c ← ½ k_c + ½ mean_{e∈E_c} k_e`` (the kept entry is the pivot and keeps half the weight);
   - ``weighted``: ``k_c ← (k_c + Σ w_e k_e) / (1 + Σ w_e)``, ``w_e = max(cos(k_e, k_c), 0)``;
   - ``none``: text-prior eviction alone.

   Values are merged with the same weights. A kept entry that absorbs nothing is unchanged.

After the compression, decode tokens are appended and nothing more is evicted (LOOK-M compresses the prompt once).

Shapes: ``k``, ``v`` ``float[Hkv, T, d]``; ``attn`` ``float[H, T, T]`` the prefill's attention (``H`` a multiple of
``Hkv``); ``text`` ``bool[T]`` which tokens are text. Returns ``keep`` ``int64[Hkv, K]`` ascending and the merged
``k``, ``v`` ``[Hkv, K, d]`` with ``K = max(B, n_text ∪ recent)`` (the budget cannot evict text).

On the tiny VLM, the sequence is the image's 144 tokens, then ``<bos>`` and the question; with the question read
after the image (the tour's setting) the only text at compression time is ``<bos>``, so its attention row decides.

Deviations from the paper: the authors' released code (an early version was read) averages each evicted key with its
match pairwise and scatters the results, so that of several evicted entries matched to one kept entry the last one
wins; here all of them are merged (the paper's description). The pivotal and weighted weights are our reading of the
paper's variants (its code for them was not read). Budgets are token counts per KV head and layer (the paper uses
ratios of the cache).
"""

from __future__ import annotations

import numpy as np

from mllm_ref import _checks
from mllm_ref.kvcache.h2o import top_indices
from mllm_ref.kvcache.streaming import EvictedCache, EvictionPolicy
from mllm_ref.oracle.registry import Technique, register
from mllm_ref.tinyvlm.plugs import Plugs, PromptInfo

__all__ = ["lookm", "lookm_scores", "LookMPolicy", "make_policy", "MERGES"]

MERGES = ("average", "pivotal", "weighted", "none")


def _validate(k, v, attn, text, budget, recent, merge):
    k = _checks.float_array(k, "k", ndim=3)
    v = _checks.float_array(v, "v", ndim=3)
    attn = _checks.float_array(attn, "attn", ndim=3)
    _checks.same_dtype("k", k, "v", v)
    _checks.same_dtype("k", k, "attn", attn)
    hkv, t, _ = k.shape
    if v.shape[:2] != (hkv, t):
        raise ValueError(f"v must have k's heads and tokens {(hkv, t)}, got {v.shape}")
    if attn.shape[1:] != (t, t) or attn.shape[0] % hkv:
        raise ValueError(f"attn must have shape [H, {t}, {t}] with H a multiple of the {hkv} kv heads, got {attn.shape}")
    if attn.min() < 0:
        raise ValueError("attn must hold attention weights (>= 0)")
    text = _checks.bool_array(text, "text", shape=(t,))
    budget = _checks.integer(budget, "budget", low=1)
    recent = _checks.integer(recent, "recent", low=0)
    merge = _checks.choice(merge, "merge", MERGES)
    return k, v, attn, text, budget, recent, merge


def lookm_scores(attn: np.ndarray, text: np.ndarray, kv_heads: int) -> np.ndarray:
    """Text-prior scores ``float64[kv_heads, T]``: attention from the text rows, summed, group-averaged over the
    query heads of each KV head; text tokens get ``+inf`` (never evicted)."""
    h, t, _ = attn.shape
    col = np.sum(attn[:, text, :], axis=1, dtype=np.float64)  # [H, T]
    s = col.reshape(kv_heads, h // kv_heads, t).mean(axis=1)
    s[:, text] = np.inf
    return s


def lookm(k, v, attn, text, budget: int, recent: int = 8, merge: str = "average"):
    """LOOK-M's compression of one layer's prefill cache (module docstring).

    Args:
        k, v: ``float[Hkv, T, d]`` keys (rotated) and values.
        attn: ``float[H, T, T]`` the prefill's attention weights.
        text: ``bool[T]``, True for text tokens (never evicted).
        budget: ``B`` tokens kept per KV head (more only if text and the recent window need it).
        recent: the last ``r`` tokens, always kept.
        merge: ``"average"``, ``"pivotal"``, ``"weighted"`` or ``"none"``.

    Returns:
        ``(keep int64[Hkv, K], k_kept float[Hkv, K, d], v_kept float[Hkv, K, d])``.
    """
    k, v, attn, text, budget, recent, merge = _validate(k, v, attn, text, budget, recent, merge)
    hkv, t, _ = k.shape
    s = lookm_scores(attn, text, hkv)
    s[:, max(t - recent, 0):] = np.inf
    n_keep = min(t, max(budget, int(np.count_nonzero(np.isinf(s[0])))))
    keep = top_indices(s, n_keep)
    if merge == "none" or n_keep == t:
        return keep, np.take_along_axis(k, keep[:, :, None], 1), np.take_along_axis(v, keep[:, :, None], 1)
    kk, vk = np.empty((hkv, n_keep, k.shape[2]), k.dtype), np.empty((hkv, n_keep, v.shape[2]), v.dtype)
    for h in range(hkv):
        kept = keep[h]
        gone = np.setdiff1d(np.arange(t), kept)
        kc, vc = k[h, kept].astype(np.float64), v[h, kept].astype(np.float64)
        ke, ve = k[h, gone].astype(np.float64), v[h, gone].astype(np.float64)
        unit_c = kc / np.maximum(np.linalg.norm(kc, axis=1, keepdims=True), 1e-30)
        unit_e = ke / np.maximum(np.linalg.norm(ke, axis=1, keepdims=True), 1e-30)
        sim = unit_e @ unit_c.T  # [E, K]
        match = np.argmax(sim, axis=1)  # ties to the lower index
        if merge == "weighted":
            w = np.maximum(sim[np.arange(gone.size), match], 0.0)
        else:
            w = np.ones(gone.size)
        wsum = np.bincount(match, weights=w, minlength=n_keep)
        ksum = np.zeros_like(kc)
        vsum = np.zeros_like(vc)
        np.add.at(ksum, match, w[:, None] * ke)
        np.add.at(vsum, match, w[:, None] * ve)
        if merge == "pivotal":
            has = wsum > 0
            kc[has] = 0.5 * kc[has] + 0.5 * ksum[has] / wsum[has, None]
            vc[has] = 0.5 * vc[has] + 0.5 * vsum[has] / wsum[has, None]
        else:  # average (w = 1) and weighted
            kc = (kc + ksum) / (1.0 + wsum)[:, None]
            vc = (vc + vsum) / (1.0 + wsum)[:, None]
        kk[h], vk[h] = kc.astype(k.dtype), vc.astype(v.dtype)
    return keep, kk, vk


# ------------------------------------------------------------------------------------------- the tiny VLM plug
DEFAULT_BUDGET = 64
DEFAULT_RECENT = 8
DEFAULT_MERGE = "average"


class LookMPolicy(EvictionPolicy):
    """LOOK-M on the tiny VLM: each layer compresses its prefill cache to ``budget`` tokens per KV head with the
    text prior (text tokens and the last ``recent`` kept), merging the evicted entries; decode tokens are appended."""

    name = "lookm"

    def __init__(self, budget: int = DEFAULT_BUDGET, recent: int = DEFAULT_RECENT, merge: str = DEFAULT_MERGE):
        super().__init__()
        self.budget = _checks.integer(budget, "budget", low=1)
        self.recent = _checks.integer(recent, "recent", low=0)
        self.merge = _checks.choice(merge, "merge", MERGES)

    def needs_attention(self, layer: int) -> bool:
        return True

    def store(self, layer, k, v, attn, info: PromptInfo, *, positions, n_visual) -> EvictedCache:
        full = self._new(k, v, positions)
        text = np.arange(k.shape[1]) >= n_visual
        keep, kk, vk = lookm(k, v, attn, text, self.budget, self.recent, self.merge)
        kept = full.take(keep)
        return EvictedCache(kk.astype(np.float32), vk.astype(np.float32), kept.positions, kept.next_position,
                            None, kept.index, kept.next_index)  # fmt: skip

    def extend(self, layer, cache: EvictedCache, k, v, attn, *, position: int) -> EvictedCache:
        return self._append(cache, k, v, position)


def make_policy(budget: int, merge: str = DEFAULT_MERGE) -> LookMPolicy:
    """LOOK-M keeping ``budget`` tokens per KV head and layer (the chapter's sweep knob)."""
    budget = _checks.integer(budget, "budget", low=DEFAULT_RECENT + 1)
    return LookMPolicy(budget, DEFAULT_RECENT, merge)


# ----------------------------------------------------------------------------------------------- registration
_SIZES = {
    # name: (H, Hkv, T, n_text, d, budget, recent, merge)
    "tiny": (1, 1, 6, 2, 2, 3, 1, "average"),
    "small-pivotal": (4, 2, 20, 5, 8, 10, 2, "pivotal"),
    "small-weighted": (4, 2, 20, 5, 8, 9, 3, "weighted"),
    "small-none": (2, 1, 15, 3, 4, 7, 2, "none"),
    "tinyvlm": (4, 2, 150, 6, 32, DEFAULT_BUDGET, DEFAULT_RECENT, DEFAULT_MERGE),
}


def _causal_attn(rng, h, t):
    logits = rng.standard_normal((h, t, t)) * 2
    logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    return (w / w.sum(-1, keepdims=True)).astype(np.float32)


def _case(size: str, rng: np.random.Generator) -> dict:
    h, hkv, t, nt, d, b, r, merge = _SIZES[size]
    text = np.zeros(t, bool)
    text[t - nt:] = True
    return {"k": rng.standard_normal((hkv, t, d)).astype(np.float32), "v": rng.standard_normal((hkv, t, d)).astype(
        np.float32), "attn": _causal_attn(rng, h, t), "text": text, "budget": b, "recent": r, "merge": merge}  # fmt: skip


def _compare(gold, got, inputs):
    """Kept indices bit-exact; merged keys and values within float32 rounding of the float64 merge."""
    if not (isinstance(got, tuple) and len(got) == 3):
        return False, f"expected (keep, k, v), got {type(got).__name__}"
    if np.shape(got[0]) != np.shape(gold[0]) or not np.array_equal(got[0], gold[0]):
        return False, "kept indices differ from the reference"
    for name, a, b in (("k", got[1], gold[1]), ("v", got[2], gold[2])):
        a = np.asarray(a, dtype=np.float64)
        b = np.asarray(b, dtype=np.float64)
        if a.shape != b.shape:
            return False, f"{name}: shape {a.shape}, expected {b.shape}"
        err = np.max(np.abs(a - b)) if a.size else 0.0
        bound = 1e-5 * max(1.0, float(np.max(np.abs(b))) if b.size else 1.0)
        if not err <= bound:
            return False, f"{name}: max error {err:.3g} above {bound:.3g}"
    return True, "kept indices equal; merged keys and values within 1e-5 of the reference's scale"


def _strategy():
    from hypothesis import strategies as st

    @st.composite
    def cases(draw):
        hkv = draw(st.integers(1, 2))
        h = hkv * draw(st.integers(1, 2))
        t = draw(st.integers(2, 24))
        nt = draw(st.integers(0, t))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        text = np.zeros(t, bool)
        text[t - nt:] = True
        return {"k": rng.standard_normal((hkv, t, 4)).astype(np.float32),
                "v": rng.standard_normal((hkv, t, 4)).astype(np.float32), "attn": _causal_attn(rng, h, t),
                "text": text, "budget": draw(st.integers(1, t)), "recent": draw(st.integers(0, 3)),
                "merge": draw(st.sampled_from(MERGES))}  # fmt: skip

    return cases()


register(
    Technique(
        id="kvcache.lookm",
        reference=lookm,
        make_case=_case,
        paper=(
            "Z. Wan, Z. Wu, C. Liu, J. Huang, Z. Zhu, P. Jin, L. Wang, L. Yuan, LOOK-M: Look-Once Optimization in KV "
            "Cache for Efficient Multimodal Long-Context Inference, Findings of EMNLP 2024 (arXiv 2406.18139)"
        ),
        test_sizes=tuple(_SIZES),
        compare=_compare,
        float_args=("k", "v", "attn"),
        strategy=_strategy,
        chapter="book/04-kv-cache.md",
        model_level=True,
        notes="text-prior scores (text and recent tokens never evicted), evicted entries merged into their most "
        "similar kept key (average / pivotal / weighted); compresses once after the prefill",
        extra={
            "plugs": lambda model: Plugs(kv_policy=LookMPolicy()),
            "setting": f"{DEFAULT_BUDGET} tokens per KV head and layer, recent {DEFAULT_RECENT}, {DEFAULT_MERGE} merge",
            "question_after_image": True,
        },
    )
)
