"""Small pieces shared by the token techniques: counts, stable top-k, cosine similarity, weighted merging.

Conventions every technique of the family follows:

- A *keep ratio* is the fraction of visual tokens kept; the count kept is :func:`keep_count` (round half up,
  at least one token unless the ratio is 0 and the technique allows it).
- Selection ties go to the lower index, and kept tokens stay in their original order (:func:`top_k_indices`).
  A tie is a tie of the scores as computed: scores equal in exact arithmetic but summed in another order (as a
  fast path may) can round apart, so only ties that survive rounding are guaranteed to break alike.
- Merging is size-weighted: merging tokens ``x_i`` with sizes ``s_i`` gives ``sum(s_i x_i) / sum(s_i)`` with size
  ``sum(s_i)``, so the size-weighted sum of all tokens is preserved (ToMe's invariant).
"""

from __future__ import annotations

import numpy as np

from mllm_ref import _checks


def keep_count(n: int, keep_ratio: float, *, at_least_one: bool = True) -> int:
    """Tokens kept out of ``n`` at ``keep_ratio`` in [0, 1]: ``floor(n * keep_ratio + 1/2)``, at least 1 if asked."""
    n = _checks.integer(n, "n", low=0)
    keep_ratio = _checks.real(keep_ratio, "keep_ratio", low=0.0, high=1.0)
    k = int(np.floor(n * keep_ratio + 0.5))
    if at_least_one and n > 0:
        k = max(k, 1)
    return min(k, n)


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest ``scores`` (1-D), ties to the lower index, returned in increasing order.

    Returns:
        ``int64[k]`` sorted ascending (the kept tokens keep their order).
    """
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return np.sort(order[:k]).astype(np.int64)


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """``x / max(||x||, tiny)`` along ``axis``; a zero row stays zero (its cosine similarity with anything is 0)."""
    norm = np.sqrt(np.sum(np.square(x, dtype=np.float64), axis=axis, keepdims=True))
    tiny = np.finfo(x.dtype).tiny if x.dtype.kind == "f" else np.finfo(np.float64).tiny
    return (x / np.maximum(norm, tiny)).astype(x.dtype)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[..., M, C] x [..., N, C] -> [..., M, N]`` cosine similarities (zero rows give 0)."""
    return l2_normalize(a) @ np.swapaxes(l2_normalize(b), -1, -2)


def merge_into(x: np.ndarray, size: np.ndarray, dst: np.ndarray, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Size-weighted merge: token ``i`` goes into output ``dst[i]`` (``-1``: dropped, contributes nothing).

    Args:
        x: ``float[N, C]``; size: ``float[N]`` > 0; dst: ``int[N]`` in ``[-1, n_out)``.

    Returns:
        ``(y[n_out, C], size_out[n_out])``: ``y[j] = sum_{dst[i]=j} s_i x_i / sum_{dst[i]=j} s_i``; an output
        nobody merges into is zero with size 0.
    """
    live = dst >= 0
    acc = np.zeros((n_out, x.shape[1]), dtype=np.float64)
    np.add.at(acc, dst[live], x[live].astype(np.float64) * size[live, None])
    s = np.zeros(n_out, dtype=np.float64)
    np.add.at(s, dst[live], size[live].astype(np.float64))
    y = np.where(s[:, None] > 0, acc / np.where(s > 0, s, 1.0)[:, None], 0.0)
    return y.astype(x.dtype), s.astype(size.dtype)
