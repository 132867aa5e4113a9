"""VL-Cache: layer budgets from attention sparsity, tokens scored by the attention the text pays after the image.

Dezhan Tu, Danylo Vashchilenko, Yuzhe Lu, Panpan Xu, "VL-Cache: Sparsity and Modality-Aware KV Cache Compression for
Vision-Language Model Inference Acceleration", arXiv 2410.23317 (2024). Survey section: KV-cache compression for
multimodal inputs.

Two observations drive it. Layers differ in how sparse their attention is, so a uniform budget wastes tokens on
sparse layers and starves dense ones; and in a vision-language prompt the tokens *after* the image (the question)
are the ones whose attention tells which image tokens matter.

1. **Post-vision attention.** With the image's tokens first, the rows ``i >= n_visual`` of a layer's prefill
   attention ``A`` (the language tokens' queries) are its post-vision attention.
2. **Layer sparsity.** ``γ_l`` is the fraction of the post-vision attention weights (over the causal entries) below
   ``τ`` times their row's maximum (``τ = 1%``, the paper's threshold); ``1 − γ_l`` is the layer's *density*.
3. **Budget allocation.** A total of ``L · B`` tokens (``B`` per layer on average) is split across the ``L`` layers
   in proportion to their densities: ``b_l = L B (1 − γ_l) / Σ_m (1 − γ_m)``, rounded, at least ``b_min``.
4. **Modality-aware scores.** Each cached token ``j`` is scored by the post-vision attention it receives,
   ``s_j = Σ_{i >= n_visual} A[i, j]`` (per KV head: the mean over the query heads sharing it); each layer keeps its
   ``b_l`` best tokens (ties to the lower index).

Shapes: ``attn`` ``float[H, T, T]`` one layer's prefill attention, ``n_visual`` image tokens first; scores
``float64[Hkv, T]``; kept indices ``int64[Hkv, b]``.

On the tiny VLM. The plug sees the layers one after another, while the allocation needs every layer's sparsity; so the
densities are measured once per model on a calibration set (4 held-out scenes and their questions, seeded, in the
question-after-image setting: the image and ``<bos>``) and the allocation is fixed from them. Scores are the
request's own.

Deviations from the paper: the allocation fractions come from a calibration set, not from each request's prefill
(the plug sees one layer at a time); the paper computes them per request after the whole prefill. The threshold is
relative to each row's maximum as in the paper; ``b_min`` (default 4) keeps every layer non-empty. No fast paths.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from mllm_ref import _checks
from mllm_ref.kvcache.h2o import top_indices
from mllm_ref.kvcache.streaming import EvictedCache, EvictionPolicy
from mllm_ref.oracle.registry import Technique, register
from mllm_ref.tinyvlm.plugs import Plugs, PromptInfo

__all__ = ["vlcache_scores", "layer_sparsity", "allocate", "vlcache", "VLCachePolicy", "make_policy",
           "calibrated_density", "CALIBRATION_SEED"]  # fmt: skip

TAU = 0.01
CALIBRATION_SEED = 4_000_037


def _attn(attn, n_visual):
    attn = _checks.float_array(attn, "attn", ndim=3)
    t = attn.shape[1]
    if attn.shape[2] != t:
        raise ValueError(f"attn must be square in its last two axes [H, T, T], got {attn.shape}")
    if attn.min() < 0:
        raise ValueError("attn must hold attention weights (>= 0)")
    n_visual = _checks.integer(n_visual, "n_visual", low=0, high=t - 1)
    return attn, n_visual


def layer_sparsity(attn, n_visual: int, tau: float = TAU) -> float:
    """``γ``: the fraction of the post-vision attention weights (rows ``>= n_visual``, causal entries ``j <= i``)
    below ``tau`` times their row's maximum."""
    attn, n_visual = _attn(attn, n_visual)
    tau = _checks.real(tau, "tau", low=0.0, high=1.0)
    rows = attn[:, n_visual:, :].astype(np.float64)  # [H, P, T]
    p, t = rows.shape[1], rows.shape[2]
    causal = np.arange(t)[None, :] <= np.arange(n_visual, t)[:, None]  # [P, T]
    small = rows < tau * rows.max(axis=-1, keepdims=True)
    return float(np.count_nonzero(small & causal) / (rows.shape[0] * np.count_nonzero(causal)))


def allocate(density, average_budget: int, min_budget: int = 4, max_budget: int | None = None) -> np.ndarray:
    """Per-layer budgets ``int64[L]`` proportional to ``density`` (``1 − γ_l``) with mean ``average_budget``:
    ``round(L B d_l / Σ d)``, clipped to ``[min_budget, max_budget]``."""
    d = _checks.float_array(np.asarray(density, dtype=np.float64), "density", ndim=1)
    if d.min() < 0 or d.sum() <= 0:
        raise ValueError("density must be >= 0 with a positive sum")
    b = _checks.integer(average_budget, "average_budget", low=1)
    lo = _checks.integer(min_budget, "min_budget", low=1)
    out = np.rint(d.size * b * d / d.sum()).astype(np.int64)
    return np.clip(out, lo, max_budget if max_budget is not None else None).astype(np.int64)


