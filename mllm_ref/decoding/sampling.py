"""Sampling: greedy, temperature, top-k and top-p (nucleus), the baseline every decoding strategy is judged by.

Papers: top-k sampling: A. Fan, M. Lewis, Y. Dauphin, Hierarchical Neural Story Generation, ACL 2018
(arXiv 1805.04833); top-p: A. Holtzman, J. Buys, L. Du, M. Forbes, Y. Choi, The Curious Case of Neural Text
Degeneration, ICLR 2020 (arXiv 1904.09751). Survey: the decoding section of the efficient-MLLM surveys (the
sampling that speculative decoding must reproduce exactly).

The next-token distribution, in the order the common runtimes apply the knobs (temperature, then top-k, then
top-p)::

    temperature = 0:   probs = one_hot(argmax(logits))                  (greedy; ties to the lowest id)
    otherwise:         z = logits / temperature
                       p = softmax(z)
                       top-k:  p_i = 0 unless i is among the k largest z (ties to the lower id); renormalise
                       top-p:  keep the smallest prefix of tokens sorted by p (descending, ties to the lower id)
                               whose mass reaches top_p; p = p * keep / sum(p * keep)

Drawing a token from ``probs`` with one uniform ``u`` in [0, 1) (inverse CDF, so two implementations given the
same ``u`` draw the same token)::

    token = min { i : cumsum(probs)_i > u * sum(probs) }

Shapes: ``logits`` ``[V]`` or ``[N, V]`` (N independent rows); the output has the same shape and dtype.

Deviations from the papers: none. ``top_k = 0`` and ``top_p = 1`` turn the filters off, as in the common runtimes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from mllm_ref import _checks
from mllm_ref.nn.softmax import softmax
from mllm_ref.oracle.registry import Technique, register
from mllm_ref.tinyvlm import tokenizer
from mllm_ref.tinyvlm.plugs import DecodingStrategy


def _settings(temperature, top_k, top_p) -> tuple[float, int, float]:
    temperature = _checks.real(temperature, "temperature", low=0.0)
    if 0.0 < temperature < 1e-3:
        raise ValueError(f"temperature must be 0 (greedy) or at least 1e-3, got {temperature}")
    top_k = _checks.integer(top_k, "top_k", low=0)
    top_p = _checks.real(top_p, "top_p", low=0.0, high=1.0, low_open=True)
    return temperature, top_k, top_p


def sampling_probs(logits: np.ndarray, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """The next-token distribution after temperature, top-k and top-p (see the module docstring).

    Args:
        logits: ``float[V]`` or ``float[N, V]``.
        temperature: 0 for greedy (a one-hot distribution), else the softmax temperature.
        top_k: keep the ``top_k`` most likely tokens (0: all).
        top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p`` (1: all).
    Returns:
        probabilities of the shape and dtype of ``logits`` (computed in float64); each row sums to 1.
    """
    logits = _checks.float_array(logits, "logits", ndim=(1, 2))
    if logits.shape[-1] == 0:
        raise ValueError("logits must have at least one entry on the last axis (the vocabulary)")
    temperature, top_k, top_p = _settings(temperature, top_k, top_p)
    z = logits.astype(np.float64).reshape(-1, logits.shape[-1])
    v = z.shape[1]
    rows = np.arange(z.shape[0])[:, None]
    # a stable descending order: ties go to the lower id
    order = np.argsort(-z, axis=1, kind="stable")
    if temperature == 0.0:
        out = np.zeros_like(z)
        out[np.arange(z.shape[0]), order[:, 0]] = 1.0
        return out.reshape(logits.shape).astype(logits.dtype)
    z = z / temperature
    p = softmax(z, axis=1)
    if 0 < top_k < v:  # softmax over the top k = the softmax zeroed outside them and renormalised
        p[rows, order[:, top_k:]] = 0.0
        p = p / p.sum(axis=1, keepdims=True)
    if top_p < 1.0:
        sorted_p = np.take_along_axis(p, order, axis=1)
        before = np.cumsum(sorted_p, axis=1) - sorted_p  # mass of the tokens ranked above each one
        keep_sorted = before < top_p  # the first token is always kept
        keep = np.zeros_like(keep_sorted)
        keep[rows, order] = keep_sorted
        p = np.where(keep, p, 0.0)
        p = p / p.sum(axis=1, keepdims=True)
    return p.reshape(logits.shape).astype(logits.dtype)


def sample_from(probs: np.ndarray, u: float) -> int:
    """The token the uniform ``u`` in [0, 1) draws from ``probs`` ``[V]`` by inverse CDF (module docstring)."""
    probs = _checks.float_array(probs, "probs", ndim=1)
    if probs.size == 0 or np.any(probs < 0) or probs.sum() <= 0:
        raise ValueError("probs must be non-negative with a positive sum")
    u = _checks.real(u, "u", low=0.0, high=1.0, high_open=True)
    c = np.cumsum(probs.astype(np.float64))
    i = int(np.searchsorted(c, u * c[-1], side="right"))
    return min(i, int(np.flatnonzero(probs > 0)[-1]))  # rounding can put u * total past the last positive entry


@dataclass(frozen=True)
class Sampler:
    """A ``decoding`` plug (:class:`mllm_ref.tinyvlm.plugs.Plugs`): ``sampler(logits, rng) -> token``.

    ``temperature = 0`` is greedy and needs no generator; otherwise ``rng`` (a ``numpy.random.Generator``) gives
    the uniform of :func:`sample_from`.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        _settings(self.temperature, self.top_k, self.top_p)

    def probs(self, logits: np.ndarray) -> np.ndarray:
        return sampling_probs(logits, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)

    def __call__(self, logits: np.ndarray, rng: np.random.Generator | None = None) -> int:
        p = self.probs(logits)
        if self.temperature == 0.0:
            return int(np.argmax(p))
        if rng is None:
            raise ValueError("rng must be a numpy.random.Generator when temperature > 0")
        return sample_from(p, float(_checks.generator(rng).random()))


