"""Known-wrong: `decode` attends every query over ALL T keys at once (no causal mask): token t sees the future.
decode_step is left as the stub."""

import numpy as np


def decode_step(cache_k, cache_v, q_new, k_new, v_new):
    raise NotImplementedError("decode_step")


def decode(q_steps, k_steps, v_steps):
    group = q_steps.shape[1] // k_steps.shape[1]
    k, v = np.repeat(k_steps, group, axis=1), np.repeat(v_steps, group, axis=1)
    s = (q_steps @ k.swapaxes(-1, -2)) / np.sqrt(q_steps.shape[-1]).astype(q_steps.dtype)
    w = np.exp(s - s.max(axis=-1, keepdims=True))
    return (w / w.sum(axis=-1, keepdims=True)) @ v
