"""Quantization primitives shared by weight and KV-cache quantization.

One module per technique (``mllm_ref/quant/<name>.py``), each registering itself as ``quant.<name>``.
"""

import importlib as _importlib
import importlib.util as _util

# INTERIM: import the modules that exist.
for _name in ("affine",):
    if _util.find_spec(f"mllm_ref.quant.{_name}") is not None:
        _importlib.import_module(f"mllm_ref.quant.{_name}")