@dataclass(frozen=True)
class PlainDecoding(DecodingStrategy):
    """Token-by-token decoding through the same float32 cache code the speculative strategies use
    (:mod:`mllm_ref.decoding._model`): one target forward per token, no draft. Its output equals
    :func:`mllm_ref.tinyvlm.model.generate`'s; timing it next to the speculative strategies separates what
    speculation gains from what their leaner cache path gains (``mllm-ref speculate``)."""

    sampler: Sampler = Sampler(temperature=0.0)

    name = "plain"


    def run(self, model, state, logits, *, prompt_ids, max_new_tokens, plugs, rng, trace) -> list[int]:
        from mllm_ref.decoding._model import feed, stack_from_state

        stack = stack_from_state(state, plugs)
        pos = int(state.next_position)
        out: list[int] = []
        for step in range(max_new_tokens):
            token = self.sampler(logits, rng)
            if token == tokenizer.EOS:
                break
            out.append(token)
            if step + 1 < max_new_tokens:
                t0 = time.perf_counter()
                lg, stack = feed(model, stack, [token], pos, plugs)
                trace.timeline.append(("decode", t0, time.perf_counter(), 1))
                logits, pos = lg[0], pos + 1
        trace.decode_layers.extend([model.config.layers] * len(out))
        trace.decode_context.extend([0] * len(out))
        trace.kv_bytes = stack.nbytes()
        return out


# ----------------------------------------------------------------------------------------------- registration
_SIZES = {"tiny": (1, 5), "small": (4, 42), "vocab": (8, 1000), "llama": (64, 32000)}


def _case(size: str, rng: np.random.Generator) -> dict:
    n, v = _SIZES[size]
    logits = (rng.standard_normal((n, v)) * 3).astype(np.float32)
    if n == 1:
        logits = logits[0]
    return {"logits": logits, "temperature": 0.8, "top_k": min(20, v - 1) if v > 5 else 3, "top_p": 0.9}


def _strategy():
    from hypothesis import strategies as st

    @st.composite
    def cases(draw):
        n, v = draw(st.integers(1, 4)), draw(st.integers(1, 30))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        scale = draw(st.sampled_from([0.1, 1.0, 10.0, 1e3]))
        logits = (rng.standard_normal((n, v)) * scale).astype(np.float64)
        if draw(st.booleans()):  # ties
            logits = np.round(logits)
        return {
            "logits": logits,
            "temperature": draw(st.sampled_from([0.0, 0.5, 1.0, 2.0])),
            "top_k": draw(st.integers(0, v + 1)),
            "top_p": draw(st.sampled_from([0.1, 0.5, 0.9, 1.0])),
        }

    return cases()


register(
    Technique(
        id="decoding.sampling",
        reference=sampling_probs,
        make_case=_case,
        paper=(
            "A. Holtzman, J. Buys, L. Du, M. Forbes, Y. Choi, The Curious Case of Neural Text Degeneration, ICLR 2020 "
            "(arXiv 1904.09751); A. Fan, M. Lewis, Y. Dauphin, Hierarchical Neural Story Generation, ACL 2018 "
            "(arXiv 1805.04833)"
        ),
        test_sizes=("tiny", "small", "vocab"),
        bench_sizes=("llama",),
        strategy=_strategy,
        chapter="book/05-speculative-decoding.md",
        notes="temperature, then top-k, then top-p, as the common runtimes; temperature 0 is greedy; ties to the lower id",
    )
)
