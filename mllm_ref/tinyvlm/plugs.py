"""The plug points of the tiny VLM: where a technique attaches to the forward pass without copying it.

The forward (:mod:`mllm_ref.tinyvlm.model`) is written once as a plain loop over layers. A technique plugs into
one of six points, each defaulting to "none" (the plain model):

============== ================================================= =========================================
plug           called                                            typical techniques
============== ================================================= =========================================
token_policy   after the connector, and after each decoder       pooling, merging (ToMe), pruning (FastV
               layer of the prefill                              at layer K), text-guided dropping
kv_policy      when a layer stores, extends and reads its cache  KV quantization, eviction, paging
exit_policy    around each decoder layer (skip, route, exit)     early exit (CALM), layer skipping,
                                                                 Mixture-of-Depths, parallel blocks
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
        inputs: ``float32[n_visual + P, D]``, the decoder's input sequence (the visual tokens, then the prompt's
            word embeddings), for methods that score tokens on it (SparseVLM's raters).
    """

    n_visual: int
    grid: tuple[int, int]
    visual_index: np.ndarray
    prompt_ids: np.ndarray
    inputs: np.ndarray | None = None


@dataclass(frozen=True)
class VisualTokens:
    """Visual tokens in flight through a token policy, with the bookkeeping merging and dropping need.

    Attributes:
        x: ``float32[N, C]`` the tokens (encoder width inside the encoder, decoder width after the connector).
        size: ``float32[N]`` how many patches each token stands for (1 for an untouched patch; ToMe's ``s``).
        source: ``int[G]`` for each patch of the ``rows x cols`` grid (row-major, ``G = rows * cols``), the index
            of the token that now carries it, or ``-1`` if it was dropped. Merging maps several patches to one
            token; the book draws kept and merged patches from it.
        grid: ``(rows, cols)`` of the patch grid.
        protected: ``bool[N]`` or ``None``: tokens a policy marked as not to be dropped by a later hook of the
            same request (MustDrop's key set); the model refuses a later step that drops one.
    """

    x: np.ndarray
    size: np.ndarray
    source: np.ndarray
    grid: tuple[int, int]
    protected: np.ndarray | None = None

    @property
    def n(self) -> int:
        return int(self.x.shape[0])

    @staticmethod
    def from_patches(x: np.ndarray, grid: tuple[int, int]) -> "VisualTokens":
        """Untouched patch tokens: token ``i`` is patch ``i``."""
        n = x.shape[0]
        return VisualTokens(x, np.ones(n, dtype=np.float32), np.arange(n, dtype=np.int64), grid)

    def take(self, keep: np.ndarray) -> "VisualTokens":
        """Keep the tokens ``keep`` (sorted indices); patches of the others become dropped (``-1``)."""
        protected = None if self.protected is None else self.protected[keep]
        return VisualTokens(self.x[keep], self.size[keep], remap_source(self.source, keep, self.n), self.grid, protected)

    def first_patch(self) -> np.ndarray:
        """``int[N]``: for each token the lowest-numbered patch it carries (``-1`` for a token carrying none)."""
        out = np.full(self.n, -1, dtype=np.int64)
        patches = np.arange(self.source.size)
        live = self.source >= 0
        # visit patches from the last to the first so the first one wins
        out[self.source[live][::-1]] = patches[live][::-1]
        return out


def remap_source(source: np.ndarray, keep: np.ndarray, n_before: int) -> np.ndarray:
    """The patch-to-token map after keeping tokens ``keep`` (sorted indices into ``n_before`` tokens)."""
    new_index = np.full(n_before, -1, dtype=np.int64)
    new_index[keep] = np.arange(len(keep))
    out = np.full(source.shape, -1, dtype=np.int64)
    live = source >= 0
    out[live] = new_index[source[live]]
    return out


@dataclass(frozen=True)
class EncoderView:
    """What the encoder's last block shows a token policy (for methods that score patches there).

    Attributes:
        keys: ``float32[Hv, N, dv]`` the last block's keys (``None`` when a policy merged tokens inside that block:
            its keys belong to the tokens before the merge; so do ``attn``'s weights, also ``None`` then).
        attn: ``float32[Hv, N, N]`` the last block's attention weights when
            :meth:`TokenPolicy.needs_encoder_attention` is true, else ``None``.
        features: ``float32[N, Cv]`` the encoder output (after its final norm), before the connector.
    """

    keys: np.ndarray | None
    attn: np.ndarray | None
    features: np.ndarray


