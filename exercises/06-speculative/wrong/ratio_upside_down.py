"""A known-wrong submission: accepts with min(1, q/p) instead of min(1, p/q)."""

import numpy as np


def _draw(r, u):
    c = np.cumsum(r)
    i = int(np.searchsorted(c, u * c[-1], side="right"))
    return min(i, int(np.flatnonzero(r > 0)[-1]))


def speculative_step(p, q, draft, u, u_sample):
    out = []
    for j, x in enumerate(draft):
        ratio = q[j, x] / p[j, x] if p[j, x] > 0 else 0.0  # wrong way round
        if u[j] < min(1.0, ratio):
            out.append(int(x))
            continue
        r = np.maximum(p[j] - q[j], 0.0)
        out.append(_draw(r if r.sum() > 0 else p[j], u_sample))
        return np.array(out, dtype=np.int64)
    out.append(_draw(p[len(draft)], u_sample))
    return np.array(out, dtype=np.int64)
