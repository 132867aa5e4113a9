"""SparseVLM: text-guided visual token sparsification with a rank-based ratio and token recycling.

Zhang, Fan, Ma, Zheng, Huang, Cheng, Gudovskiy, Okuno, Nakata, Keutzer, Zhang, "SparseVLM: Visual Token
Sparsification for Efficient Vision-Language Model Inference", ICML 2025 (arXiv 2410.04417); code
github.com/Gumpest/SparseVLMs. Survey: 004 section 3.1 (token pruning inside the LLM).

At a few decoder layers (the paper: layers 2, 6 and 15 of LLaVA-1.5's 32), SparseVLM lets the *text* decide which
visual tokens matter, deletes an adaptive number of them and recycles the best of the deleted ones. One pruning
step, with ``n`` visual tokens ``H_v`` first in the sequence and ``m`` text tokens ``H_t`` after them (rows of the
layer's output ``hidden``, width ``D``), and the layer's attention weights ``A[h, i, j]`` (query ``i``, key ``j``):

1. **Raters** (relevant text tokens), chosen from the decoder's *input* embeddings ``E`` (``n0`` visual tokens as
   the connector gave them, then the same ``m`` text tokens), as the authors' code does once per request. The
   relevance of text token ``t`` to the image is the mean over visual tokens of a softmax over the text::

       R_t = (1/n0) sum_v softmax_t( E_v E_t^T / sqrt(C) )[v, t]        (sum_t R_t = 1, so mean(R) = 1/m)

   with ``C`` the embedding width.

   The raters are the text tokens with ``R_t > mean(R)`` (by more than a relative ``1e-9``, so that equal
   relevances are never split by rounding). If none is above the mean, every text token is a rater.
2. **Scores.** ``P = (1/H) sum_h A[h, raters, :n]`` is the raters-to-vision attention ``[r, n]``; visual token
   ``j`` scores ``s_j = (1/r) sum_i P[i, j]``.
3. **How many to delete** (the paper's "sparsification level adaptation"). A rank-deficient ``P`` means redundant
   visual tokens; with the scale factor ``lambda``::

       N = floor( lambda * (n - rank(P)) ),   clipped to [0, n - 1]

   ``rank`` is numerical, as ``torch.linalg.matrix_rank`` computes it on float32 in the authors' code: the number of
   singular values above ``max(r, n) * eps(float32) * sigma_max``. The ``n - N`` tokens with the highest scores are
   kept (ties to the lower index), in their order.
4. **Recycling.** Of the ``N`` deleted tokens, the ``floor(tau * N) + 1`` with the highest scores (``tau`` =
   ``recycle_ratio``, 0.3 in the code) are clustered into ``c = floor(0.1 * count) + 1`` groups (``cluster_ratio``
   = 0.1) by density-peak clustering with k nearest neighbours (DPC-kNN, Du et al. 2016), as the code does:

       d_ij   = ||x_i - x_j|| / sqrt(D)
       rho_i  = exp( -(1/k) sum_{j in kNN(i)} d_ij^2 ),  k = c, the point itself included
       delta_i = min_{j: rho_j > rho_i} d_ij   (for the densest point: max_ij d_ij)
       centres = the c points with the largest rho_i * delta_i;  every point joins its nearest centre

   and each group is replaced by the mean of its tokens (the code's unit token weights). The ``c`` recycled tokens
   are appended after the kept visual tokens.

Shape legend:
    attn: ``float[H, T, T]`` the layer's attention weights (>= 0), ``T = n + m``.
    hidden: ``float[T, D]`` the layer's output; visual tokens ``0 .. n-1``, text ``n .. T-1`` (``m >= 1``).
    embeds: ``float[n0 + m, C]`` the decoder's input embeddings of the request (``n0 >= 1`` visual tokens, then the
    same ``m`` text tokens), for the raters.
    returns ``(keep int64[k], recycled float[c, D], group int64[n])``: the kept visual tokens (ascending), the
    recycled tokens (dtype of ``hidden``), and for each visual token the recycled token it went into (``-1``: kept,
    or deleted without recycling).

Deviations from the paper: the rater logits are scaled by 1/sqrt(C) like attention logits (the authors' code leaves
them unscaled); DPC-kNN breaks density ties by the lower index instead of the code's random noise, and numbers the
groups by their centre's index; recycling can be switched off with ``recycle_ratio=0`` (the code always recycles
at least one token). The count rule is the paper's ``N = lambda (n - rank P)``: the authors' first release keeps
``min(int(scale * rank + bias), n - 1)`` tokens instead (scale 13.5 for its 192-token setting) and later releases
use fixed per-layer counts.
"""

