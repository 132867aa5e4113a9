"""Numba fast paths of :mod:`mllm_ref.nn` (softmax, rmsnorm, layernorm, rope, attention).

Each module mirrors its reference module; see :mod:`kernels_numba` for the contract. The shared helpers are
``_common`` (fast-math flags, blocked sums, row maxima, parallel threshold) and ``_fastexp`` (a vectorisable exp).
"""
