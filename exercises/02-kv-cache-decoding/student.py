"""Exercise 02: autoregressive decoding with a key/value cache. Fill in the two functions marked TODO.

Use NumPy only (importing mllm_ref is refused by the grader). Grade your work with:

    mllm-ref grade 02-kv-cache-decoding student.py
"""

import numpy as np


def decode_step(cache_k, cache_v, q_new, k_new, v_new):
    """One decoding step.

    cache_k: [B, Hkv, T, d], cache_v: [B, Hkv, T, dv] (T may be 0), q_new: [B, Hq, 1, d], k_new: [B, Hkv, 1, d],
    v_new: [B, Hkv, 1, dv]. Returns (out [B, Hq, 1, dv], new_cache_k [B, Hkv, T+1, d], new_cache_v [B, Hkv, T+1, dv]).
    The inputs must not be modified.
    """
    # TODO: append the new key/value to the cache, then attend q_new over every cached key (1/sqrt(d) scale)
    raise NotImplementedError("decode_step")


def decode(q_steps, k_steps, v_steps):
    """Decode T tokens one at a time with a cache.

    q_steps: [B, Hq, T, d], k_steps: [B, Hkv, T, d], v_steps: [B, Hkv, T, dv]. Returns out [B, Hq, T, dv], which
    must equal full causal attention over the T tokens.
    """
    # TODO: start from an empty cache and call decode_step for t = 0 .. T-1
    raise NotImplementedError("decode")