from __future__ import annotations


import numpy as np

from mllm_ref import _checks
from mllm_ref.oracle.registry import Technique, register
from mllm_ref.tinyvlm.plugs import DecoderUpdate, LayerView, Plugs, TokenPolicy
from mllm_ref.tokens._common import top_k_indices

__all__ = [
    "sparsevlm",
    "raters",
    "rater_scores",
    "numerical_rank",
    "n_deleted",
    "recycle_counts",
    "dpc_knn",
    "SparseVLMPolicy",
    "make_policy",
]

#: A text token whose relevance is within this relative margin of the mean counts as tied with it, not above it
#: (equal relevances must not be split by the rounding of the mean).
TIE_MARGIN = 1e-9
#: Relative tolerance of the numerical rank: float32's machine epsilon, as the authors compute it on float32.
RANK_EPS = float(np.finfo(np.float32).eps)


def _validate(attn, hidden, embeds, n_visual, scale, recycle_ratio, cluster_ratio, *, check_values: bool = True):
    """Shared entry checks (the fast paths use them too). ``check_values=False`` leaves out the scans of the
    arrays' values (NaN/inf, negative weights), for a fast path that checks them in its own pass and raises
    :func:`value_errors`' messages."""
    lax = not check_values
    attn = _checks.float_array(attn, "attn", ndim=3, allow_nonfinite=lax)
    hidden = _checks.float_array(hidden, "hidden", ndim=2, allow_nonfinite=lax)
    embeds = _checks.float_array(embeds, "embeds", ndim=2, allow_nonfinite=lax)
    _checks.same_dtype("attn", attn, "hidden", hidden)
    _checks.same_dtype("attn", attn, "embeds", embeds)
    t = hidden.shape[0]
    if attn.shape[1:] != (t, t):
        raise ValueError(f"attn must have shape [H, {t}, {t}] (T from hidden), got {attn.shape}")
    if t < 2:
        raise ValueError(f"hidden must hold at least one visual and one text token, got {t} tokens")
    n_visual = _checks.integer(n_visual, "n_visual", low=1, high=t - 1)
    if embeds.shape[0] <= t - n_visual:
        raise ValueError(
            f"embeds must hold at least one visual token before the {t - n_visual} text tokens, "
            f"got shape {embeds.shape}"
        )
    scale = _checks.real(scale, "scale", low=0.0, high=1.0)
    recycle_ratio = _checks.real(recycle_ratio, "recycle_ratio", low=0.0, high=1.0)
    cluster_ratio = _checks.real(cluster_ratio, "cluster_ratio", low=0.0, high=1.0)
    if check_values and attn.min() < 0:
        raise ValueError(NEGATIVE_ATTN)
    return attn, hidden, embeds, n_visual, scale, recycle_ratio, cluster_ratio


NEGATIVE_ATTN = "attn must hold attention weights (>= 0)"


def value_errors(finite: dict, attn_nonnegative: bool) -> None:
    """Raise the reference's error for the first failed value check: ``finite`` maps ``"attn"``, ``"hidden"``,
    ``"embeds"`` to whether that array is free of NaN/inf (used by the fast paths' own scans)."""
    for name in ("attn", "hidden", "embeds"):
        if not finite[name]:
            raise ValueError(f"{name} contains NaN or infinite values")
    if not attn_nonnegative:
        raise ValueError(NEGATIVE_ATTN)


