"""Exercise 01: softmax and scaled dot-product attention. Fill in the two functions marked TODO.

Use NumPy only (importing mllm_ref is refused by the grader). Grade your work with:

    mllm-ref grade 01-softmax-attention student.py
"""

import numpy as np


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax of ``x`` along ``axis``; same shape and dtype as ``x``."""
    # TODO: exp(x - max) / sum(exp(x - max)) along `axis`
    raise NotImplementedError("softmax")


def attention(q, k, v, *, causal=False, key_mask=None, scale=None, return_weights=False):
    """Scaled dot-product attention with grouped-query heads.

    q: [B, Hq, Tq, d], k: [B, Hkv, Tk, d], v: [B, Hkv, Tk, dv] (Hq a multiple of Hkv), key_mask: bool [B, Tk] or
    None (True = may be attended). Returns out [B, Hq, Tq, dv], or (out, weights [B, Hq, Tq, Tk]) if
    return_weights. Output dtype = q's dtype.
    """
    # TODO: scores, masks (causal aligned to the end of the keys, key_mask), stable softmax, weights @ v
    raise NotImplementedError("attention")
