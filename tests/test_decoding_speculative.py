"""Speculative sampling is exact: the accept/reject step by enumeration, the whole loop by enumeration and by a
chi-square test, and the tiny VLM's loop draws what the generic loop draws. Sampling's filters and draws."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mllm_ref.decoding.sampling import Sampler, sample_from, sampling_probs
from mllm_ref.decoding.speculative import (
    acceptance_probability,
    residual_distribution,
    speculative_generate,
    speculative_step,
)


# ------------------------------------------------------------------------------------------------- distributions
@st.composite
def distributions(draw, v=None):
    """A probability vector over ``v`` tokens, sometimes with zeros, sometimes one-hot."""
    v = draw(st.integers(1, 6)) if v is None else v
    kind = draw(st.sampled_from(["dirichlet", "zeros", "onehot", "uniform"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "onehot":
        p = np.zeros(v)
        p[rng.integers(v)] = 1.0
        return p
    if kind == "uniform":
        return np.full(v, 1.0 / v)
    p = rng.dirichlet(np.full(v, 0.7))
    if kind == "zeros" and v > 1:
        p[rng.choice(v, size=int(rng.integers(1, v)), replace=False)] = 0.0
        if p.sum() == 0:
            p[0] = 1.0
        p /= p.sum()
    return p


@st.composite
def pairs(draw):
    v = draw(st.integers(1, 6))
    p = draw(distributions(v))
    q = p.copy() if draw(st.booleans()) else draw(distributions(v))
    return p, q


def one_step_distribution(p, q):
    """The distribution of the token one speculative step emits first, by enumeration over the draft token (k = 1):
    the draft ``x ~ q`` is kept with the acceptance probability, else the residual is drawn."""
    out = np.zeros_like(p)
    for x in np.flatnonzero(q > 0):
        a = acceptance_probability(p, q, int(x))
        out[x] += q[x] * a
        out += q[x] * (1 - a) * residual_distribution(p, q)
    return out


@given(pairs())
def test_one_step_emits_exactly_the_target_distribution(pq):
    p, q = pq
    np.testing.assert_allclose(one_step_distribution(p, q), p, atol=1e-12)


def test_q_with_zeros_where_p_is_not_is_still_exact():
    p = np.array([0.5, 0.3, 0.2])
    q = np.array([1.0, 0.0, 0.0])  # the drafter never proposes tokens 1 and 2
    np.testing.assert_allclose(one_step_distribution(p, q), p, atol=1e-15)
    np.testing.assert_allclose(residual_distribution(p, q), [0.0, 0.6, 0.4])


@given(pairs(), st.integers(0, 5), st.floats(0, 1, exclude_max=True))
def test_the_step_accepts_exactly_when_u_is_below_the_acceptance_probability(pq, x, u_sample):
    p, q = pq
    support = np.flatnonzero(q > 0)
    x = int(support[x % support.size])
    a = acceptance_probability(p, q, x)
    below = np.nextafter(a, 0.0) if a > 0 else None
    p2 = np.stack([p, p])
    if below is not None:
        assert speculative_step(p2, q[None], np.array([x]), np.array([below]), u_sample)[0] == x
    if a < 1:
        out = speculative_step(p2, q[None], np.array([x]), np.array([a]), u_sample)
        assert out.size == 1 and out[0] == sample_from(residual_distribution(p, q), u_sample)
    else:  # accepted whatever u: then the bonus token comes from the next row
        out = speculative_step(p2, q[None], np.array([x]), np.array([np.nextafter(1.0, 0.0)]), u_sample)
        assert out.tolist() == [x, sample_from(p, u_sample)]


def test_p_equal_q_accepts_everything():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(5), size=4)
    draft = np.array([rng.choice(5, p=p[j]) for j in range(3)])
    out = speculative_step(p, p[:3], draft, rng.random(3) * 0.999, 0.3)
    assert out[:3].tolist() == draft.tolist() and out.size == 4


# ----------------------------------------------------------------------- the whole loop, exactly by enumeration
def toy_model(seed: int, v: int, zeros: bool = False):
    """A token-level model over ``v`` tokens: the next-token distribution is a fixed random function of the
    whole prefix (seeded by it), so it depends on context as a real model's does."""

    def probs(tokens):
        rng = np.random.default_rng([seed, len(tokens), *[int(t) for t in tokens]])
        p = rng.dirichlet(np.full(v, 0.8))
        if zeros:
            p[int(rng.integers(v))] = 0.0
            p /= p.sum()
        return p

    return probs


