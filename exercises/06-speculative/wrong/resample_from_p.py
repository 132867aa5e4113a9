"""A known-wrong submission: a rejected position is redrawn from the target p instead of norm(max(0, p - q))."""

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
        out.append(_draw(p[j], u_sample))  # wrong: the residual is what makes the step exact
        return np.array(out, dtype=np.int64)
    out.append(_draw(p[len(draft)], u_sample))
    return np.array(out, dtype=np.int64)