@dataclass(frozen=True)
class LayerView:
    """What a prefill decoder layer shows a token policy.

    Attributes:
        hidden: ``float32[T, D]`` the layer's output.
        attn: ``float32[H, T, T]`` the layer's attention weights when :meth:`TokenPolicy.needs_attention` said so.
        keys: ``float32[Hkv, T, d]`` the layer's keys (rotated).
        positions: ``int[T]`` position ids of the current tokens.
        n_visual: visual tokens at the front of the current sequence (the text follows them).
        source: ``int[G]`` patch-to-token map of the current visual tokens (see :class:`VisualTokens`).
        info: the request.
        protected: ``bool[n_visual]`` or ``None``, the visual tokens an earlier hook protected from dropping.
    """

    hidden: np.ndarray
    attn: np.ndarray | None
    keys: np.ndarray
    positions: np.ndarray
    n_visual: int
    source: np.ndarray
    info: PromptInfo
    protected: np.ndarray | None = None


@dataclass(frozen=True)
class DecoderUpdate:
    """A token policy's new sequence after a prefill layer, for methods that create tokens (e.g. SparseVLM's
    recycled tokens) rather than only keep some.

    Attributes:
        hidden: ``float32[T', D]``: the new visual tokens first (``n_visual`` of them), then the text tokens,
            which must be exactly the text rows of the layer's output.
        positions: ``int[T']`` their position ids (the text's unchanged).
        n_visual: visual tokens at the front.
        source: ``int[G]`` the new patch-to-token map.
        protected: ``bool[n_visual]`` or ``None``: which of the new visual tokens stay protected.
    """

    hidden: np.ndarray
    positions: np.ndarray
    n_visual: int
    source: np.ndarray
    protected: np.ndarray | None = None


class TokenPolicy:
    """Chooses the visual tokens the decoder sees. The base class keeps every token.

    Three hooks, in the order a request meets them:

    1. :meth:`in_encoder` inside each encoder block, after its attention and before its MLP (ToMe's place);
       merged tokens carry a ``size`` > 1 and the encoder's later blocks use proportional attention (the log of
       the size added to the scores), as ToMe does.
    2. :meth:`after_encoder` on the encoder's output features, before the connector (PruMerge's place: LLaVA's
       projector then maps the merged features).
    3. :meth:`after_connector` on the connector's outputs (pooling, ...).
    4. :meth:`in_decoder` after each decoder layer of the prefill (FastV-style dropping at layer K).
    """

    name = "none"

    def in_encoder(self, layer: int, tokens: VisualTokens, keys: np.ndarray, prompt_ids: np.ndarray) -> VisualTokens:
        """Inside encoder block ``layer``, after the attention residual: return the (possibly merged) tokens.

        Args:
            tokens: the block's hidden state ``x[N, Cv]`` with sizes and the patch map.
            keys: ``float32[Hv, N, dv]`` the block's keys (ToMe's similarity metric).
            prompt_ids: ``int[P]`` the text prompt.
        """
        return tokens

    def needs_encoder_attention(self) -> bool:
        """Whether :meth:`after_encoder` / :meth:`after_connector` need the encoder's last attention weights."""
        return False

    def after_encoder(self, tokens: VisualTokens, prompt_ids: np.ndarray, encoder: EncoderView) -> VisualTokens:
        """Reduce the encoder's output before the connector.

        Args:
            tokens: ``x`` is ``float32[N, Cv]``, the encoder's features (after its final norm).
            prompt_ids: ``int[P]`` the text prompt.
            encoder: the encoder's last block (keys, attention on request, the same features).
        """
        return tokens

    def after_connector(self, tokens: VisualTokens, prompt_ids: np.ndarray, encoder: EncoderView) -> VisualTokens:
        """Reduce the visual tokens before the decoder.

        Args:
            tokens: ``x`` is ``float32[N, D]``, the connector's outputs.
            prompt_ids: ``int[P]`` the text prompt (for text-guided methods).
            encoder: the encoder's last block (keys, attention on request, features).
        """
        return tokens

    def needs_attention(self, layer: int) -> bool:
        """Whether :meth:`in_decoder` needs the attention weights of prefill layer ``layer``."""
        return False

    def in_decoder(self, layer: int, view: LayerView) -> np.ndarray | DecoderUpdate | None:
        """After prefill layer ``layer``: ``None`` to keep all tokens, the sorted indices (into the current
        sequence) of the tokens to keep, which must include every text token, or a :class:`DecoderUpdate`."""
        return None