def raters(embeds: np.ndarray, n_visual: int) -> np.ndarray:
    """Indices (into ``embeds``, ascending) of the text tokens with relevance ``R_t > mean(R)`` (step 1); the
    visual tokens are ``embeds[:n_visual]``, the text the rest.

    Computed in float64. If no text token is strictly above the mean (one text token, or all equally relevant),
    every text token is a rater.
    """
    h = embeds.astype(np.float64)
    logits = h[:n_visual] @ h[n_visual:].T / np.sqrt(h.shape[1])  # [n, m]
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    relevance = (e / e.sum(axis=1, keepdims=True)).mean(axis=0)  # [m]
    chosen = np.flatnonzero(relevance > relevance.mean() * (1.0 + TIE_MARGIN))
    if chosen.size == 0:
        chosen = np.arange(relevance.size)
    return (chosen + n_visual).astype(np.int64)


def rater_scores(attn: np.ndarray, rater_idx: np.ndarray, n_visual: int) -> tuple[np.ndarray, np.ndarray]:
    """``(P, s)``: the head-averaged raters-to-vision attention ``float64[r, n]`` and the scores ``float64[n]``."""
    p = np.sum(attn[:, rater_idx, :n_visual], axis=0, dtype=np.float64) / attn.shape[0]
    return p, p.mean(axis=0)


def numerical_rank(p: np.ndarray) -> int:
    """Singular values of ``p`` above ``max(p.shape) * eps(float32) * sigma_max`` (0 for a zero matrix)."""
    sigma = np.linalg.svd(np.asarray(p, dtype=np.float64), compute_uv=False)
    if sigma.size == 0 or sigma[0] == 0:
        return 0
    return int(np.count_nonzero(sigma > max(p.shape) * RANK_EPS * sigma[0]))


def n_deleted(n_visual: int, rank: int, scale: float) -> int:
    """``N = floor(lambda (n - rank))``, at most ``n - 1`` (one visual token always stays)."""
    return int(min(max(np.floor(scale * (n_visual - rank)), 0), n_visual - 1))


def recycle_counts(n_del: int, recycle_ratio: float, cluster_ratio: float) -> tuple[int, int]:
    """``(recycled, groups)``: ``floor(tau N) + 1`` deleted tokens (0 when ``N = 0`` or ``tau = 0``) go into
    ``floor(cluster_ratio * recycled) + 1`` groups."""
    if n_del == 0 or recycle_ratio == 0:
        return 0, 0
    n_sel = min(int(np.floor(recycle_ratio * n_del)) + 1, n_del)
    return n_sel, min(int(np.floor(cluster_ratio * n_sel)) + 1, n_sel)


def _pairwise_distance(x: np.ndarray) -> np.ndarray:
    """``d_ij = ||x_i - x_j|| / sqrt(D)`` in float64 (Gram form, clipped at 0, exact 0 on the diagonal).

    The upper triangle is mirrored, so ``d_ij`` and ``d_ji`` are the same number: with ``k = 2`` two mutual nearest
    neighbours then have exactly equal densities, and the tie rule (not rounding) decides which one is denser.
    """
    x = x.astype(np.float64)
    sq = np.sum(x * x, axis=1)
    d2 = np.triu(np.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0), 1)
    return np.sqrt((d2 + d2.T) / x.shape[1])


def dpc_knn(x: np.ndarray, n_clusters: int) -> np.ndarray:
    """Density-peak clustering with k nearest neighbours (``k = n_clusters``, step 4 of the module docstring).

    Args:
        x: ``float[p, D]`` the tokens to cluster; n_clusters: ``c`` in ``[1, p]``.

    Returns:
        ``int64[p]``: each token's group, numbered by the ascending index of the group's centre. Density ties go
        to the lower index (it counts as the denser), centre ties to the lower index, and a token equally near two
        centres joins the lower-numbered one; a centre always joins its own group.
    """
    p = x.shape[0]
    d = _pairwise_distance(x)
    knn = np.sort(d, axis=1)[:, :n_clusters]
    density = np.exp(-np.mean(knn * knn, axis=1))
    idx = np.arange(p)
    # j is denser than i: higher density, or equal density and a lower index (a strict total order)
    tie = (density[None, :] == density[:, None]) & (idx[None, :] < idx[:, None])
    denser = (density[None, :] > density[:, None]) | tie
    dist_max = d.max() if p else 0.0
    delta = np.where(denser, d, dist_max).min(axis=1) if p else np.zeros(0)
    centres = top_k_indices(density * delta, n_clusters)
    group = np.argmin(d[:, centres], axis=1).astype(np.int64)
    group[centres] = np.arange(n_clusters)
    return group


