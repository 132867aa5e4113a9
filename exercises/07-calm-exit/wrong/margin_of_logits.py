"""A known-wrong submission: the margin is taken between the two largest LOGITS instead of probabilities."""

import numpy as np


def margin_exit_layer(logits, threshold, min_layer):
    top = np.sort(logits, axis=-1)
    margin = top[:, -1] - (top[:, -2] if logits.shape[1] > 1 else 0.0)  # wrong: not probabilities
    for layer in range(min(min_layer, logits.shape[0] - 1), logits.shape[0]):
        if margin[layer] >= threshold:
            return layer
    return logits.shape[0] - 1


def copy_kv(hidden, norm_weight, k_weight, v_weight, position, kv_heads, theta, eps):
    raise NotImplementedError("copy_kv")