def loop_distribution(target, draft, prefix, k, length, v):
    """Exact distribution over the first ``length`` tokens :func:`speculative_generate` emits (same draft length
    rule: ``min(k, tokens still to emit)``), enumerating draft tokens, acceptances and residual draws."""
    dist: dict[tuple, float] = {}

    def walk(seq, emitted, prob):
        if prob == 0:
            return
        if len(emitted) >= length:
            key = tuple(emitted[:length])
            dist[key] = dist.get(key, 0.0) + prob
            return
        kk = min(k, length - len(emitted))
        for xs in itertools.product(range(v), repeat=kk):
            pq = prob
            qs = []
            for j in range(kk):
                q = draft(seq + list(xs[:j]))
                pq *= q[xs[j]]
                qs.append(q)
            if pq == 0:
                continue
            # walk the acceptances of this draft
            acc = pq
            for j in range(kk):
                p = target(seq + list(xs[:j]))
                a = acceptance_probability(p, qs[j], xs[j])
                r = residual_distribution(p, qs[j])
                for y in range(v):  # rejected at j, then y drawn from the residual
                    walk(seq + list(xs[:j]) + [y], emitted + list(xs[:j]) + [y], acc * (1 - a) * r[y])
                acc *= a
            p = target(seq + list(xs))
            for y in range(v):  # all accepted, then the bonus token
                walk(seq + list(xs) + [y], emitted + list(xs) + [y], acc * p[y])

    walk(list(prefix), [], 1.0)
    return dist


def target_sequence_distribution(target, prefix, length, v):
    out = {}
    for seq in itertools.product(range(v), repeat=length):
        prob, ctx = 1.0, list(prefix)
        for t in seq:
            prob *= target(ctx)[t]
            ctx.append(t)
        out[seq] = prob
    return out


@given(st.integers(0, 2**16), st.integers(1, 3), st.integers(2, 3), st.booleans(), st.booleans())
def test_the_loop_samples_exactly_the_target_sequence_distribution(seed, k, v, zeros, same):
    target = toy_model(seed, v)
    draft = target if same else toy_model(seed + 1, v, zeros=zeros)
    got = loop_distribution(target, draft, [0], k, 3, v)
    want = target_sequence_distribution(target, [0], 3, v)
    for seq, prob in want.items():
        assert got.get(seq, 0.0) == pytest.approx(prob, abs=1e-12), seq
    assert sum(got.values()) == pytest.approx(1.0, abs=1e-12)


def chi_square_critical(df: int, alpha: float) -> float:
    """Upper ``alpha`` quantile of chi-square with ``df`` degrees of freedom (Wilson-Hilferty; within 1% for df >= 3
    at these tails)."""
    # the normal quantile by bisection on the complementary error function
    lo, hi = 0.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if 0.5 * math.erfc(mid / math.sqrt(2)) > alpha:
            lo = mid
        else:
            hi = mid
    z = lo
    c = 2.0 / (9.0 * df)
    return df * (1 - c + z * math.sqrt(c)) ** 3


def test_chi_square_of_the_whole_loop_against_the_target():
    """Fixed seeds, 6000 runs of the loop (k = 3, 3 tokens, V = 3: 27 cells). The chi-square statistic of the
    observed sequences against the target's exact probabilities must stay below its 1e-4 upper quantile, so an exact
    sampler fails this test once in 10,000 seeds; a sampler that skips the residual correction fails it for sure."""
    v, n = 3, 6000
    target, draft = toy_model(7, v), toy_model(8, v, zeros=True)
    want = target_sequence_distribution(target, [1], 3, v)
    rng = np.random.default_rng(2026)
    counts: dict[tuple, int] = {}
    for _ in range(n):
        out, _ = speculative_generate(target, draft, [1], k=3, max_new_tokens=3, rng=rng)
        counts[tuple(out)] = counts.get(tuple(out), 0) + 1
    stat = sum((counts.get(s, 0) - n * p) ** 2 / (n * p) for s, p in want.items())
    assert stat < chi_square_critical(len(want) - 1, 1e-4)


