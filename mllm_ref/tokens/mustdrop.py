"""MustDrop: drop vision tokens at every stage of their life, in the encoder, at prefill and in the decoding cache.

T. Liu, L. Shi, R. Hong, Y. Hu, Q. Yin, L. Zhang, "Multi-Stage Vision Token Dropping: Towards Efficient Multimodal
Large Language Model", 2024 (arXiv 2411.10803); the authors' code is liuting20/MustDrop
(``multimodal_encoder/local_merge.py``, ``multimodal_encoder/clip_encoder.py``,
``language_model/modelling_sparse_llama.py``). Survey section: token compression across stages.

Three stages, each a pure function here:

(a) **Vision encoding** (:func:`spatial_merge`, :func:`key_set`). The ``rows x cols`` patch grid is cut into
    non-overlapping ``w x w`` windows (``w = 3``). A window's score is the mean cosine similarity of its tokens
    over ordered pairs ``i != j``::

        s(W) = 1 / (|W| (|W| - 1)) * sum_{i != j in W} cos(x_i, x_j)

    and every window with ``s(W) >= tau`` (``tau = 0.8``) becomes one token, the size-weighted mean of its
    tokens (the code merges after the first encoder layer). A *key set* of the ``ceil(0.08 N)`` tokens the class
    token attends to most, in the last encoder layer, is marked so that no later stage drops it.

(b) **Prefilling: dual-attention filtering** (:func:`dual_attention_filter`, the registered reference). With
    ``A[t, j]`` the attention text token ``t`` pays visual token ``j`` at a pruning layer, averaged over heads::

        g_j = sum_t A[t, j]                 (global attention)
        m_j = max_t A[t, j]                 (individual attention)
        drop j  iff  g_j < gamma_g * sum_i g_i  and  m_j < gamma_i  and  j is not in the key set

    (the authors' 64-token setting on LLaVA-1.5: ``gamma_g = 0.011``, ``gamma_i = 0.01``, pruning at layers
    2, 6, 10, 14 of 32). A forced count ``n_keep`` (for a kept-fraction slider; not in the paper) keeps the key
    set and the tokens with the largest ``max(g_j / (gamma_g sum g), m_j / gamma_i)``, the margin by which a
    token passes the rule, so that the thresholds' order is kept.

(c) **Decoding: output-aware cache policy** (:func:`output_aware_keep`). At each decoding step, the cached visual
    keys and values whose attention from the generated token (averaged over heads) is below ``lambda`` are
    evicted from that layer's cache; text entries are never evicted.

Shape legend:
    x: ``float[N, C]`` tokens on a ``rows x cols`` grid (row-major); size: ``float[N]`` > 0 patches per token.
    attn (b): ``float[H, Tt, Nv]`` attention of the ``Tt`` text tokens over the ``Nv`` visual tokens.
    attn (c): ``float[H, Q, T]`` attention of ``Q`` generated tokens over ``T`` cached entries (visual first).

Deviations from the paper: the paper's text for stage (c) was not available to us and the authors' code
implements no decode-time attention rule (its "sparse KV cache" only removes from the caches of the pruning layers
the tokens pruned later); stage (c) here follows the paper's summary ("an output-aware cache policy ... to further
reduce the size of the KV cache"): evict visual entries the generated token barely attends to, with a threshold
``lambda`` of our choosing. Merged windows are placed at their first patch, so the tokens keep their spatial order
(the code puts merged windows first); windows cut by the grid's border are allowed (the code requires the grid to
divide by ``w``). On the tiny VLM (no class token), the key set uses the mean attention each token receives in
the last encoder block, see :class:`MustDropPolicy`; the merge runs inside encoder block 0 after its attention
(the code: after the whole first layer). The code filters at four layers (2, 6, 10, 14 of 32), renewing the key
set each time; the tiny VLM's policy filters once, after decoder layer 1 (its K = 2, as the code's first
filtering layer), with the key set of the encoder.
A forced ``keep_ratio`` never keeps fewer tokens than the key set holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from mllm_ref import _checks
from mllm_ref.oracle.registry import Technique, register
from mllm_ref.tinyvlm.plugs import EncoderView, KVPolicy, LayerView, Plugs, PromptInfo, TokenPolicy, VisualTokens
from mllm_ref.tokens._common import cosine_similarity, keep_count, merge_into, top_k_indices

__all__ = [
    "spatial_merge",
    "key_set",
    "dual_attention_filter",
    "output_aware_keep",
    "MustDropPolicy",
    "OutputAwareKV",
    "make_policy",
    "make_plugs",
]

#: The authors' settings on LLaVA-1.5 (576 patches): merge window and threshold, key-set rate, and the dual-attention
#: thresholds of their 64-token run.
WINDOW = 3
MERGE_THRESHOLD = 0.8
KEY_RATE = 0.08
GLOBAL_THR = 0.011
INDIVIDUAL_THR = 0.01


# ----------------------------------------------------------------------------------------- (a) vision encoding
def windows(rows: int, cols: int, window: int) -> list[np.ndarray]:
    """The ``window x window`` blocks of a ``rows x cols`` grid, row-major, as arrays of row-major token indices
    (blocks at the right and bottom border are cut short)."""
    out = []
    for r0 in range(0, rows, window):
        for c0 in range(0, cols, window):
            rr, cc = np.meshgrid(np.arange(r0, min(r0 + window, rows)), np.arange(c0, min(c0 + window, cols)),
                                 indexing="ij")  # fmt: skip
            out.append((rr * cols + cc).ravel().astype(np.int64))
    return out


def window_scores(x: np.ndarray, rows: int, cols: int, window: int) -> np.ndarray:
    """``float64[W]``: each window's mean pairwise cosine similarity over ``i != j`` (``-inf`` for a one-token
    window, which never merges)."""
    out = []
    for members in windows(rows, cols, window):
        m = members.size
        if m < 2:
            out.append(-np.inf)
            continue
        s = cosine_similarity(x[members], x[members]).astype(np.float64)
        out.append((s.sum() - np.trace(s)) / (m * (m - 1)))
    return np.array(out)


def spatial_merge(
    x: np.ndarray,
    size: np.ndarray,
    rows: int,
    cols: int,
    *,
    window: int = WINDOW,
    threshold: float = MERGE_THRESHOLD,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stage (a): merge every ``window x window`` block of similar adjacent tokens into one token.

    Args:
        x: ``float[N, C]`` tokens of a ``rows x cols`` grid, row-major (``N = rows * cols``).
        size: ``float[N]`` > 0, patches per token (ones for fresh patches); same dtype as ``x``.
        window: side of the blocks (the code's 3). threshold: merge a block whose mean pairwise cosine similarity
            is ``>= threshold`` (the code's 0.8).

    Returns:
        ``(y float[M, C], size_out float[M], dst int64[N])``: ``dst[i]`` is the output token of input ``i``; a
        merged block is the size-weighted mean of its tokens and sits at its first token's place, so outputs keep
        the order of their first token. ``threshold > 1`` merges nothing (the identity).
    """
    x = _checks.float_array(x, "x", ndim=2)
    size = _checks.float_array(size, "size", ndim=1)
    _checks.same_dtype("x", x, "size", size)
    rows = _checks.integer(rows, "rows", low=1)
    cols = _checks.integer(cols, "cols", low=1)
    if x.shape[0] != rows * cols:
        raise ValueError(f"x must have rows * cols = {rows * cols} tokens, got shape {x.shape}")
    _checks.dim("size", size, 0, x.shape[0], "one size per token of x")
    if size.min() <= 0:
        raise ValueError("size must be > 0")
    window = _checks.integer(window, "window", low=1)
    threshold = _checks.real(threshold, "threshold")
    group = np.arange(x.shape[0], dtype=np.int64)  # the first token of each token's group
    for members, score in zip(windows(rows, cols, window), window_scores(x, rows, cols, window)):
        if score >= threshold:
            group[members] = members.min()
    firsts, dst = np.unique(group, return_inverse=True)
    dst = dst.astype(np.int64)
    y, size_out = merge_into(x, size, dst, firsts.size)
    alone = np.bincount(dst, minlength=firsts.size) == 1
    y[alone], size_out[alone] = x[firsts[alone]], size[firsts[alone]]  # an unmerged token is passed on exactly
    return y, size_out, dst