class KVPolicy:
    """Stores, extends and reads a layer's key/value cache. The base class keeps everything in float32.

    The model calls, per decoder layer: :meth:`store` after the prefill; at each decode step :meth:`attend` (a
    policy that attends over its own layout, e.g. a quantized cache read without a full-precision copy) or, when
    that returns ``None``, :meth:`read` followed by ordinary attention; then :meth:`extend` with the new token.
    Position ids are handed over so that a policy that moves tokens (eviction with re-rotated keys) can keep
    track of them in its cache value.
    """

    name = "none"

    def store(
        self, layer: int, k: np.ndarray, v: np.ndarray, attn: np.ndarray | None, info: PromptInfo, *,
        positions: np.ndarray, n_visual: int,
    ) -> Any:  # fmt: skip
        """Cache after the prefill of ``layer``: ``k``, ``v`` are ``float32[Hkv, T, d]`` (keys already rotated).

        ``attn`` is the layer's prefill attention ``float32[H, T, T]`` when :meth:`needs_attention` is true;
        ``positions`` ``int64[T]`` are the tokens' position ids and the first ``n_visual`` of them are visual (a
        token policy may have dropped tokens before this layer, so both can differ from the request's).
        """
        return append(empty_cache(1, k.shape[0], k.shape[2], v.shape[2], dtype=k.dtype), k[None], v[None])

    def needs_attention(self, layer: int) -> bool:
        """Whether :meth:`store` / :meth:`extend` need the attention weights of ``layer``."""
        return False

    def extend(
        self, layer: int, cache: Any, k: np.ndarray, v: np.ndarray, attn: np.ndarray | None, *, position: int
    ) -> Any:
        """Cache after one decode step: ``k``, ``v`` are ``float32[Hkv, 1, d]`` of the new token (rotated at
        ``position``); ``attn`` is ``float32[H, 1, S + 1]`` (the step's attention over the ``S`` cached tokens as
        read, then itself), when needed."""
        return append(cache, k[None], v[None])

    def read(self, layer: int, cache: Any) -> tuple[np.ndarray, np.ndarray]:
        """Keys and values to attend over: ``float32[Hkv, S, d]`` each."""
        return cache.k[0], cache.v[0]

    def attend(
        self, layer: int, cache: Any, q: np.ndarray, k: np.ndarray, v: np.ndarray, *, want_weights: bool
    ) -> tuple[np.ndarray, np.ndarray | None] | None:
        """Fused decode attention over the cache, or ``None`` to let the model :meth:`read` and attend.

        Args:
            q: ``float32[H, 1, d]`` the new token's rotated queries; ``k``, ``v``: ``float32[Hkv, 1, d]`` its key and
                value (the cache does not hold them yet).
        Returns:
            ``(out float32[H, 1, dv], weights float32[H, 1, S + 1] or None)``: attention over the cached tokens and
            the new one (weights only when ``want_weights``).
        """
        return None

    def length(self, layer: int, cache: Any) -> int:
        """Tokens the cache attends over (``S``)."""
        return int(self.read(layer, cache)[0].shape[1])

    def nbytes(self, cache: Any) -> int:
        """Bytes the cache holds (for cost accounting)."""
        return int(cache.k.nbytes + cache.v.nbytes)

    def kept_tokens(self, layer: int, cache: Any) -> np.ndarray:
        """``int64[Hkv, S]``: for each key/value head, the index in the request's sequence (visual tokens, then
        the prompt, then the generated tokens, counted from 0 as the prefill saw them) of each cached token, for
        drawing what an eviction policy kept. The base class keeps every token in order."""
        n = self.length(layer, cache)
        return np.tile(np.arange(n, dtype=np.int64), (int(np.shape(self.read(layer, cache)[0])[0]), 1))


