"""A known-wrong submission: the kept image tokens come out in score order, not in sequence order."""

import numpy as np


def fastv_scores(attn, visual_start, n_visual, scoring="last"):
    cols = attn[:, :, visual_start : visual_start + n_visual].astype(np.float64)
    if scoring == "last":
        return cols[:, -1, :].mean(axis=0)
    return cols.mean(axis=(0, 1))


def fastv(hidden, attn, visual_start, n_visual, ratio=0.5, scoring="last"):
    scores = fastv_scores(attn, visual_start, n_visual, scoring)
    k = int(n_visual - np.floor(n_visual * ratio + 0.5))
    top = np.argsort(-scores, kind="stable")[:k] + visual_start  # forgot to sort the kept indices
    keep = np.concatenate([np.arange(visual_start), top, np.arange(visual_start + n_visual, hidden.shape[0])])
    keep = keep.astype(np.int64)
    return keep, hidden[keep]