def key_set(scores: np.ndarray, keep_rate: float = KEY_RATE) -> np.ndarray:
    """Stage (a)'s key set: the ``ceil(keep_rate N)`` tokens with the highest class attention ``scores[N]``
    (ties to the lower index), as ``int64`` indices in increasing order."""
    scores = _checks.float_array(scores, "scores", ndim=1)
    keep_rate = _checks.real(keep_rate, "keep_rate", low=0.0, high=1.0)
    return top_k_indices(scores, math.ceil(keep_rate * scores.size))


# ----------------------------------------------------------------------------------------------- (b) prefilling
def _validate(attn, global_thr, individual_thr, protected, n_keep):
    attn = _checks.float_array(attn, "attn", ndim=3)
    if attn.min() < 0:
        raise ValueError("attn must hold attention weights (>= 0)")
    nv = attn.shape[2]
    global_thr = _checks.real(global_thr, "global_thr", low=0.0)
    individual_thr = _checks.real(individual_thr, "individual_thr", low=0.0)
    if protected is not None:
        protected = _checks.bool_array(protected, "protected")
        if protected.shape != (nv,):
            raise ValueError(
                f"protected must have shape ({nv},), one flag per visual token of attn, got {protected.shape}"
            )
    if n_keep is not None:
        n_keep = _checks.integer(n_keep, "n_keep", low=1, high=nv)
    return attn, global_thr, individual_thr, protected, n_keep


