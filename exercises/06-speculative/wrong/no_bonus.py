"""A known-wrong submission: when every draft token is accepted, the bonus token from p[k] is forgotten."""

import numpy as np


def _draw(r, u):
    c = np.cumsum(r)
    i = int(np.searchsorted(c, u * c[-1], side="right"))
    return min(i, int(np.flatnonzero(r > 0)[-1]))


def speculative_step(p, q, draft, u, u_sample):
    out = []
    for j, x in enumerate(draft):
        if u[j] < min(1.0, p[j, x] / q[j, x]):
            out.append(int(x))
            continue
        r = np.maximum(p[j] - q[j], 0.0)
        out.append(_draw(r if r.sum() > 0 else p[j], u_sample))
        return np.array(out, dtype=np.int64)
    return np.array(out, dtype=np.int64)  # wrong: one free token per target call is lost
