"""FastV: drop the image tokens that receive the least attention, after decoder layer K.

Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for Large
Vision-Language Models", ECCV 2024 (arXiv 2403.06764).

The observation: past the first two layers of LLaVA-1.5, image tokens receive a small share of the attention.
FastV runs layers ``0 .. K-1`` on the whole sequence, scores each image token by the attention it receives in
layer ``K-1``, and runs layers ``K ..`` on the text and on the ``(1 - R)`` share of image tokens with the
highest scores. Nothing is trained; every other token and every position id is left as it is.

With ``A`` the attention weights of layer ``K-1`` (``[H, T, T]``, rows are queries) and image tokens at
``s .. s+n-1``, the score of image token ``j`` is

- ``scoring="last"`` (the authors' implementation): ``score_j = (1/H) sum_h A[h, T-1, s+j]``, the attention the
  last token pays it, averaged over heads;
- ``scoring="mean"`` (the paper's wording, "the average attention score one token received from all other
  tokens"): ``score_j = (1/(H T)) sum_h sum_i A[h, i, s+j]``, the column mean over heads and every query (a causal
  model gives zeros above the diagonal; they count in the mean).

The ``n - round(R n)`` image tokens with the highest scores are kept (ties to the lower index), in their order.
Ties are decided on the float64 scores as summed: two columns whose sums are equal in exact arithmetic can round
apart in another summation order (the fast paths sum in other orders), so such exact ties are not guaranteed to
break alike; the registered cases keep scores far apart.
The paper's theoretical FLOPs ratio for an ``L``-layer model with ``n`` tokens at width ``d`` and FFN width ``m``:
``(K * f(n) + (L - K) * f(n')) / (L * f(n))`` with ``f(n) = 4 n d^2 + 2 n^2 d + 2 n d m``
(:func:`flops_ratio`).

Deviations from the paper: none in the pruning step. The authors' code takes ``R`` as a count of kept tokens;
here ``R`` is the dropped fraction and the count is rounded half up. On the tiny VLM (12 decoder layers) the
default is the paper's own, K = 2 and R = 50%; its visual tokens all have position id 0, so the kept tokens'
positions are trivially unchanged.

Shapes: ``T`` tokens in the sequence, ``H`` heads, ``D`` hidden width, ``n`` image tokens starting at ``s``.
"""

from __future__ import annotations

import numpy as np

from mllm_ref import _checks
from mllm_ref.oracle.registry import Technique, register
from mllm_ref.tinyvlm.plugs import LayerView, Plugs, TokenPolicy

SCORINGS = ("last", "mean")


def n_kept(n_visual: int, ratio: float) -> int:
    """Image tokens FastV keeps out of ``n_visual`` when dropping ``ratio`` of them: ``n - floor(R n + 1/2)``."""
    return int(n_visual - np.floor(n_visual * ratio + 0.5))


def _validate(hidden, attn, visual_start, n_visual, ratio, scoring, *, check_values: bool = True):
    """Entry checks. ``check_values=False`` leaves out the scans of the arrays' values (NaN/inf, negative
    weights) for a fast path that does them fused with its own pass, raising :func:`value_errors`' messages."""
    hidden = _checks.float_array(hidden, "hidden", ndim=2, allow_nonfinite=not check_values)
    attn = _checks.float_array(attn, "attn", ndim=3, allow_nonfinite=not check_values)
    _checks.same_dtype("hidden", hidden, "attn", attn)
    t = hidden.shape[0]
    if attn.shape[1:] != (t, t):
        raise ValueError(f"attn must have shape [H, {t}, {t}] (T from hidden), got {attn.shape}")
    visual_start = _checks.integer(visual_start, "visual_start", low=0, high=t)
    n_visual = _checks.integer(n_visual, "n_visual", low=0, high=t - visual_start)
    ratio = _checks.real(ratio, "ratio", low=0.0, high=1.0)
    _checks.choice(scoring, "scoring", SCORINGS)
    if check_values and attn.min() < 0:
        raise ValueError(NEGATIVE_ATTN)
    return hidden, attn, visual_start, n_visual, ratio, scoring


NEGATIVE_ATTN = "attn must hold attention weights (>= 0)"


def value_errors(hidden_finite: bool, attn_finite: bool, attn_nonnegative: bool) -> None:
    """Raise the reference's error for the first failed value check (used by the fast paths' fused scans)."""
    if not hidden_finite:
        raise ValueError("hidden contains NaN or infinite values")
    if not attn_finite:
        raise ValueError("attn contains NaN or infinite values")
    if not attn_nonnegative:
        raise ValueError(NEGATIVE_ATTN)