def dual_attention_scores(attn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(g, m)`` float64 ``[Nv]``: global (sum over text tokens) and individual (max over text tokens) attention
    of each visual token, from ``attn[H, Tt, Nv]`` averaged over heads."""
    a = np.asarray(attn, dtype=np.float64).mean(axis=0)
    return a.sum(axis=0), a.max(axis=0)


def _pass_margin(value: np.ndarray, threshold: float) -> np.ndarray:
    """``value / threshold``, and ``+inf`` where the threshold is 0 (every value passes it)."""
    if threshold <= 0:
        return np.full(value.shape, np.inf)
    with np.errstate(over="ignore"):
        return value / threshold


def dual_attention_filter(
    attn: np.ndarray,
    *,
    global_thr: float = GLOBAL_THR,
    individual_thr: float = INDIVIDUAL_THR,
    protected: np.ndarray | None = None,
    n_keep: int | None = None,
) -> np.ndarray:
    """Stage (b): MustDrop's text-guided dual-attention filter at a prefill layer.

    Args:
        attn: ``float[H, Tt, Nv]`` >= 0, attention of the text tokens (queries) over the visual tokens (keys).
        global_thr: ``gamma_g``, a fraction of the total global attention ``sum_j g_j``.
        individual_thr: ``gamma_i``, an attention weight.
        protected: ``bool[Nv]`` the key set (never dropped), or ``None``.
        n_keep: ``None`` (the paper's thresholds decide the count) or the number of visual tokens to keep: the
            protected ones first (the most passing ones if there are more than ``n_keep``), then the others by
            ``max(g_j / (gamma_g sum g), m_j / gamma_i)``, ties to the lower index.

    Returns:
        ``int64[K]`` the kept visual tokens, in increasing order. A token is dropped iff ``g_j < gamma_g sum g``
        and ``m_j < gamma_i`` and it is not protected.
    """
    attn, global_thr, individual_thr, protected, n_keep = _validate(attn, global_thr, individual_thr, protected,
                                                                    n_keep)  # fmt: skip
    nv = attn.shape[2]
    g, m = dual_attention_scores(attn)
    total = g.sum()
    prot = np.zeros(nv, dtype=bool) if protected is None else protected.astype(bool)
    if n_keep is None:
        drop = (g < global_thr * total) & (m < individual_thr) & ~prot
        return np.flatnonzero(~drop).astype(np.int64)
    margin = np.maximum(_pass_margin(g, global_thr * total), _pass_margin(m, individual_thr))
    # protected tokens rank above every other one; within each group, by margin, ties to the lower index
    rank_key = np.where(prot, 1.0, 0.0)
    order = np.lexsort((np.arange(nv), -margin, -rank_key))
    return np.sort(order[:n_keep]).astype(np.int64)


# ------------------------------------------------------------------------------------------------- (c) decoding
def output_aware_keep(attn: np.ndarray, n_visual: int, threshold: float) -> np.ndarray:
    """Stage (c): the cache entries kept after a decoding step.

    Args:
        attn: ``float[H, Q, T]`` >= 0, attention of the ``Q`` newest generated tokens over ``T`` cached entries,
            the ``n_visual`` visual ones first.
        n_visual: visual entries at the front of the cache.
        threshold: ``lambda``; a visual entry is kept iff some generated token pays it, averaged over heads, at
            least ``lambda``. Text entries are always kept.

    Returns:
        ``int64[T']`` kept entries in increasing order.
    """
    attn = _checks.float_array(attn, "attn", ndim=3)
    t = attn.shape[2]
    n_visual = _checks.integer(n_visual, "n_visual", low=0, high=t)
    threshold = _checks.real(threshold, "threshold", low=0.0)
    score = np.asarray(attn[:, :, :n_visual], dtype=np.float64).mean(axis=0).max(axis=0, initial=0.0)
    vis = np.flatnonzero(score >= threshold)
    return np.concatenate([vis, np.arange(n_visual, t)]).astype(np.int64)


# ----------------------------------------------------------------------------------------------- the tiny VLM
def _remap(source: np.ndarray, new_index: np.ndarray) -> np.ndarray:
    out = np.full(source.shape, -1, dtype=np.int64)
    live = source >= 0
    out[live] = new_index[source[live]]
    return out


class MustDropPolicy(TokenPolicy):
    """Stages (a) and (b) on the tiny VLM.

    (a) Inside encoder block ``merge_layer`` (after its attention), :func:`spatial_merge` on the 12 x 12 grid; after
    the connector, the key set from the last encoder block's attention (no class token: the mean attention each
    token receives, over heads and queries). (b) After prefill layer ``layer`` (the code's first filtering layer, 2 of 32,
    kept: after layer 1), :func:`dual_attention_filter` on the text tokens' attention, averaged over heads, protecting the key set.

    The key set found in :meth:`after_connector` travels with the request as the tokens' ``protected`` flags
    (:class:`mllm_ref.tinyvlm.plugs.VisualTokens`); the model refuses any later step that drops one.
    The paper's thresholds are absolute weights for 576 patches; with 144 tokens each token's share is 4 times as
    large, so the defaults are 4 x (0.011, 0.01).
    """

    name = "mustdrop"

    def __init__(
        self,
        *,
        window: int = WINDOW,
        merge_threshold: float = MERGE_THRESHOLD,
        merge_layer: int = 0,
        key_rate: float = KEY_RATE,
        layer: int = 1,
        global_thr: float = 4 * GLOBAL_THR,
        individual_thr: float = 4 * INDIVIDUAL_THR,
        keep_ratio: float | None = None,
    ):
        self.window = _checks.integer(window, "window", low=1)
        self.merge_threshold = _checks.real(merge_threshold, "merge_threshold")
        self.merge_layer = _checks.integer(merge_layer, "merge_layer", low=-1)  # -1: no stage (a)
        self.key_rate = _checks.real(key_rate, "key_rate", low=0.0, high=1.0)
        self.layer = _checks.integer(layer, "layer", low=0)
        self.global_thr = _checks.real(global_thr, "global_thr", low=0.0)
        self.individual_thr = _checks.real(individual_thr, "individual_thr", low=0.0)
        self.keep_ratio = None if keep_ratio is None else _checks.real(keep_ratio, "keep_ratio", low=0.0, high=1.0)

    def in_encoder(self, layer: int, tokens: VisualTokens, keys: np.ndarray, prompt_ids: np.ndarray) -> VisualTokens:
        if layer != self.merge_layer:
            return tokens
        rows, cols = tokens.grid
        if tokens.n != rows * cols:
            raise ValueError("MustDrop's spatial merge needs the whole patch grid (no earlier merge)")
        y, size, dst = spatial_merge(tokens.x, tokens.size.astype(tokens.x.dtype), rows, cols, window=self.window,
                                     threshold=self.merge_threshold)  # fmt: skip
        return VisualTokens(y, size.astype(np.float32), _remap(tokens.source, dst), tokens.grid)

    def needs_encoder_attention(self) -> bool:
        return self.key_rate > 0

    def after_connector(self, tokens: VisualTokens, prompt_ids: np.ndarray, encoder: EncoderView) -> VisualTokens:
        protected = np.zeros(tokens.n, dtype=bool)
        if encoder.attn is not None and self.key_rate > 0:
            protected[key_set(encoder.attn.astype(np.float64).mean(axis=(0, 1)), self.key_rate)] = True
        return replace(tokens, protected=protected)

    def needs_attention(self, layer: int) -> bool:
        return layer == self.layer

    def in_decoder(self, layer: int, view: LayerView) -> np.ndarray | None:
        if layer != self.layer:
            return None
        nv, t = view.n_visual, view.hidden.shape[0]
        protected = np.zeros(nv, dtype=bool) if view.protected is None else view.protected
        n_keep = None
        if self.keep_ratio is not None:  # never below the key set, which no stage may drop
            n_keep = min(nv, max(keep_count(int(view.source.size), self.keep_ratio), int(protected.sum())))
        text_attn = view.attn[:, nv:, :nv]
        keep = dual_attention_filter(text_attn, global_thr=self.global_thr, individual_thr=self.individual_thr,
                                     protected=protected, n_keep=n_keep)  # fmt: skip
        return np.concatenate([keep, np.arange(nv, t)]).astype(np.int64)


@dataclass(frozen=True)
class VisualCache:
    """One layer's cache under :class:`OutputAwareKV`: keys and values ``float32[Hkv, T, d]``, the first
    ``n_visual`` entries visual."""

    k: np.ndarray
    v: np.ndarray
    n_visual: int


class OutputAwareKV(KVPolicy):
    """Stage (c): after each decoding step, evict the cached visual entries the new token attends to less than
    ``threshold`` (averaged over query heads), layer by layer (:func:`output_aware_keep`)."""

    name = "mustdrop-output-aware"

    def __init__(self, threshold: float = 0.001):
        self.threshold = _checks.real(threshold, "threshold", low=0.0)

    def store(self, layer, k, v, attn, info: PromptInfo, *, positions, n_visual) -> VisualCache:
        return VisualCache(k.copy(), v.copy(), int(n_visual))

    def needs_attention(self, layer: int) -> bool:
        return True

    def extend(self, layer: int, cache: VisualCache, k: np.ndarray, v: np.ndarray, attn, *, position: int):
        ck, cv, nv = cache.k, cache.v, cache.n_visual
        if attn is not None:
            keep = output_aware_keep(attn[:, :, : ck.shape[1]], nv, self.threshold)
            nv = int(np.sum(keep < nv))
            ck, cv = ck[:, keep], cv[:, keep]
        return VisualCache(np.concatenate([ck, k], axis=1), np.concatenate([cv, v], axis=1), nv)

    def read(self, layer: int, cache: VisualCache) -> tuple[np.ndarray, np.ndarray]:
        return cache.k, cache.v

    def nbytes(self, cache: VisualCache) -> int:
        return int(cache.k.nbytes + cache.v.nbytes)


#: The tour's setting: the paper's headline share of kept visual tokens, 11.1% (16 of 144), at prefill.
DEFAULT_KEEP_RATIO = 16 / 144
DEFAULT_DECODE_THRESHOLD = 0.001


def make_policy(keep_ratio: float | None = DEFAULT_KEEP_RATIO) -> MustDropPolicy:
    """Stages (a) + (b) keeping ``round(keep_ratio * 144)`` visual tokens after prefill layer 1 (fewer if the merge
    left fewer); ``keep_ratio=None`` lets the paper's thresholds decide the count."""
    return MustDropPolicy(keep_ratio=keep_ratio)


def make_plugs(
    keep_ratio: float | None = DEFAULT_KEEP_RATIO, decode_threshold: float = DEFAULT_DECODE_THRESHOLD
) -> Plugs:
    """All three stages: :func:`make_policy` and the output-aware cache (:class:`OutputAwareKV`)."""
    return Plugs(token_policy=make_policy(keep_ratio), kv_policy=OutputAwareKV(decode_threshold))


# ----------------------------------------------------------------------------------------------- registration
_SIZES = {
    # name: (heads, text tokens, visual tokens, protected, n_keep)
    "tiny": (1, 2, 5, False, None),
    "small": (4, 5, 24, True, None),
    "forced": (4, 5, 36, True, 10),
    "tinyvlm": (4, 6, 144, True, None),
    "llava": (32, 40, 576, True, None),
}


def _midpoint(values: np.ndarray, q: float) -> float:
    """A threshold halfway between two neighbouring sorted ``values`` near their ``q`` quantile."""
    s = np.sort(values)
    i = min(max(int(q * s.size), 1), s.size - 1)
    return float((s[i - 1] + s[i]) / 2)


def _case(size: str, rng: np.random.Generator) -> dict:
    h, tt, nv, prot, n_keep = _SIZES[size]
    for _ in range(200):
        logits = rng.standard_normal((h, tt, nv + tt)) * 2.0
        w = np.exp(logits - logits.max(axis=-1, keepdims=True))
        w = (w / w.sum(axis=-1, keepdims=True))[:, :, :nv].astype(np.float32)
        g, m = dual_attention_scores(w)
        gthr, ithr = _midpoint(g / g.sum(), 0.6), _midpoint(m, 0.5)
        margins = np.concatenate([np.abs(g / g.sum() - gthr) / gthr, np.abs(m - ithr) / ithr])
        if margins.min() > 1e-3 or size == "llava":  # the bench case is timed, not compared
            break
    else:
        raise RuntimeError("could not draw attention with well-separated scores")
    out = {"attn": w, "global_thr": gthr, "individual_thr": ithr}
    if prot:
        mask = np.zeros(nv, dtype=bool)
        mask[rng.choice(nv, max(1, nv // 12), replace=False)] = True
        out["protected"] = mask
    out["n_keep"] = n_keep
    return out


def _cost(kwargs: dict) -> dict:
    a = kwargs["attn"]
    return {"flops": 3.0 * a.size, "bytes": float(a.nbytes)}


register(
    Technique(
        id="tokens.mustdrop",
        reference=dual_attention_filter,
        make_case=_case,
        paper=(
            "T. Liu, L. Shi, R. Hong, Y. Hu, Q. Yin, L. Zhang, Multi-Stage Vision Token Dropping: Towards Efficient "
            "Multimodal Large Language Model, 2024 (arXiv 2411.10803)"
        ),
        test_sizes=("tiny", "small", "forced", "tinyvlm"),
        bench_sizes=("llava",),
        compare="exact",
        cost=_cost,
        chapter="book/02-fewer-visual-tokens.md",
        model_level=True,
        notes=(
            "registered reference = stage (b) dual-attention filter; stages (a) spatial_merge/key_set and (c) "
            "output_aware_keep are tested separately; no class token: key set from mean attention received; "
            "stage (c) rule (evict visual KV below lambda from the new token) is ours, the paper text was not "
            "available and the code has none"
        ),
        extra={
            "plugs": lambda model: make_plugs(),
            "setting": "3x3 merge tau=0.8, key set 8%, keep 16/144 at layer 1, decode lambda=1e-3",
        },
    )
)