class ExitPolicy:
    """The depth plug: how many decoder layers a token runs, and how. The base class runs every layer.

    In a decode step, for each layer in order: :meth:`skip` may pass the token over the layer (its hidden state
    unchanged); after a layer it ran, :meth:`should_exit` may stop the step, and :meth:`exit_logits` gives the
    token's logits from the exit hidden state. A token that skips or exits leaves keys and values for the layers it
    did not run computed from the hidden state it had (CALM's state propagation), unless :attr:`fill_skipped` is
    false, in which case it leaves none there (Mixture-of-Depths: an unprocessed token is not a key of that layer).
    In the prefill, :meth:`route` may process only some tokens in a layer (the others pass through it and are not
    cached there), and :meth:`parallel` may run a layer as a parallel block (attention and FFN from one input).
    """

    name = "none"
    #: keys and values for skipped layers come from the token's hidden state (True) or are not stored (False)
    fill_skipped = True

    def should_exit(self, layer: int, hidden: np.ndarray, logits_fn: Callable[[np.ndarray], np.ndarray]) -> bool:
        """After decode layer ``layer`` (0-based): ``hidden`` is ``float32[D]`` of the new token; ``logits_fn``
        maps a hidden state to vocabulary logits through the final norm and LM head."""
        return False

    def exit_logits(self, layer: int, hidden: np.ndarray, logits_fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """The logits of a token that exits after ``layer`` (default: the final norm and LM head on its hidden
        state; a policy with trained exit heads returns theirs)."""
        return logits_fn(hidden)

    def skip(self, layer: int, hidden: np.ndarray) -> bool:
        """Whether a decode token with hidden state ``hidden`` ``float32[D]`` passes over ``layer``."""
        return False

    def route(self, layer: int, x: np.ndarray, positions: np.ndarray) -> np.ndarray | None:
        """In the prefill: the sorted indices ``int[K]`` of the tokens of ``x`` ``float32[T, D]`` that ``layer``
        processes, or ``None`` for all of them."""
        return None

    def parallel(self, layer: int) -> bool:
        """Whether ``layer`` runs as a parallel block: ``x + attention(norm1(x)) + FFN(norm2(x))``."""
        return False

    def plugs(self) -> "Plugs":
        """The plain model with this policy as its exit plug."""
        return Plugs(exit_policy=self)


class DecodingStrategy:
    """A decoding loop that replaces token-by-token decoding after the prefill (speculative decoding drafts several
    tokens and verifies them in one forward). Set one as ``Plugs.decoding``; :func:`mllm_ref.tinyvlm.model.generate`
    then hands it the prefill's state and logits and it returns the new tokens.
    """

    name = "none"

    def run(
        self, model: Any, state: Any, logits: np.ndarray, *, prompt_ids: np.ndarray, max_new_tokens: int,
        plugs: "Plugs", rng: np.random.Generator | None, trace: Any,
    ) -> list[int]:  # fmt: skip
        """Decode from the prefill's ``state`` (:class:`mllm_ref.tinyvlm.model.State`) and last ``logits``
        ``[V]`` until ``<eos>`` or ``max_new_tokens``; returns the tokens without ``<eos>``. ``prompt_ids`` is the
        whole prompt (a drafter prefills it too); ``trace`` (:class:`mllm_ref.tinyvlm.model.Trace`) gets the decode
        steps, target calls, drafted and accepted tokens."""
        raise NotImplementedError

    def __call__(self, logits: np.ndarray, rng: np.random.Generator | None = None) -> int:
        raise TypeError(f"{type(self).__name__} runs the whole decoding loop; use mllm_ref.tinyvlm.model.generate")

    def plugs(self) -> "Plugs":
        """The plain model with this strategy as its decoding plug."""
        return Plugs(decoding=self)


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
    #: a per-token rule ``decoding(logits, rng) -> token``, or a :class:`DecodingStrategy` that runs the loop
    decoding: Callable[[np.ndarray, np.random.Generator | None], int] | DecodingStrategy = greedy


NONE = Plugs()
