"""Speculative sampling: a cheap drafter proposes k tokens, the target verifies them in one forward, exactly.

Papers: Y. Leviathan, M. Kalman, Y. Matias, Fast Inference from Transformers via Speculative Decoding, ICML 2023
(arXiv 2211.17192); C. Chen, S. Borgeaud, G. Irving, J.-B. Lespiau, L. Sifre, J. Jumper, Accelerating Large
Language Model Decoding with Speculative Sampling, 2023 (arXiv 2302.01318). Survey: speculative decoding.

One step, with ``p_j`` the target's and ``q_j`` the drafter's next-token distributions after the prefix and the
first ``j`` draft tokens (both after the same temperature / top-k / top-p, :mod:`mllm_ref.decoding.sampling`)::

    draft   x_1 ~ q_0, x_2 ~ q_1, ..., x_k ~ q_{k-1}                 (k cheap drafter steps)
    verify  p_0, ..., p_k from ONE target forward over [last token, x_1, ..., x_k]
    for j = 1..k:   accept x_j with probability min(1, p_{j-1}(x_j) / q_{j-1}(x_j))
                    on the first rejection emit y ~ norm(max(0, p_{j-1} - q_{j-1})) and stop
    if all k are accepted, emit the bonus token y ~ p_k

The emitted token has exactly the target's distribution: for any token ``x``,
``q(x) min(1, p(x)/q(x)) + (1 - sum_y min(p(y), q(y))) * max(0, p(x) - q(x)) / sum_y max(0, p(y) - q(y))
= min(p(x), q(x)) + max(0, p(x) - q(x)) = p(x)`` (the tests check it by enumeration and by sampling).

:func:`speculative_step` is the reference: given the distributions, the draft and the uniforms it draws with, it
returns the emitted tokens (deterministic, so any implementation given the same uniforms must agree bit for bit).
:func:`speculative_generate` runs the loop on any token-level models given as functions; :class:`SpeculativeDecoding`
runs it on the tiny VLM with a drafter (:mod:`mllm_ref.decoding.multimodal`): the target's KV cache is cut back to
the accepted prefix after each step, the drafter's to what it has seen of it.

Shapes: k draft tokens, V vocabulary.

Deviations from the papers: none in the step. Uniforms are drawn as ``rng.random(k)`` for the acceptances and one
more for the emitted token (inverse CDF, :func:`mllm_ref.decoding.sampling.sample_from`). A draft token with zero
draft probability cannot have been drafted and is rejected as bad input. The draft stops early at ``<eos>``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from mllm_ref import _checks
from mllm_ref.decoding._model import feed, finish, stack_from_state
from mllm_ref.decoding.sampling import Sampler, sample_from
from mllm_ref.oracle.registry import Technique, register
from mllm_ref.tinyvlm import tokenizer
from mllm_ref.tinyvlm.plugs import DecodingStrategy


def _dist(x, name: str) -> np.ndarray:
    x = _checks.float_array(x, name, min_ndim=1)
    if np.any(x < 0):
        raise ValueError(f"{name} must hold probabilities (non-negative)")
    s = x.sum(axis=-1)
    if np.any(np.abs(s - 1.0) > 1e-3):
        raise ValueError(f"{name} must sum to 1 along its last axis, got sums {np.round(s, 4).tolist()}")
    return x.astype(np.float64)


def acceptance_probability(p: np.ndarray, q: np.ndarray, token: int) -> float:
    """``min(1, p[token] / q[token])``: the chance a drafted ``token`` is kept (``p``, ``q``: ``float[V]``)."""
    p, q = _dist(p, "p"), _dist(q, "q")
    token = _checks.integer(token, "token", low=0, high=p.shape[-1] - 1)
    if q[token] <= 0:
        raise ValueError(f"token {token} has zero draft probability, so the drafter cannot have proposed it")
    return float(min(1.0, p[token] / q[token]))


def residual_distribution(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``norm(max(0, p - q))``: what a rejected position is resampled from (``float64[V]``). When ``p <= q``
    everywhere (``p = q``), rejection has probability 0 and ``p`` is returned."""
    p, q = _dist(p, "p"), _dist(q, "q")
    r = np.maximum(p - q, 0.0)
    s = r.sum()
    return p.copy() if s <= 0 else r / s


