"""Exercise 06: the accept/reject step of speculative sampling. Fill in the function marked TODO.

Use NumPy only (importing mllm_ref is refused by the grader). Grade your work with:

    mllm-ref grade 06-speculative student.py
"""

import numpy as np


def speculative_step(p, q, draft, u, u_sample):
    """int64[n + 1]: the n accepted draft tokens, then the resampled (or bonus) token.

    p: float[k + 1, V] target distributions; q: float[k, V] draft distributions; draft: int[k];
    u: float[k] uniforms for the acceptances; u_sample: one uniform for the emitted token.
    """
    # TODO: walk the draft, accept with min(1, p/q), resample from the residual on the first rejection,
    # or add the bonus token from p[k]; draw tokens by inverse CDF with u_sample
    raise NotImplementedError("speculative_step")
