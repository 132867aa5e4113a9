"""Temporal token merging across adjacent video frames (LFTR-style): a token that looks like the token at the same
place in the previous frame is merged into it.

Paper: Z. Zhao, Y. Li, Y. Li, "LFTR: Learning-Free Token Reduction for Multimodal Large Language Models", 2025
(arXiv 2501.17391), applied to Video-LLaVA; the rule of comparing spatially corresponding tokens of adjacent frames
is also FrameFusion's (T. Fu et al., arXiv 2501.01986, 2025). Survey section: fewer visual tokens, video.

Equations, for frame tokens ``x[F, N, C]`` (``F`` frames, ``N`` patches each, the same patch grid in every frame)::

    sim[f, p] = cos(x[f, p], x[f - 1, p])                                   f = 1 .. F - 1
    merge[f, p] = sim[f, p] > tau                         (threshold mode)
    merge[f, p] = (f, p) among the M largest sim, M = F N - max(N, keep_count(F N, keep_ratio))   (ratio mode)

The first frame is kept whole. Walking the frames in order, a token that is not merged starts a new kept token; a
merged token joins the kept token that carries ``(f - 1, p)``, so a patch that stays the same over several frames
becomes one token (a chain). Each kept token is the mean of the frame tokens it carries (a size-weighted merge of
size-1 tokens, :func:`mllm_ref.tokens._common.merge_into`), and its size is their count; ``sum_k size_k y_k`` equals
``sum_{f, p} x[f, p]``. Kept tokens are ordered by their first ``(frame, patch)``, frame-major. The comparison is
always with the previous frame's own token, not with the running mean. Selection ties (ratio mode) go to the lower
flat index ``f N + p``.

Shape legend:
    x: ``float[F, N, C]``.
    returns: ``{"tokens": float[K, C], "source": int64[F, N]`` (kept token carrying each (frame, patch)),
    ``"size": int64[K]``, ``"kept": int64[K]`` (flat index ``f N + p`` of each kept token's first frame token),
    ``"similarity": float[F - 1, N]}``.

Deviations from the paper: only the temporal stage is implemented (LFTR's spatial stage, dropping redundant tokens
within a frame, is covered by the other techniques of this family); the similarity is taken between the tiny VLM's
connector outputs, and the default threshold ``tau`` is set on the tiny VLM's clips (see ``DEFAULT_THRESHOLD``),
not taken from the paper. Not model-level: the tiny VLM has no video training; :func:`clip_demo` reports how many
tokens survive on a synthetic clip.
"""

from __future__ import annotations

import numpy as np

from mllm_ref import _checks
from mllm_ref.oracle.registry import Technique, register
from mllm_ref.tokens._common import keep_count, l2_normalize, merge_into, top_k_indices

__all__ = ["frame_merge", "DEFAULT_THRESHOLD", "clip_demo"]

#: Cosine similarity above which a token is merged into the previous frame's token at the same place.
DEFAULT_THRESHOLD = 0.9


def _validate(x, threshold, keep_ratio):
    """Entry checks shared by :func:`frame_merge` (and any fast path)."""
    x = _checks.float_array(x, "x", ndim=3)
    threshold = _checks.real(threshold, "threshold", low=-1.0, high=1.0)
    if keep_ratio is not None:
        keep_ratio = _checks.real(keep_ratio, "keep_ratio", low=0.0, high=1.0)
    return x, threshold, keep_ratio


def frame_merge(x: np.ndarray, threshold: float = DEFAULT_THRESHOLD, keep_ratio: float | None = None) -> dict:
    """Merge each token into the previous frame's token at the same place when they are similar.

    Args:
        x: ``float[F, N, C]`` tokens of ``F`` frames on the same ``N``-patch grid.
        threshold: ``tau`` in [-1, 1]; merge when the cosine similarity is strictly above it (threshold mode).
        keep_ratio: if given, ratio mode instead: keep ``max(N, keep_count(F N, keep_ratio))`` tokens by merging
            the most similar ones (the first frame is always kept, so at least ``N`` remain).

    Returns:
        ``{"tokens": float[K, C], "source": int64[F, N], "size": int64[K], "kept": int64[K],
        "similarity": float[F - 1, N]}`` (see the module docstring).
    """
    x, threshold, keep_ratio = _validate(x, threshold, keep_ratio)
    f_count, n, c = x.shape
    u = l2_normalize(x)
    # [F-1, N]; clipped to [-1, 1] so that rounding never lifts a similarity above tau = 1
    sim = np.clip(np.sum(u[1:] * u[:-1], axis=-1, dtype=np.float64), -1.0, 1.0).astype(x.dtype)
    if keep_ratio is None:
        merge = sim > threshold
    else:
        k = max(n, keep_count(f_count * n, keep_ratio))
        m = f_count * n - k
        merge = np.zeros(sim.size, dtype=bool)
        if m > 0:
            merge[top_k_indices(sim.reshape(-1), m)] = True
        merge = merge.reshape(sim.shape)
    merge = np.concatenate([np.zeros((1, n), dtype=bool), merge], axis=0)  # the first frame is kept whole
    # A token starts a kept token unless it is merged; kept tokens are numbered in (frame, patch) order.
    new = ~merge.reshape(-1)
    ids = np.cumsum(new) - 1
    source = np.empty((f_count, n), dtype=np.int64)
    flat_ids = ids.reshape(f_count, n)
    source[0] = flat_ids[0]
    for f in range(1, f_count):
        source[f] = np.where(merge[f], source[f - 1], flat_ids[f])
    n_kept = int(new.sum())
    tokens, size = merge_into(x.reshape(-1, c), np.ones(f_count * n, dtype=np.float64), source.reshape(-1), n_kept)
    return {
        "tokens": tokens,
        "source": source,
        "size": np.rint(size).astype(np.int64),
        "kept": np.flatnonzero(new).astype(np.int64),
        "similarity": sim,
    }


