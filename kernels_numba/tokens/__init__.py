"""Numba fast paths of :mod:`mllm_ref.tokens`, at the mirrored module paths."""