def sparsevlm(
    attn: np.ndarray,
    hidden: np.ndarray,
    embeds: np.ndarray,
    n_visual: int,
    scale: float = 0.5,
    recycle_ratio: float = 0.3,
    cluster_ratio: float = 0.1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One SparseVLM pruning step (raters, scores, rank-based count, recycling; module docstring).

    Args:
        attn: ``float[H, T, T]`` the layer's attention weights (>= 0).
        hidden: ``float[T, D]`` the layer's output, visual tokens first (same dtype as ``attn``).
        embeds: ``float[n0 + m, C]`` the decoder's input embeddings (visual, then the ``m`` text tokens), which
            choose the raters (same dtype).
        n_visual: ``n`` visual tokens at the front, ``1 <= n <= T - 1``.
        scale: ``lambda`` in [0, 1]; 0 deletes nothing (the identity).
        recycle_ratio: ``tau`` in [0, 1], share of the deleted tokens that are recycled (0: none).
        cluster_ratio: groups per recycled token, in [0, 1].

    Returns:
        ``(keep, recycled, group)``: ``int64[n - N]`` kept visual tokens (ascending); ``float[c, D]`` recycled
        tokens in ``hidden``'s dtype; ``int64[n]`` for each visual token its recycled token or ``-1``.
    """
    attn, hidden, embeds, n, scale, tau, cr = _validate(
        attn, hidden, embeds, n_visual, scale, recycle_ratio, cluster_ratio
    )
    m = hidden.shape[0] - n
    rater_idx = raters(embeds, embeds.shape[0] - m) - (embeds.shape[0] - m) + n
    p, scores = rater_scores(attn, rater_idx, n)
    n_del = n_deleted(n, numerical_rank(p), scale)
    keep = top_k_indices(scores, n - n_del)
    group = np.full(n, -1, dtype=np.int64)
    n_sel, n_groups = recycle_counts(n_del, tau, cr)
    recycled = np.zeros((n_groups, hidden.shape[1]), dtype=hidden.dtype)
    if n_sel:
        deleted = np.setdiff1d(np.arange(n), keep)
        chosen = deleted[top_k_indices(scores[deleted], n_sel)]
        g = dpc_knn(hidden[chosen], n_groups)
        group[chosen] = g
        acc = np.zeros((n_groups, hidden.shape[1]), dtype=np.float64)
        np.add.at(acc, g, hidden[chosen].astype(np.float64))
        recycled = (acc / np.bincount(g, minlength=n_groups)[:, None]).astype(hidden.dtype)
    return keep, recycled, group


# ------------------------------------------------------------------------------------------- the tiny VLM plug
#: The paper prunes after layers 2, 6 and 15 of LLaVA-1.5's 32; scaled to the tiny VLM's 12 layers (l * 12 / 32,
#: rounded: 0.75, 2.25, 5.625) that is after layers 1, 2 and 6.
DEFAULT_LAYERS = (1, 2, 6)
#: Kept fraction after the last pruning layer: the paper's "192 of 576" setting, 48 of the tiny VLM's 144.
DEFAULT_KEEP = 1.0 / 3.0



class SparseVLMPolicy(TokenPolicy):
    """SparseVLM on the tiny VLM: after each prefill layer in ``layers``, prune with ``scale`` and append the
    recycled tokens (position id 0, like every visual token; each carries the patches it averages).

    The raters come from the decoder's input embeddings, as in the authors' code (``LayerView.info.inputs``).
    """

    name = "sparsevlm"

    def __init__(self, layers=DEFAULT_LAYERS, scale: float = 0.5, recycle_ratio: float = 0.3,
                 cluster_ratio: float = 0.1):  # fmt: skip
        self.layers = tuple(_checks.integer(x, "layers", low=0) for x in layers)
        self.scale = _checks.real(scale, "scale", low=0.0, high=1.0)
        self.recycle_ratio = _checks.real(recycle_ratio, "recycle_ratio", low=0.0, high=1.0)
        self.cluster_ratio = _checks.real(cluster_ratio, "cluster_ratio", low=0.0, high=1.0)

    def needs_attention(self, layer: int) -> bool:
        return layer in self.layers

    def in_decoder(self, layer: int, view: LayerView):
        n = view.n_visual
        if layer not in self.layers or n == 0 or self.scale == 0:
            return None
        keep, recycled, group = sparsevlm(
            view.attn, view.hidden, view.info.inputs.astype(view.hidden.dtype), n, self.scale, self.recycle_ratio,
            self.cluster_ratio,
        )  # fmt: skip
        if keep.size == n and recycled.shape[0] == 0:
            return None
        n_new = keep.size + recycled.shape[0]
        new_index = np.full(n, -1, dtype=np.int64)
        new_index[keep] = np.arange(keep.size)
        new_index[group >= 0] = keep.size + group[group >= 0]
        source = np.where(view.source >= 0, new_index[np.maximum(view.source, 0)], -1)
        hidden = np.concatenate([view.hidden[keep], recycled.astype(view.hidden.dtype), view.hidden[n:]])
        positions = np.concatenate([np.zeros(n_new, dtype=np.int64), view.positions[n:]])
        return DecoderUpdate(hidden=hidden, positions=positions, n_visual=n_new, source=source)


def scale_for(keep_ratio: float, n_layers: int = len(DEFAULT_LAYERS)) -> float:
    """``lambda`` that keeps about ``keep_ratio`` of the visual tokens after ``n_layers`` pruning steps:
    ``1 - keep_ratio ** (1 / n_layers)`` (each step keeps ``(1 - lambda) n + lambda rank(P)`` tokens)."""
    keep_ratio = _checks.real(keep_ratio, "keep_ratio", low=0.0, high=1.0)
    n_layers = _checks.integer(n_layers, "n_layers", low=1)
    return float(1.0 - keep_ratio ** (1.0 / n_layers))


def make_policy(keep_ratio: float = DEFAULT_KEEP) -> SparseVLMPolicy:
    """SparseVLM after layers 1, 2, 6 (the paper's 2, 6, 15 of 32, scaled) with ``lambda = scale_for(keep_ratio)``: about ``keep_ratio`` of the visual
    tokens are left after the last pruning layer (plus the rank term and the few recycled tokens); 1 is the
    identity."""
    return SparseVLMPolicy(DEFAULT_LAYERS, scale_for(keep_ratio))


# ----------------------------------------------------------------------------------------------- registration
_SIZES = {
    # name: (heads, visual tokens, text tokens, raters among them, width, visual tokens at the decoder's input)
    "tiny": (2, 6, 3, 1, 4, 6),
    "small": (4, 24, 5, 2, 16, 30),
    "tinyvlm": (4, 144, 6, 2, 128, 144),
    "llava": (32, 576, 40, 12, 4096, 576),
}


def _make_case(rng: np.random.Generator, h: int, n: int, m: int, r: int, d: int, n0: int, dtype, scale, tau) -> dict:
    """A case whose decisions are far from ties: in the embeddings the raters are text tokens aligned with the
    visual tokens' common direction (relevance ~ 1/r against ~0); the raters' attention over the visual tokens is
    a softmax of a random permutation of well-spaced logits, shared by all heads up to small noise; the layer's
    output is Gaussian."""
    t = n + m
    u = rng.standard_normal(d)
    u /= np.linalg.norm(u)
    embeds = rng.standard_normal((n0 + m, d))
    embeds[:n0] += 2.0 * u
    sign = np.full(m, -1.0)
    sign[rng.choice(m, size=r, replace=False)] = 1.0
    embeds[n0:] = 0.3 * rng.standard_normal((m, d)) + (sign * 2.0 * np.sqrt(d))[:, None] * u
    spaced = np.linspace(0.0, 5.0, t)
    perm = rng.permutation(t)
    logits = spaced[perm][None, None, :] + 0.05 * rng.standard_normal((h, t, t))
    logits = np.where(np.tril(np.ones((t, t), dtype=bool)), logits, -np.inf)
    w = np.exp(logits - logits.max(axis=-1, keepdims=True))
    attn = w / w.sum(axis=-1, keepdims=True)
    return {
        "attn": attn.astype(dtype),
        "hidden": rng.standard_normal((t, d)).astype(dtype),
        "embeds": embeds.astype(dtype),
        "n_visual": n,
        "scale": scale,
        "recycle_ratio": tau,
        "cluster_ratio": 0.1,
    }


def _case(size: str, rng: np.random.Generator) -> dict:
    h, n, m, r, d, n0 = _SIZES[size]
    scale = float(rng.choice([0.3, 0.5, 0.8])) if size in ("tiny", "small") else 0.5
    return _make_case(rng, h, n, m, r, d, n0, np.float32, scale, 0.3)


def _cost(kw: dict) -> dict:
    h, t, _ = kw["attn"].shape
    n, d = kw["n_visual"], kw["hidden"].shape[1]
    m = t - n
    n0 = kw["embeds"].shape[0] - m
    n_sel = int(0.3 * n * kw["scale"]) + 1
    flops = 2.0 * n0 * m * kw["embeds"].shape[1] + h * m * n + 2.0 * n_sel * n_sel * d
    item = kw["hidden"].itemsize
    return {"flops": flops, "bytes": float(item * (kw["embeds"].size + h * m * n + n_sel * d))}


def _strategy():
    from hypothesis import strategies as st

    @st.composite
    def cases(draw):
        h = draw(st.integers(1, 4))
        n = draw(st.integers(1, 40))
        m = draw(st.integers(1, 6))
        r = draw(st.integers(1, m))
        d = draw(st.integers(2, 12))
        n0 = n + draw(st.integers(0, 8))
        dtype = draw(st.sampled_from([np.float32, np.float64]))
        scale = draw(st.sampled_from([0.0, 0.2, 0.5, 0.75, 1.0]))
        tau = draw(st.sampled_from([0.0, 0.3, 0.6, 1.0]))
        seed = draw(st.integers(0, 2**32 - 1))
        return _make_case(np.random.default_rng(seed), h, n, m, r, d, n0, dtype, scale, tau)

    return cases()


register(
    Technique(
        id="tokens.sparsevlm",
        reference=sparsevlm,
        make_case=_case,
        paper=(
            "Y. Zhang, C.-K. Fan, J. Ma, W. Zheng, T. Huang, K. Cheng, D. Gudovskiy, T. Okuno, Y. Nakata, "
            "K. Keutzer, S. Zhang, SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model "
            "Inference, ICML 2025 (arXiv 2410.04417)"
        ),
        test_sizes=("tiny", "small", "tinyvlm"),
        bench_sizes=("llava",),
        compare="tolerance",
        strategy=_strategy,
        cost=_cost,
        chapter="book/02-fewer-visual-tokens.md",
        model_level=True,
        notes=(
            "paper's rank rule N = floor(lambda (n - rank P)); raters from the decoder's input embeddings; "
            "layers 2/6/15 of 32 -> after 1/2/6 of 12; lambda = 1 - keep^(1/3) for keep = 1/3 (192 of 576)"
        ),
        extra={
            "plugs": lambda model: Plugs(token_policy=make_policy(DEFAULT_KEEP)),
            "setting": "after layers 1/2/6, lambda=0.31 (keep 1/3 as 192 of 576: 144->103->75->54 visual), recycle 30%",
        },
    )
)
