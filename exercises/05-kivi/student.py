"""Exercise 05: KIVI's two quantizers of the KV cache. Fill in the four functions marked TODO.

Use NumPy only (importing mllm_ref is refused by the grader). Grade your work with:

    mllm-ref grade 05-kivi student.py
"""

import numpy as np


def quantize_keys(k, bits, group_size):
    """(codes uint8[T, d], scale[T/G, d], minimum[T/G, d]): per channel, groups of G consecutive tokens."""
    # TODO: reshape to [T/G, G, d], min and max over the G tokens, the step, the codes
    raise NotImplementedError("quantize_keys")


def quantize_values(v, bits, group_size):
    """(codes uint8[T, d], scale[T, d/G], minimum[T, d/G]): per token, groups of G consecutive channels."""
    # TODO: reshape to [T, d/G, G], min and max over the G channels, the step, the codes
    raise NotImplementedError("quantize_values")


def dequantize_keys(codes, scale, minimum, group_size):
    """float[T, d]: codes * scale + minimum, with each group's parameters repeated over its G tokens."""
    # TODO
    raise NotImplementedError("dequantize_keys")


def dequantize_values(codes, scale, minimum, group_size):
    """float[T, d]: codes * scale + minimum, with each group's parameters repeated over its G channels."""
    # TODO
    raise NotImplementedError("dequantize_values")