def fastv_scores(attn: np.ndarray, visual_start: int, n_visual: int, scoring: str = "last") -> np.ndarray:
    """The score of each image token (see the module docstring), accumulated in float64.

    Args:
        attn: ``float[H, T, T]`` attention weights of layer ``K-1``.

    Returns:
        ``float64[n_visual]``.
    """
    cols = attn[:, :, visual_start : visual_start + n_visual]
    if scoring == "last":
        return np.sum(cols[:, -1, :], axis=0, dtype=np.float64) / attn.shape[0]
    return np.sum(cols, axis=(0, 1), dtype=np.float64) / (attn.shape[0] * attn.shape[1])


def fastv(
    hidden: np.ndarray,
    attn: np.ndarray,
    visual_start: int,
    n_visual: int,
    ratio: float = 0.5,
    scoring: str = "last",
) -> tuple[np.ndarray, np.ndarray]:
    """FastV's pruning step after layer ``K-1``.

    Args:
        hidden: ``float[T, D]`` layer ``K-1``'s output (the input of layer ``K``).
        attn: ``float[H, T, T]`` layer ``K-1``'s attention weights (same dtype as ``hidden``).
        visual_start: index of the first image token.
        n_visual: image tokens, at ``visual_start .. visual_start + n_visual - 1``.
        ratio: ``R`` in [0, 1], the fraction of image tokens dropped (0: the identity).
        scoring: ``"last"`` or ``"mean"`` (module docstring).

    Returns:
        ``(keep, hidden_kept)``: ``int64[T']`` the kept indices into the sequence, ascending (every non-image
        token and the kept image tokens), and ``hidden[keep]`` ``float[T', D]``; ``T' = T - n + n_kept(n, R)``.
    """
    hidden, attn, s, n, ratio, scoring = _validate(hidden, attn, visual_start, n_visual, ratio, scoring)
    k = n_kept(n, ratio)
    scores = fastv_scores(attn, s, n, scoring)
    top = np.sort(np.argsort(-scores, kind="stable")[:k]) + s
    t = hidden.shape[0]
    keep = np.concatenate([np.arange(s, dtype=np.int64), top.astype(np.int64), np.arange(s + n, t, dtype=np.int64)])
    return keep, hidden[keep]


def flops_ratio(n_tokens: int, n_dropped: int, layers: int, k: int, dim: int, ffn_dim: int) -> float:
    """The paper's theoretical FLOPs ratio of FastV to the full model (its equation in section 4.1).

    ``f(n) = 4 n d^2 + 2 n^2 d + 2 n d m`` per layer; layers ``0..K-1`` see ``n`` tokens, the rest ``n - dropped``.
    """
    n = _checks.integer(n_tokens, "n_tokens", low=1)
    dropped = _checks.integer(n_dropped, "n_dropped", low=0, high=n - 1)
    layers = _checks.integer(layers, "layers", low=1)
    k = _checks.integer(k, "k", low=0, high=layers)
    d = _checks.integer(dim, "dim", low=1)
    m = _checks.integer(ffn_dim, "ffn_dim", low=1)

    def f(t):
        return 4 * t * d * d + 2 * t * t * d + 2 * t * d * m

    return (k * f(n) + (layers - k) * f(n - dropped)) / (layers * f(n))


# ------------------------------------------------------------------------------------------- the tiny VLM plug
#: The paper's default, K = 2 and R = 50% (on LLaVA-1.5's 32 layers), kept as it is on the tiny VLM's 12.
DEFAULT_K = 2
DEFAULT_RATIO = 0.5


class FastVPolicy(TokenPolicy):
    """FastV on the tiny VLM: after prefill layer ``k - 1``, drop ``ratio`` of the visual tokens.

    Visual tokens come first in the tiny VLM's sequence and all have position id 0, so dropping some leaves every
    position id unchanged, as FastV requires.
    """

    name = "fastv"

    def __init__(self, k: int = DEFAULT_K, ratio: float = DEFAULT_RATIO, scoring: str = "last"):
        self.k = _checks.integer(k, "k", low=1)
        self.ratio = _checks.real(ratio, "ratio", low=0.0, high=1.0)
        self.scoring = _checks.choice(scoring, "scoring", SCORINGS)

    def needs_attention(self, layer: int) -> bool:
        return layer == self.k - 1

    def in_decoder(self, layer: int, view: LayerView):
        if layer != self.k - 1:
            return None
        keep, _ = fastv(view.hidden, view.attn, 0, view.n_visual, self.ratio, self.scoring)
        return keep


def make_policy(keep_ratio: float) -> FastVPolicy:
    """FastV at the default layer (K = 2) keeping ``keep_ratio`` of the visual tokens (``R = 1 - keep_ratio``)."""
    keep_ratio = _checks.real(keep_ratio, "keep_ratio", low=0.0, high=1.0)
    return FastVPolicy(DEFAULT_K, 1.0 - keep_ratio)