def speculative_step(p: np.ndarray, q: np.ndarray, draft: np.ndarray, u: np.ndarray, u_sample: float) -> np.ndarray:
    """One verification step of speculative sampling.

    Args:
        p: ``float[k + 1, V]`` target distributions after the prefix and after each draft token.
        q: ``float[k, V]`` draft distributions the draft tokens were drawn from.
        draft: ``int[k]`` the draft tokens.
        u: ``float[k]`` uniforms in [0, 1): ``draft[j]`` is accepted when ``u[j] < min(1, p[j, x] / q[j, x])``.
        u_sample: a uniform in [0, 1) for the emitted token (residual or bonus), by inverse CDF.
    Returns:
        ``int64[n + 1]``: the ``n`` accepted draft tokens, then the resampled or bonus token.
    """
    _checks.same_dtype("p", _checks.float_array(p, "p", ndim=2), "q", _checks.float_array(q, "q", ndim=2))
    p, q = _dist(p, "p"), _dist(q, "q")
    if p.ndim != 2 or q.ndim != 2:
        raise ValueError(f"p must be [k + 1, V] and q [k, V], got {p.shape} and {q.shape}")
    k = q.shape[0]
    _checks.dim("p", p, 0, k + 1, "one more row than q")
    _checks.dim("q", q, 1, p.shape[1], "the vocabulary of p")
    draft = _checks.int_array(draft, "draft", ndim=1, low=0, high=p.shape[1] - 1)
    _checks.dim("draft", draft, 0, k, "one token per row of q")
    u = _checks.float_array(u, "u", ndim=1, allow_empty=True)
    _checks.dim("u", u, 0, k, "one uniform per draft token")
    if np.any(u < 0) or np.any(u >= 1):
        raise ValueError("u must hold uniforms in [0, 1)")
    u_sample = _checks.real(u_sample, "u_sample", low=0.0, high=1.0, high_open=True)
    out = []
    for j in range(k):
        x = int(draft[j])
        if u[j] < acceptance_probability(p[j], q[j], x):
            out.append(x)
            continue
        out.append(sample_from(residual_distribution(p[j], q[j]), u_sample))
        return np.asarray(out, dtype=np.int64)
    out.append(sample_from(p[k], u_sample))
    return np.asarray(out, dtype=np.int64)


def speculative_generate(
    target: Callable[[Sequence[int]], np.ndarray],
    draft: Callable[[Sequence[int]], np.ndarray],
    prefix: Sequence[int],
    *,
    k: int,
    max_new_tokens: int,
    rng: np.random.Generator,
    eos: int | None = None,
) -> tuple[list[int], dict]:
    """Speculative sampling with token-level models given as functions ``model(tokens) -> probs[V]`` (the next token's
    distribution after ``tokens``). The draft stops early at ``eos``. Returns the new tokens (at most
    ``max_new_tokens``, up to and including ``eos``) and counts ``{"target_calls", "drafted", "accepted"}``; a
    target call is the ``k + 1`` distributions one forward would give."""
    k = _checks.integer(k, "k", low=1)
    max_new_tokens = _checks.integer(max_new_tokens, "max_new_tokens", low=1)
    _checks.generator(rng)
    seq = list(prefix)
    out: list[int] = []
    stats = {"target_calls": 0, "drafted": 0, "accepted": 0}
    while len(out) < max_new_tokens:
        kk = min(k, max_new_tokens - len(out))
        xs, qs = [], []
        for _ in range(kk):
            q = np.asarray(draft(seq + xs), dtype=np.float64)
            xs.append(sample_from(q, float(rng.random())))
            qs.append(q)
            if xs[-1] == eos:  # nothing follows <eos>: draft no further
                break
        p = np.stack([np.asarray(target(seq + xs[:j]), dtype=np.float64) for j in range(len(xs) + 1)])
        emitted = speculative_step(p, np.stack(qs), np.asarray(xs), rng.random(len(xs)), float(rng.random()))
        stats["target_calls"] += 1
        stats["drafted"] += len(xs)
        stats["accepted"] += len(emitted) - 1
        for t in emitted.tolist():
            out.append(t)
            seq.append(t)
            if t == eos or len(out) == max_new_tokens:
                return out, stats
    return out, stats


