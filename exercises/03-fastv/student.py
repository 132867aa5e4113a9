"""Exercise 03: FastV's scoring and dropping. Fill in the two functions marked TODO.

Use NumPy only (importing mllm_ref is refused by the grader). Grade your work with:

    mllm-ref grade 03-fastv student.py
"""

import numpy as np


def fastv_scores(attn, visual_start, n_visual, scoring="last"):
    """float64[n_visual]: the attention each image token receives (see the statement for both scorings)."""
    # TODO: average attn[:, -1, image columns] over heads ("last"), or over heads and rows ("mean"), in float64
    raise NotImplementedError("fastv_scores")


def fastv(hidden, attn, visual_start, n_visual, ratio=0.5, scoring="last"):
    """(keep int64[T'], hidden[keep]): drop the `ratio` least attended image tokens, keep everything else."""
    # TODO: count to keep, stable ranking of the scores, kept positions in increasing order, gather the rows
    raise NotImplementedError("fastv")
