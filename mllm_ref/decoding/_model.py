"""What the decoding strategies need of the tiny VLM: a plain float32 cache they can cut back, multi-token and
tree-shaped forwards through any range of layers. Not a technique; the strategies of this package build on it.

A :class:`Stack` holds, for each decoder layer, the cached keys and values ``float32[Hkv, S, d]`` (keys rotated).
:func:`run_layers` feeds ``T`` new tokens through some layers in one call, attending over the cache and, among
themselves, causally or under a tree mask; :meth:`Stack.truncate` and :meth:`Stack.keep` cut the cache back to an
accepted prefix (speculative decoding's rollback) or to an accepted tree path (tree verification's compaction).
Every layer is :func:`mllm_ref.tinyvlm.model._decoder_layer`, so a strategy computes what the model computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mllm_ref.tinyvlm import model as vlm
from mllm_ref.tinyvlm.plugs import NONE, KVPolicy, Plugs


@dataclass(frozen=True)
class Stack:
    """Per-layer caches: ``k[i]``, ``v[i]`` are ``float32[Hkv, S, d]``; every layer holds the same ``S`` tokens
    except while a self-speculative draft runs ahead in the first layers."""

    k: tuple[np.ndarray, ...]
    v: tuple[np.ndarray, ...]

    def length(self, layer: int = 0) -> int:
        return int(self.k[layer].shape[1])

    def truncate(self, n: int) -> "Stack":
        """The first ``n`` cached tokens of every layer (the cache of the accepted prefix)."""
        return Stack(tuple(k[:, :n] for k in self.k), tuple(v[:, :n] for v in self.v))

    def keep(self, index: np.ndarray) -> "Stack":
        """The cached tokens ``index`` (``int[M]``, in order) of every layer: a tree's accepted path compacted."""
        return Stack(tuple(k[:, index] for k in self.k), tuple(v[:, index] for v in self.v))

    def nbytes(self) -> int:
        return int(sum(k.nbytes + v.nbytes for k, v in zip(self.k, self.v)))


def stack_from_state(state: vlm.State, plugs: Plugs) -> Stack:
    """The target's caches after :func:`mllm_ref.tinyvlm.model.prefill` as a :class:`Stack`.

    Speculative decoding rolls its cache back after a rejection, so it keeps a plain float32 cache: the KV policy
    must be the default one."""
    if type(plugs.kv_policy) is not KVPolicy:
        raise ValueError(f"a speculative decoding strategy keeps its own float32 cache; plugs.kv_policy must be the "
                         f"default KVPolicy, got {type(plugs.kv_policy).__name__}")  # fmt: skip
    ks, vs = zip(*(plugs.kv_policy.read(i, c) for i, c in enumerate(state.caches)))
    return Stack(tuple(ks), tuple(vs))


def empty_stack(model: vlm.TinyVLM) -> Stack:
    cfg = model.config
    k = np.zeros((cfg.kv_heads, 0, cfg.head_dim), dtype=np.float32)
    return Stack((k,) * cfg.layers, (k,) * cfg.layers)


def tree_attention(allowed: np.ndarray):
    """A callable for :func:`mllm_ref.tinyvlm.model._decoder_layer` that attends ``T`` new tokens over the cache
    (all of it) and over each other where ``allowed`` (``bool[T, T]``, query row, key column) is true."""

    def attend(past_k, past_v):
        def fn(q, k, v, want_weights):
            h, t, d = q.shape
            k_all = np.concatenate([past_k, k], axis=1)
            v_all = np.concatenate([past_v, v], axis=1)
            rep = h // k_all.shape[0]
            kk = np.repeat(k_all, rep, axis=0)
            vv = np.repeat(v_all, rep, axis=0)
            scores = (q @ kk.transpose(0, 2, 1)) * np.float32(1.0 / np.sqrt(d))
            mask = np.concatenate([np.ones((t, past_k.shape[1]), dtype=bool), allowed], axis=1)
            # a stable softmax over the allowed keys (every row allows at least its own node)
            m = np.max(np.where(mask[None], scores, np.finfo(np.float32).min), axis=-1, keepdims=True)
            e = np.where(mask[None], np.exp(np.minimum(scores - m, 0.0)), 0.0)
            w = (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
            return (w @ vv).astype(np.float32), (w if want_weights else None)

        return fn

    return attend


def run_layers(
    model: vlm.TinyVLM,
    stack: Stack,
    x: np.ndarray,
    positions: np.ndarray,
    layers: range | None = None,
    *,
    allowed: np.ndarray | None = None,
    plugs: Plugs = NONE,
) -> tuple[np.ndarray, Stack]:
    """Feed the hidden states ``x`` ``float32[T, D]`` (at ``positions`` ``int64[T]``) through ``layers`` (default:
    all), attending over each layer's cache; the new tokens' keys and values are appended to it.

    ``allowed``: ``bool[T, T]`` tree mask among the new tokens (default: causal). Returns the hidden states after
    the last layer run and the new stack.
    """
    layers = range(model.config.layers) if layers is None else layers
    ks, vs = list(stack.k), list(stack.v)
    attend = None if allowed is None else tree_attention(allowed)
    for i in layers:
        past = (ks[i], vs[i]) if attend is None else attend(ks[i], vs[i])
        x, k, v, _ = vlm._decoder_layer(model, plugs, i, x, positions, past, causal=True, want_weights=False)
        ks[i] = np.concatenate([ks[i], k], axis=1)
        vs[i] = np.concatenate([vs[i], v], axis=1)
    return x, Stack(tuple(ks), tuple(vs))


def embed(model: vlm.TinyVLM, tokens) -> np.ndarray:
    """Word embeddings ``float32[T, D]`` of ``tokens``."""
    return model["embed.weight"][np.asarray(tokens, dtype=np.int64)]


def feed(model: vlm.TinyVLM, stack: Stack, tokens, start: int, plugs: Plugs = NONE) -> tuple[np.ndarray, Stack]:
    """Feed ``tokens`` at positions ``start, start + 1, ...`` through every layer; returns the logits
    ``float32[T, V]`` of each and the new stack."""
    tokens = np.asarray(tokens, dtype=np.int64)
    positions = start + np.arange(tokens.size, dtype=np.int64)
    h, stack = run_layers(model, stack, embed(model, tokens), positions, plugs=plugs)
    return vlm.logits_from_hidden(model, h, plugs), stack


def finish(out: list[int], max_new_tokens: int, trace, layers: int, stack: Stack) -> list[int]:
    """The tokens a strategy returns: at most ``max_new_tokens``, cut before ``<eos>``; records one decode step of
    ``layers`` layers per token and the cache's bytes in ``trace``."""
    from mllm_ref.tinyvlm import tokenizer

    out = [int(t) for t in out[:max_new_tokens]]
    if tokenizer.EOS in out:
        out = out[: out.index(tokenizer.EOS)]
    trace.decode_layers.extend([layers] * len(out))
    trace.decode_context.extend([0] * len(out))
    trace.kv_bytes = stack.nbytes()
    return out
