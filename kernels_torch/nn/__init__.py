"""PyTorch fast paths of :mod:`mllm_ref.nn` (softmax, rmsnorm, layernorm, rope, attention).

Each module mirrors its reference module; see :mod:`kernels_torch` for the contract. ``_convert`` holds the
NumPy/torch boundary helper.
"""
