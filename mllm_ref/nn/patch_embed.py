"""Patch embedding: cut images into non-overlapping square patches and project each to a token.

Paper: Alexey Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale",
ICLR 2021 (arXiv:2010.11929).

Equations. An image ``[H, W, C]`` with patch size p has ``N = (H/p) * (W/p)`` patches. Patch n = r * (W/p) + c
(row-major over the patch grid) holds the pixels ``image[r*p : (r+1)*p, c*p : (c+1)*p, :]``, flattened row-major:
element ``(i * p + j) * C + ch`` is pixel row i, pixel column j, channel ch of the patch. Then::

    tokens[n] = weight @ patches[n] + bias

This equals a stride-p convolution with kernel ``weight.reshape(D, p, p, C)`` applied to a channels-last image
(for a channels-first PyTorch ``Conv2d`` kernel ``[D, C, p, p]`` use ``kernel.permute(0, 2, 3, 1).reshape(D, -1)``).

Shape legend:
    images: ``[B, H, W, C]`` or one image ``[H, W, C]`` (channels last); H and W divisible by p.
    patchify returns ``[B, N, p*p*C]`` (or ``[N, p*p*C]`` for one image); weight ``[D, p*p*C]``, bias ``[D]``;
    patch_embed returns ``[B, N, D]`` (or ``[N, D]``), in the images' dtype.

Deviations from the paper: none (the paper's learned position embedding and class token are added by the model,
not here).
"""

from __future__ import annotations

import numpy as np

from mllm_ref import _checks
from mllm_ref.nn.linear import linear

__all__ = ["patchify", "patch_embed"]


def patchify(images: np.ndarray, patch: int) -> np.ndarray:
    """Cut images into flattened patches, patches row-major, then pixels row-major, then channels.

    Args:
        images: float ``[B, H, W, C]`` or ``[H, W, C]``; H and W divisible by ``patch``.
        patch: patch side p >= 1.

    Returns:
        ``[B, (H/p)*(W/p), p*p*C]``, or ``[(H/p)*(W/p), p*p*C]`` for a single ``[H, W, C]`` image.
    """
    images = _checks.float_array(images, "images", ndim=(3, 4))
    patch = _checks.integer(patch, "patch", low=1)
    single = images.ndim == 3
    x = images[None] if single else images
    b, h, w, c = x.shape
    if h % patch or w % patch:
        raise ValueError(f"images height and width ({h}, {w}) must be divisible by patch = {patch}")
    gh, gw = h // patch, w // patch
    # [B, gh, p, gw, p, C] -> [B, gh, gw, p, p, C]: grid row, grid column, pixel row, pixel column, channel.
    x = x.reshape(b, gh, patch, gw, patch, c).transpose(0, 1, 3, 2, 4, 5)
    out = x.reshape(b, gh * gw, patch * patch * c)
    return out[0] if single else out


def patch_embed(images: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, patch: int) -> np.ndarray:
    """Patchify and project: ``linear(patchify(images, patch), weight, bias)``.

    Args:
        images: ``[B, H, W, C]`` or ``[H, W, C]`` float.
        weight: ``[D, p*p*C]``; bias: ``[D]`` or None; same dtype as ``images``.
        patch: patch side p.

    Returns:
        ``[B, N, D]`` (or ``[N, D]`` for one image).
    """
    patches = patchify(images, patch)
    weight = _checks.float_array(weight, "weight", ndim=2)
    _checks.dim("weight", weight, 1, patches.shape[-1], "patch*patch*C, the flattened patch size")
    return linear(patches, weight, bias)
