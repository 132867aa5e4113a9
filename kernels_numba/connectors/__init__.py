"""Numba fast paths of :mod:`mllm_ref.connectors` (same module paths and signatures)."""
