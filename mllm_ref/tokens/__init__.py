"""Fewer visual tokens: pooling, space-to-depth, dynamic-resolution tiling, merging and dropping.

One module per technique (``mllm_ref/tokens/<name>.py``), each registering itself as ``tokens.<name>`` and, where
it plugs into the tiny VLM, giving a :class:`mllm_ref.tinyvlm.plugs.TokenPolicy` and ``make_policy(keep_ratio)``
(the book's slider and ``mllm_ref.tinyvlm.tour.sweep`` use it). The chapter is ``book/02-fewer-visual-tokens.md``.
"""

from mllm_ref.tokens import (  # noqa: F401  (importing registers each technique)
    anyres,
    dart,
    fastv,
    folder,
    frame_merge,
    mustdrop,
    pixel_unshuffle,
    pool,
    prumerge,
    sparsevlm,
    tome,
)
