"""Dynamic depth and width: early exit (CALM, entropy, patience), DeeR's consistency exit, layer skipping
(static intervals, LayerSkip's shared head), Mixture-of-Depths, MatFormer and parallel blocks.

One module per technique (``mllm_ref/dynamic/<name>.py``), each registering itself as ``dynamic.<name>``. On the tiny
VLM they plug into the ``exit_policy`` point (:class:`mllm_ref.tinyvlm.plugs.ExitPolicy`: exit, skip, route,
parallel) or, for MatFormer, the ``linear`` point. Exit heads come from ``weights/decoding/exits`` (and
``shared-exit``), the MoD routers and the MatFormer FFNs from ``weights/dynamic/``. The chapter is
``book/06-early-exit.md``.
"""

from mllm_ref.dynamic import (  # noqa: F401  (importing registers each technique)
    deer,
    early_exit,
    layer_skip,
    matformer,
    mod,
    parallel_block,
)