# ------------------------------------------------------------------------------------------------ the tiny VLM
@dataclass(frozen=True)
class SpeculativeDecoding(DecodingStrategy):
    """Speculative decoding of the tiny VLM with a drafter (:class:`mllm_ref.decoding.multimodal.Drafter`).

    ``sampler``: the sampling both models' logits go through; temperature 0 (the default) is greedy speculative
    decoding (:func:`mllm_ref.decoding.speculative_greedy.greedy_verify`: the output equals plain greedy decoding),
    otherwise speculative sampling (:func:`speculative_step`, with ``rng`` required).
    """

    drafter: object
    k: int = 4
    sampler: Sampler = Sampler(temperature=0.0)
    #: used when ``generate`` is given no generator (the tour and ``evaluate`` give none): each request then draws
    #: from ``numpy.random.default_rng(seed)``
    seed: int | None = None

    name = "speculative"

    def __post_init__(self):
        _checks.integer(self.k, "k", low=1)
        if not isinstance(self.sampler, Sampler):
            raise TypeError(f"sampler must be a Sampler, got {type(self.sampler).__name__}")


    def run(self, model, state, logits, *, prompt_ids, max_new_tokens, plugs, rng, trace) -> list[int]:
        from mllm_ref.decoding.speculative_greedy import greedy_verify

        greedy = self.sampler.temperature == 0.0
        if not greedy and rng is None:
            if self.seed is None:
                raise ValueError("rng must be a numpy.random.Generator for speculative sampling (temperature > 0), "
                                 "or the strategy must have a seed")  # fmt: skip
            rng = np.random.default_rng(self.seed)
        layers = model.config.layers

        def pick(probs):
            return int(np.argmax(probs)) if greedy else sample_from(probs, float(rng.random()))

        stack = stack_from_state(state, plugs)
        pos = int(state.next_position)  # the position of `last`, which no cache holds yet
        last = pick(self.sampler.probs(logits))
        out = [last]
        if last == tokenizer.EOS:
            return []
        t0 = time.perf_counter()
        dstack = self.drafter.prefill(state.info, prompt_ids)
        trace.timeline.append(("draft", t0, time.perf_counter(), 0))
        pending = [last]  # emitted tokens the drafter has not seen, ending with `last`
        while len(out) < max_new_tokens:
            kk = min(self.k, max_new_tokens - len(out))
            t0 = time.perf_counter()
            d0 = dstack.length()
            drafted, qs = [], []
            feed_tokens, start = pending, pos - len(pending) + 1
            for _ in range(kk):
                dl, dstack = self.drafter.feed(dstack, feed_tokens, start)
                if greedy:  # the arg-max of the logits is the greedy sampler's choice; no distribution needed
                    y = int(np.argmax(dl[-1]))
                else:
                    q = self.sampler.probs(dl[-1])
                    y = pick(q)
                    qs.append(q)
                drafted.append(y)
                start += len(feed_tokens)
                feed_tokens = [y]
                if y == tokenizer.EOS:
                    break
            t1 = time.perf_counter()
            s0 = stack.length()
            tl, stack = feed(model, stack, [last] + drafted, pos, plugs)
            if greedy:
                emitted = greedy_verify(tl, np.asarray(drafted, dtype=np.int64))
            else:
                u = rng.random(len(drafted))
                emitted = speculative_step(self.sampler.probs(tl), np.stack(qs), np.asarray(drafted), u,
                                           float(rng.random()))  # fmt: skip
            n = len(emitted) - 1
            trace.target_calls += 1
            trace.drafted += len(drafted)
            trace.accepted += n
            stack = stack.truncate(s0 + n + 1)  # the cache of the accepted prefix: last, x_1..x_n
            trace.timeline += [("draft", t0, t1, len(drafted)), ("verify", t1, time.perf_counter(), n + 1)]
            dstack = dstack.truncate(d0 + len(pending) + min(n, len(drafted) - 1))
            pending = ([drafted[-1]] if n == len(drafted) else []) + [int(emitted[-1])]
            pos += n + 1
            last = int(emitted[-1])
            out.extend(int(t) for t in emitted)
            if tokenizer.EOS in emitted:
                break
        return finish(out, max_new_tokens, trace, layers, stack)