# ----------------------------------------------------------------------------------------------- registration
_SIZES = {
    # name: (heads, system tokens, image tokens, text tokens, width)
    "tiny": (2, 1, 6, 2, 3),
    "small": (4, 3, 24, 5, 16),
    "tinyvlm": (4, 0, 144, 6, 128),
    "llava": (32, 35, 576, 29, 4096),
}


def _attention_weights(rng: np.random.Generator, h: int, t: int, dtype) -> np.ndarray:
    """Causal attention rows whose image-token scores are far from tied: each row is a softmax of logits that
    are a random permutation of well-spaced values, so column sums differ by much more than rounding."""
    logits = np.empty((h, t, t))
    spaced = np.linspace(0.0, 6.0, t)
    for i in range(h):
        perm = rng.permutation(t)
        logits[i] = spaced[perm][None, :] + 0.01 * rng.standard_normal((t, t))
    logits = np.where(np.tril(np.ones((t, t), dtype=bool)), logits, -np.inf)
    w = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (w / w.sum(axis=-1, keepdims=True)).astype(dtype)


def _case(size: str, rng: np.random.Generator) -> dict:
    name, _, scoring = size.partition("-")
    h, s, n, p, d = _SIZES[name]
    t = s + n + p
    return {
        "hidden": rng.standard_normal((t, d)).astype(np.float32),
        "attn": _attention_weights(rng, h, t, np.float32),
        "visual_start": s,
        "n_visual": n,
        "ratio": float(rng.choice([0.25, 0.5, 0.75])) if name in ("tiny", "small") else 0.5,
        "scoring": scoring or "last",
    }


def _cost(kw: dict) -> dict:
    """The least memory traffic of a call: every value of ``attn`` and ``hidden`` is read once (bad input must
    be rejected wherever it sits) and the kept rows are written; FLOPs are the additions of the scores."""
    h, t, _ = kw["attn"].shape
    n = kw["n_visual"]
    adds = h * n * (1 if kw["scoring"] == "last" else t)
    keep = t - n + n_kept(n, kw["ratio"])
    written = keep * kw["hidden"].shape[1] * kw["hidden"].itemsize
    return {"flops": float(adds), "bytes": float(kw["attn"].nbytes + kw["hidden"].nbytes + written)}


def _strategy():
    from hypothesis import strategies as st

    @st.composite
    def cases(draw):
        h = draw(st.integers(1, 4))
        s = draw(st.integers(0, 4))
        n = draw(st.integers(0, 40))
        p = draw(st.integers(1, 5))
        d = draw(st.integers(1, 9))
        seed = draw(st.integers(0, 2**32 - 1))
        rng = np.random.default_rng(seed)
        t = s + n + p
        return {
            "hidden": rng.standard_normal((t, d)).astype(draw(st.sampled_from([np.float32, np.float64]))),
            "attn": None,
            "visual_start": s,
            "n_visual": n,
            "ratio": draw(st.floats(0.0, 1.0)),
            "scoring": draw(st.sampled_from(SCORINGS)),
            "_h": h,
            "_seed": seed,
        }

    def finish(kw):
        h, seed = kw.pop("_h"), kw.pop("_seed")
        kw["attn"] = _attention_weights(np.random.default_rng(seed + 1), h, kw["hidden"].shape[0], kw["hidden"].dtype)
        return kw

    return cases().map(finish)


register(
    Technique(
        id="tokens.fastv",
        reference=fastv,
        make_case=_case,
        paper=(
            "L. Chen, H. Zhao, T. Liu, S. Bai, J. Lin, C. Zhou, B. Chang, An Image is Worth 1/2 Tokens After "
            "Layer 2: Plug-and-Play Inference Acceleration for Large Vision-Language Models, ECCV 2024 "
            "(arXiv 2403.06764)"
        ),
        test_sizes=("tiny", "small", "small-mean", "tinyvlm"),
        bench_sizes=("llava-last", "llava-mean"),
        compare="exact",
        strategy=_strategy,
        cost=_cost,
        chapter="book/02-fewer-visual-tokens.md",
        exercise="exercises/03-fastv",
        model_level=True,
        notes=(
            "scores by the last token's attention as the authors' code does (scoring='mean' for the paper's "
            "wording); the paper's default K=2, R=50% as it is: 10 of the tiny VLM's 12 layers run on half the "
            "image (LLM prefill FLOPs x0.58, the paper's formula x0.56)"
        ),
        extra={
            "plugs": lambda model: Plugs(token_policy=FastVPolicy(DEFAULT_K, DEFAULT_RATIO)),
            "setting": f"K={DEFAULT_K}, R={DEFAULT_RATIO:.0%}",
        },
    )
)
