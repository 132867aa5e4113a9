"""The KV cache: quantization, eviction, paging and reuse.

One module per technique (``mllm_ref/kvcache/<name>.py``), each registering itself as ``kvcache.<name>`` and, where
it plugs into the tiny VLM, giving a :class:`mllm_ref.tinyvlm.plugs.KVPolicy` and ``make_policy(bits)`` or
``make_policy(budget)`` (the chapter's sweeps, :func:`mllm_ref.tinyvlm.tour.kv_sweep`). Modules whose names start
with an underscore are helpers (byte accounting, inspection), not techniques. The chapter is ``book/04-kv-cache.md``.
"""

from mllm_ref.kvcache import (  # noqa: F401  (importing registers each technique)
    calibquant,
    h2o,
    kivi,
    lookm,
    paged,
    prefix,
    quant_attention,
    quant_token,
    snapkv,
    streaming,
    vlcache,
    vq,
)
