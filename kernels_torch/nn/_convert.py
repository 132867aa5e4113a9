"""The NumPy -> torch boundary of the :mod:`kernels_torch.nn` fast paths (private)."""

from __future__ import annotations

import numpy as np
import torch


def as_tensor(x: np.ndarray) -> torch.Tensor:
    """A CPU tensor sharing ``x``'s memory when possible.

    ``torch.from_numpy`` shares memory with any array of non-negative strides; a negatively strided view is copied
    to a contiguous array first, and a read-only array is copied (torch tensors are always writeable, and sharing
    a read-only buffer draws a warning), and an array of non-native byte order (read from a big-endian file), which
    ``torch.from_numpy`` refuses, is converted to the native order.
    """
    if not x.dtype.isnative:
        x = x.astype(x.dtype.newbyteorder("="))
    if any(s < 0 for s in x.strides):
        x = np.ascontiguousarray(x)
    if not x.flags.writeable:
        x = x.copy()
    return torch.from_numpy(x)