def vlcache_scores(attn, n_visual: int, kv_heads: int) -> np.ndarray:
    """Post-vision attention received by each token, ``float64[kv_heads, T]`` (group mean over query heads)."""
    attn, n_visual = _attn(attn, n_visual)
    kv_heads = _checks.integer(kv_heads, "kv_heads", low=1)
    h, t, _ = attn.shape
    if h % kv_heads:
        raise ValueError(f"kv_heads must divide the query heads of attn (H = {h}), got {kv_heads}")
    col = np.sum(attn[:, n_visual:, :], axis=1, dtype=np.float64)
    return col.reshape(kv_heads, h // kv_heads, t).mean(axis=1)


def vlcache(attn, n_visual: int, kv_heads: int, budget: int) -> np.ndarray:
    """The tokens one layer keeps: the ``budget`` best post-vision scores per KV head, ``int64[kv_heads, K]``
    ascending (``K = min(budget, T)``, ties to the lower index)."""
    s = vlcache_scores(attn, n_visual, kv_heads)
    budget = _checks.integer(budget, "budget", low=1)
    return top_indices(s, min(budget, s.shape[1]))


# ------------------------------------------------------------------------------------------- the tiny VLM plug
DEFAULT_BUDGET = 64


@lru_cache(maxsize=4)
def calibrated_density(n_scenes: int = 4, tau: float = TAU) -> tuple[float, ...]:
    """``1 − γ_l`` per decoder layer of the bundled tiny VLM, averaged over ``n_scenes`` held-out scenes (seed
    :data:`CALIBRATION_SEED`), measured on the prefill of the image and ``<bos>`` (the tour's setting)."""
    from mllm_ref.tinyvlm import tokenizer, world
    from mllm_ref.tinyvlm.model import load, prefill
    from mllm_ref.tinyvlm.plugs import KVPolicy

    class _Sparsity(KVPolicy):
        def __init__(self):
            self.seen = {}

        def needs_attention(self, layer):
            return True

        def store(self, layer, k, v, attn, info, *, positions, n_visual):
            self.seen[layer] = layer_sparsity(attn, min(n_visual, attn.shape[1] - 1), tau)
            return super().store(layer, k, v, attn, info, positions=positions, n_visual=n_visual)

    model = load()
    rng = np.random.default_rng(CALIBRATION_SEED)
    dens = np.zeros(model.config.layers)
    for _ in range(n_scenes):
        probe = _Sparsity()
        prefill(model, world.render(world.make_scene(rng)), [tokenizer.BOS], Plugs(kv_policy=probe))
        dens += 1.0 - np.array([probe.seen[i] for i in range(model.config.layers)])
    return tuple(float(x) for x in dens / n_scenes)


class VLCachePolicy(EvictionPolicy):
    """VL-Cache on the tiny VLM: layer ``l`` keeps ``budgets[l]`` tokens per KV head, the best by post-vision
    attention, after the prefill; decode tokens are appended."""

    name = "vlcache"

    def __init__(self, budgets):
        super().__init__()
        self.budgets = tuple(_checks.int_array(budgets, "budgets", ndim=1, low=1).tolist())

    def needs_attention(self, layer: int) -> bool:
        return True

    def store(self, layer, k, v, attn, info: PromptInfo, *, positions, n_visual) -> EvictedCache:
        if layer >= len(self.budgets):
            raise ValueError(f"budgets has {len(self.budgets)} layers, the model asked for layer {layer}")
        full = self._new(k, v, positions)
        keep = vlcache(attn, min(n_visual, k.shape[1] - 1), k.shape[0], self.budgets[layer])
        return full.take(keep)

    def extend(self, layer, cache: EvictedCache, k, v, attn, *, position: int) -> EvictedCache:
        return self._append(cache, k, v, position)


def make_policy(budget: int) -> VLCachePolicy:
    """VL-Cache with ``budget`` tokens per KV head and layer on average, split by the calibrated densities."""
    budget = _checks.integer(budget, "budget", low=1)
    return VLCachePolicy(allocate(calibrated_density(), budget))


# ----------------------------------------------------------------------------------------------- registration
_SIZES = {
    # name: (H, Hkv, T, n_visual, budget)
    "tiny": (1, 1, 6, 4, 3),
    "small": (4, 2, 30, 20, 12),
    "all": (2, 2, 9, 5, 20),
    "tinyvlm": (4, 2, 150, 144, DEFAULT_BUDGET),
}


def _case(size: str, rng: np.random.Generator) -> dict:
    h, hkv, t, nv, b = _SIZES[size]
    logits = rng.standard_normal((h, t, t)) * 3
    logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    return {"attn": (w / w.sum(-1, keepdims=True)).astype(np.float32), "n_visual": nv, "kv_heads": hkv, "budget": b}


register(
    Technique(
        id="kvcache.vlcache",
        reference=vlcache,
        make_case=_case,
        paper=(
            "D. Tu, D. Vashchilenko, Y. Lu, P. Xu, VL-Cache: Sparsity and Modality-Aware KV Cache Compression for "
            "Vision-Language Model Inference Acceleration (arXiv 2410.23317)"
        ),
        test_sizes=tuple(_SIZES),
        compare="exact",
        chapter="book/04-kv-cache.md",
        model_level=True,
        notes="post-vision attention scores; per-layer budgets in proportion to attention density (1 - sparsity at "
        "1% of the row max), measured once per model on a calibration set (the plug sees one layer at a time)",
        extra={
            "plugs": lambda model: Plugs(kv_policy=make_policy(DEFAULT_BUDGET)),
            "setting": f"{DEFAULT_BUDGET} tokens per KV head and layer on average, split by calibrated layer density",
            "question_after_image": True,
        },
    )
)
