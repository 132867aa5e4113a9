"""The plug points of the tiny VLM: where a technique attaches to the forward pass without copying it.

The forward (:mod:`mllm_ref.tinyvlm.model`) is written once as a plain loop over layers. A technique plugs into
one of six points, each defaulting to "none" (the plain model):

============== ================================================= =========================================
plug           called                                            typical techniques
============== ================================================= =========================================
token_policy   after the connector, and after each decoder       pooling, merging (ToMe), pruning (FastV
               layer of the prefill                              at layer K), text-guided dropping
kv_policy      when a layer stores, extends and reads its cache  KV quantization, eviction, paging
exit_policy    after each decoder layer of a decode step         early exit (CALM), layer skipping
linear         for every linear layer, with the parameter name   quantized / pruned / low-rank weights
attention      for every decoder attention call                  sparse or windowed attention
decoding       to turn the last logits into the next token       sampling; speculative decoding drives
                                                                 :func:`prefill`/:func:`decode_step` itself
============== ================================================= =========================================

Plugs are independent, so two techniques in different plugs compose; their composition is tested like a
technique. Every policy method receives and returns plain arrays; a policy keeps no hidden state between
requests (per-request state such as a quantized cache is the value it returns and is handed back).

Shapes (the NumPy forward runs one request at a time):
    T: tokens in the decoder sequence; N: visual tokens; D: decoder width; Hkv: key/value heads; d: head size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from mllm_ref.nn.kvcache import KVCache, append, empty_cache


@dataclass(frozen=True)
class PromptInfo:
    """What a policy may know about the request.

    Attributes:
        n_visual: visual tokens entering the decoder (after the connector's token policy).
        grid: the encoder's patch grid (rows, columns) before any token policy.
        visual_index: ``int[n_visual]``, for each visual token the patch it came from (row-major index), or the
            first patch of a merged group.
        prompt_ids: ``int[P]``, the text prompt.
    """

    n_visual: int
    grid: tuple[int, int]
    visual_index: np.ndarray
    prompt_ids: np.ndarray


class TokenPolicy:
    """Chooses the visual tokens the decoder sees. The base class keeps every token."""

    name = "none"

    def after_connector(self, visual: np.ndarray, patch_index: np.ndarray, grid: tuple[int, int], prompt_ids: np.ndarray):
        """Reduce the visual tokens before the decoder.

        Args:
            visual: ``float32[N, D]`` connector outputs.
            patch_index: ``int[N]`` patch each token came from.
            grid: (rows, columns) of the patch grid.
            prompt_ids: ``int[P]`` the text prompt (for text-guided methods).

        Returns:
            ``(visual[N', D], patch_index[N'])``.
        """
        return visual, patch_index

    def needs_attention(self, layer: int) -> bool:
        """Whether :meth:`in_decoder` needs the attention weights of prefill layer ``layer``."""
        return False

    def in_decoder(self, layer: int, hidden: np.ndarray, attn: np.ndarray | None, info: PromptInfo, positions: np.ndarray):
        """After prefill layer ``layer``: indices (sorted, into the current sequence) of the tokens to keep.

        Args:
            hidden: ``float32[T, D]`` the layer's output.
            attn: ``float32[H, T, T]`` the layer's attention weights if :meth:`needs_attention` said so.
            positions: ``int[T]`` position ids of the current tokens (visual tokens first, at 0..n_visual-1).

        Returns:
            ``int[T']`` indices to keep, or ``None`` to keep all.
        """
        return None


class KVPolicy:
    """Stores, extends and reads a layer's key/value cache. The base class keeps everything in float32."""

    name = "none"

    def store(self, layer: int, k: np.ndarray, v: np.ndarray, attn: np.ndarray | None, info: PromptInfo) -> Any:
        """Cache after the prefill of ``layer``: ``k``, ``v`` are ``float32[Hkv, T, d]`` (keys already rotated).

        ``attn`` is the layer's prefill attention ``float32[H, T, T]`` when :meth:`needs_attention` is true.
        """
        return append(empty_cache(1, k.shape[0], k.shape[2], v.shape[2], dtype=k.dtype), k[None], v[None])

    def needs_attention(self, layer: int) -> bool:
        return False

    def extend(self, layer: int, cache: Any, k: np.ndarray, v: np.ndarray, attn: np.ndarray | None) -> Any:
        """Cache after one decode step: ``k``, ``v`` are ``float32[Hkv, 1, d]``; ``attn`` is ``float32[H, 1, T]``
        (the step's attention over the cache before the new token, plus itself), when needed."""
        return append(cache, k[None], v[None])

    def read(self, layer: int, cache: Any) -> tuple[np.ndarray, np.ndarray]:
        """Keys and values to attend over: ``float32[Hkv, T, d]`` each."""
        return cache.k[0], cache.v[0]

    def nbytes(self, cache: Any) -> int:
        """Bytes the cache holds (for cost accounting)."""
        return int(cache.k.nbytes + cache.v.nbytes)


class ExitPolicy:
    """Decides whether a decode step stops before the last layer. The base class never exits."""

    name = "none"

    def should_exit(self, layer: int, hidden: np.ndarray, logits_fn: Callable[[np.ndarray], np.ndarray]) -> bool:
        """After decode layer ``layer`` (0-based): ``hidden`` is ``float32[D]`` of the new token; ``logits_fn``
        maps a hidden state to vocabulary logits through the final norm and LM head."""
        return False


def greedy(logits: np.ndarray, rng: np.random.Generator | None = None) -> int:
    """The arg-max token; ties go to the lowest id."""
    return int(np.argmax(logits))


@dataclass(frozen=True)
class Plugs:
    """The six plug points; each ``None``/default is the plain model."""

    token_policy: TokenPolicy = field(default_factory=TokenPolicy)
    kv_policy: KVPolicy = field(default_factory=KVPolicy)
    exit_policy: ExitPolicy = field(default_factory=ExitPolicy)
    linear: Callable[[np.ndarray, np.ndarray, np.ndarray | None, str], np.ndarray] | None = None
    attention: Callable[..., Any] | None = None
    decoding: Callable[[np.ndarray, np.random.Generator | None], int] = greedy


NONE = Plugs()
