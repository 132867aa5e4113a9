"""Quantization primitives shared by weight and KV-cache quantization.

One module per technique (``mllm_ref/quant/<name>.py``), each registering itself as ``quant.<name>``.
"""

from mllm_ref.quant import affine  # noqa: F401  (importing registers the technique)