def test_chi_square_rejects_a_sampler_without_the_residual_correction():
    """The same test on a broken step (a rejection resamples from p instead of norm(max(0, p - q))) fails."""
    v, n = 3, 6000
    target, draft = toy_model(7, v), toy_model(8, v, zeros=True)
    want = target_sequence_distribution(target, [1], 1, v)
    rng = np.random.default_rng(2026)
    counts = np.zeros(v)
    for _ in range(n):
        q = draft([1])
        x = sample_from(q, rng.random())
        p = target([1])
        a = min(1.0, p[x] / q[x])
        y = x if rng.random() < a else sample_from(p, rng.random())  # the broken resampling
        counts[y] += 1
    expected = np.array([want[(i,)] for i in range(v)]) * n
    assert np.sum((counts - expected) ** 2 / expected) > chi_square_critical(v - 1, 1e-4)


def test_counts_of_the_loop():
    target = toy_model(3, 4)
    out, stats = speculative_generate(target, target, [0], k=4, max_new_tokens=10, rng=np.random.default_rng(0))
    assert len(out) == 10
    assert stats["accepted"] == stats["drafted"]  # p = q: every draft token is kept
    assert stats["target_calls"] == 2  # 5 tokens per call


# ------------------------------------------------------------------------------------------------------ sampling
@given(st.integers(0, 2**32 - 1), st.integers(1, 30), st.integers(0, 31), st.sampled_from([0.05, 0.3, 0.9, 1.0]))
def test_top_k_and_top_p_keep_the_right_tokens(seed, v, top_k, top_p):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal(v) * 3
    p = sampling_probs(logits, temperature=1.0, top_k=top_k, top_p=top_p)
    assert p.sum() == pytest.approx(1.0)
    kept = np.flatnonzero(p > 0)
    order = np.argsort(-logits, kind="stable")
    after_k = order[: top_k if 0 < top_k < v else v]
    assert set(kept) <= set(after_k.tolist())
    # top-p: the kept tokens are a prefix of the ranking, the smallest one reaching top_p of the top-k mass
    base = sampling_probs(logits, temperature=1.0, top_k=top_k)
    ranked = base[order]
    n_keep = kept.size
    assert set(kept) == set(order[:n_keep].tolist())
    assert ranked[:n_keep].sum() >= min(top_p, 1.0) - 1e-12
    if n_keep > 1:
        assert ranked[: n_keep - 1].sum() < top_p
    np.testing.assert_allclose(p[kept], base[kept] / base[kept].sum())


def test_temperature_zero_is_greedy_and_ties_go_to_the_lower_id():
    assert sampling_probs(np.array([1.0, 3.0, 3.0]), temperature=0.0).tolist() == [0.0, 1.0, 0.0]
    assert Sampler(0.0)(np.array([0.0, 2.0, 2.0])) == 1


def test_large_logits_are_stable():
    p = sampling_probs(np.array([1e4, 0.0, -1e4]), temperature=0.5)
    assert np.all(np.isfinite(p)) and p[0] == pytest.approx(1.0)


def test_sampler_draws_follow_the_distribution():
    """Chi-square at false-alarm rate 1e-4, fixed seed."""
    logits = np.array([0.2, 1.5, -0.3, 0.9, 0.0])
    s = Sampler(temperature=0.8, top_k=4)
    p = s.probs(logits)
    rng = np.random.default_rng(5)
    n = 20000
    counts = np.bincount([s(logits, rng) for _ in range(n)], minlength=5)
    assert counts[np.argmin(logits)] == 0  # filtered by top-k
    keep = p > 0
    stat = np.sum((counts[keep] - n * p[keep]) ** 2 / (n * p[keep]))
    assert stat < chi_square_critical(int(keep.sum()) - 1, 1e-4)


def test_bad_input():
    with pytest.raises(ValueError, match="rng"):
        Sampler(1.0)(np.zeros(3))
    with pytest.raises(ValueError, match="top_p"):
        sampling_probs(np.zeros(3), top_p=0.0)
    with pytest.raises(ValueError, match="zero draft probability"):
        acceptance_probability(np.array([0.5, 0.5]), np.array([1.0, 0.0]), 1)
    with pytest.raises(ValueError, match="sum to 1"):
        speculative_step(np.ones((2, 2)), np.full((1, 2), 0.5), np.array([0]), np.array([0.1]), 0.1)
    with pytest.raises(ValueError, match="u"):
        speculative_step(np.full((2, 2), 0.5), np.full((1, 2), 0.5), np.array([0]), np.array([1.0]), 0.1)
