"""Decoding: sampling and speculative decoding (exact, greedy, token trees, Medusa heads, self-speculation,
multimodal drafters).

One module per technique (``mllm_ref/decoding/<name>.py``), each registering itself as ``decoding.<name>``. The
strategies that run on the tiny VLM are :class:`mllm_ref.tinyvlm.plugs.DecodingStrategy` values set as
``Plugs.decoding``; they keep their own float32 cache (``_model.py``), which they cut back after a rejection. The
trained drafter, Medusa heads and exit heads live in ``mllm_ref/tinyvlm/weights/decoding/`` (made by
``python -m kernels_torch.tinyvlm.train_decoding``). The chapter is ``book/05-speculative-decoding.md``.
"""

from mllm_ref.decoding import (  # noqa: F401  (importing registers each technique)
    medusa,
    multimodal,
    sampling,
    self_speculative,
    speculative,
    speculative_greedy,
    tree,
)
