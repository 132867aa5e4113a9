"""The KV cache: quantization, eviction, paging and reuse.

One module per technique (``mllm_ref/kvcache/<name>.py``), each registering itself as ``kvcache.<name>`` and, where
it plugs into the tiny VLM, giving a :class:`mllm_ref.tinyvlm.plugs.KVPolicy`. The chapter is
``book/04-kv-cache.md``.
"""

import importlib as _importlib
import importlib.util as _util

# INTERIM (while the family is being written): import the modules that exist.
for _name in ("quant_token", "kivi", "quant_attention", "calibquant", "vq", "streaming", "h2o", "snapkv",
              "lookm", "vlcache", "paged", "prefix"):
    if _util.find_spec(f"mllm_ref.kvcache.{_name}") is not None:
        _importlib.import_module(f"mllm_ref.kvcache.{_name}")