# ----------------------------------------------------------------------------------------------- registration
_SIZES = {"tiny": (1, 3), "small": (4, 42), "p_equals_q": (3, 6), "draft8": (8, 1000), "llama": (8, 32000)}


def _probs(rng, n, v, zeros: bool):
    p = rng.dirichlet(np.full(v, 0.5), size=n)
    if zeros and v > 2:
        p[:, rng.choice(v, size=v // 3, replace=False)] = 0.0
        p /= p.sum(axis=1, keepdims=True)
    return p


def _case(size: str, rng: np.random.Generator) -> dict:
    k, v = _SIZES[size]
    p = _probs(rng, k + 1, v, zeros=False)
    q = p[:k].copy() if size == "p_equals_q" else _probs(rng, k, v, zeros=size != "tiny")  # p = q: all accepted
    draft = np.array([rng.choice(v, p=q[j]) for j in range(k)], dtype=np.int64)
    return {"p": p, "q": q, "draft": draft, "u": rng.random(k), "u_sample": float(rng.random())}


def _strategy():
    from hypothesis import strategies as st

    @st.composite
    def cases(draw):
        k, v = draw(st.integers(1, 5)), draw(st.integers(1, 8))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        p = _probs(rng, k + 1, v, zeros=draw(st.booleans()))
        q = p[:k].copy() if draw(st.booleans()) else _probs(rng, k, v, zeros=draw(st.booleans()))
        draft = np.array([rng.choice(v, p=q[j]) for j in range(k)], dtype=np.int64)
        return {"p": p, "q": q, "draft": draft, "u": rng.random(k), "u_sample": float(rng.random())}

    return cases()


def _rows(model):
    from mllm_ref.decoding.multimodal import load_drafter

    drafter = load_drafter(True)
    return [("sampling T=1, 2-layer drafter with the image, k=4",
             SpeculativeDecoding(drafter, k=4, sampler=Sampler(temperature=1.0), seed=0).plugs())]  # fmt: skip


register(
    Technique(
        id="decoding.speculative",
        reference=speculative_step,
        make_case=_case,
        paper=(
            "Y. Leviathan, M. Kalman, Y. Matias, Fast Inference from Transformers via Speculative Decoding, ICML 2023 "
            "(arXiv 2211.17192); C. Chen, S. Borgeaud, G. Irving, J.-B. Lespiau, L. Sifre, J. Jumper, Accelerating "
            "Large Language Model Decoding with Speculative Sampling, 2023 (arXiv 2302.01318)"
        ),
        test_sizes=("tiny", "small", "p_equals_q", "draft8"),
        bench_sizes=("llama",),
        compare="exact",
        float_args=("p", "q"),  # the uniforms may come in any float precision
        strategy=_strategy,
        chapter="book/05-speculative-decoding.md",
        exercise="exercises/06-speculative",
        model_level=True,
        notes="accept min(1, p/q), resample norm(max(0, p - q)), bonus token; uniforms given, inverse-CDF draws",
        extra={"rows": _rows},
    )
)