# ------------------------------------------------------------------------------------------------------ book demo
def clip_demo(model=None, seed: int = 0, threshold: float = DEFAULT_THRESHOLD, n_frames: int = 8) -> dict:
    """Encode a synthetic clip frame by frame with the tiny VLM and merge its tokens over time.

    Args:
        model: a loaded tiny VLM (loaded from the shipped weights when ``None``).
        seed: the clip's seed (:func:`mllm_ref.tinyvlm.video.make_clip`); threshold: ``tau``; n_frames: frames.

    Returns:
        ``{"frames": uint8[F, 48, 48, 3], "total": F * 144, "kept": K, "kept_per_frame": int64[F]`` (new tokens each
        frame contributes), ``"source": int64[F, 144], "size": int64[K], "similarity": float32[F - 1, 144]}``.
    """
    from mllm_ref.tinyvlm import video
    from mllm_ref.tinyvlm.model import encode_image, load

    if model is None:
        model = load()
    clip = video.make_clip(seed, n_frames)
    x = np.stack([encode_image(model, f) for f in clip.frames])
    out = frame_merge(x, threshold)
    n = x.shape[1]
    return {
        "frames": clip.frames,
        "total": int(x.shape[0] * n),
        "kept": int(out["tokens"].shape[0]),
        "kept_per_frame": np.bincount(out["kept"] // n, minlength=x.shape[0]).astype(np.int64),
        "source": out["source"],
        "size": out["size"],
        "similarity": out["similarity"],
    }


# --------------------------------------------------------------------------------------------------- registration
_SIZES = {
    # name: (frames, patches, width, mode)
    "tiny": (2, 3, 4, "threshold"),
    "small": (4, 16, 8, "threshold"),
    "ratio": (4, 12, 8, "ratio"),
    "one-frame": (1, 5, 4, "threshold"),
    "bench": (32, 196, 1024, "threshold"),  # 32 frames of 14 x 14 pooled tokens (LLaVA-Video scale)
}


def _with_similarity(rng, prev: np.ndarray, s: float) -> np.ndarray:
    """A vector whose cosine similarity with ``prev`` is exactly ``s`` (in float64), of random norm."""
    u = prev / np.linalg.norm(prev)
    v = rng.standard_normal(prev.shape)
    v -= (v @ u) * u
    v /= np.linalg.norm(v)
    return (s * u + np.sqrt(1.0 - s * s) * v) * rng.uniform(0.5, 2.0)


def _case(size: str, rng: np.random.Generator) -> dict:
    f_count, n, c, mode = _SIZES[size]
    x = np.empty((f_count, n, c), dtype=np.float64)
    x[0] = rng.standard_normal((n, c))
    m = (f_count - 1) * n
    if mode == "ratio":  # distinct similarities 0.025 apart: no near-ties in the ranking
        sims = rng.permutation(np.linspace(-0.6, 0.99, max(m, 1)))[:m]
    else:  # clearly above or clearly below the threshold
        sims = np.where(rng.random(m) < 0.5, rng.uniform(0.95, 0.999, m), rng.uniform(-0.5, 0.8, m))
    for i in range(m):
        f, p = divmod(i, n)
        x[f + 1, p] = _with_similarity(rng, x[f, p], sims[i])
    out = {"x": x.astype(np.float32), "threshold": DEFAULT_THRESHOLD}
    if mode == "ratio":
        out["keep_ratio"] = 0.55
    return out


def _cost(kwargs: dict) -> dict:
    x = kwargs["x"]
    return {"flops": 6.0 * x.size, "bytes": 2.0 * x.nbytes}


register(
    Technique(
        id="tokens.frame_merge",
        reference=frame_merge,
        make_case=_case,
        paper=(
            "Z. Zhao, Y. Li, Y. Li, LFTR: Learning-Free Token Reduction for Multimodal Large Language Models, 2025 "
            "(arXiv 2501.17391)"
        ),
        test_sizes=("tiny", "small", "ratio", "one-frame"),
        bench_sizes=("bench",),
        compare="tolerance",
        cost=_cost,
        chapter="book/02-fewer-visual-tokens.md",
        model_level=False,
        notes=(
            "temporal stage only: same-place tokens of adjacent frames with cosine > tau merge (chained, mean); "
            "tau set on the tiny VLM's clips; not model-level (no video training): clip_demo() on a moving-shapes clip"
        ),
        extra={"demo": clip_demo},
    )
)
