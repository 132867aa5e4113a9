"""Exercise 07: CALM's early exit. Fill in the two functions marked TODO.

Use NumPy only (importing mllm_ref is refused by the grader). Grade your work with:

    mllm-ref grade 07-calm-exit student.py
"""

import numpy as np


def margin_exit_layer(logits, threshold, min_layer):
    """int: the first layer l >= min_layer whose softmax margin (top-1 minus top-2 probability) is >= threshold,
    else the last layer L - 1. logits: float[L, V], one row per layer's exit head."""
    # TODO: a stable softmax per row, the two largest probabilities, the first layer past the threshold
    raise NotImplementedError("margin_exit_layer")


def copy_kv(hidden, norm_weight, k_weight, v_weight, position, kv_heads, theta, eps):
    """(k float[S, Hkv, d], v float[S, Hkv, d]): the keys and values an exited token leaves in the S layers it
    skipped, computed from its exit hidden state. hidden: float[D]; norm_weight: float[S, D]; k_weight, v_weight:
    float[S, Hkv * d, D]."""
    # TODO: RMSNorm with each layer's weight, the key and value projections, RoPE on the keys at `position`
    raise NotImplementedError("copy_kv")
