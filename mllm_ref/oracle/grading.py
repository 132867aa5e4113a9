"""How one exercise task is graded: a student's function against the oracle, in this process.

A task of ``exercises/<NN>-<name>/exercise.json`` names a ``technique_id``. A registered technique
(``"nn.softmax"``) is graded on its own seeded test cases and tolerance, exactly like ``mllm-ref check``. An id
under ``grading.`` names a task-only technique defined here, built from the references (no second copy of a
solution): ``grading.kv_decode_step`` and ``grading.kv_decode`` check step-by-step cached decoding against full
causal attention (:mod:`mllm_ref.nn.attention`, :mod:`mllm_ref.nn.kvcache`); ``grading.fastv_scores`` checks
FastV's scoring step alone (:mod:`mllm_ref.tokens.fastv`).

:func:`grade_callable` is used both by the sandboxed worker (:mod:`mllm_ref.oracle.grade_worker`, on a student's
submission) and by the self-check of the test suite (on the references themselves).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from mllm_ref.oracle import registry
from mllm_ref.oracle.check import judge_case, summarize
from mllm_ref.oracle.tolerance import Verdict

__all__ = ["GRADING_TECHNIQUES", "technique_for", "grade_callable", "first_failure"]


# ---------------------------------------------------------------- KV-cache decoding


def decode_step_reference(cache_k, cache_v, q_new, k_new, v_new):
    """One decoding step: append ``k_new``/``v_new`` (one token) to the cache and attend ``q_new`` over it.

    Returns ``(out[B, Hq, 1, dv], new_cache_k[B, Hkv, T+1, d], new_cache_v[B, Hkv, T+1, dv])``.
    """
    from mllm_ref.nn.attention import attention
    from mllm_ref.nn.kvcache import KVCache, append

    cache = append(KVCache(cache_k, cache_v), k_new, v_new)
    return attention(q_new, cache.k, cache.v, causal=True), cache.k, cache.v


def decode_reference(q_steps, k_steps, v_steps):
    """Cached decoding of T steps equals full causal attention: ``attention(q, k, v, causal=True)``."""
    from mllm_ref.nn.attention import attention

    return attention(q_steps, k_steps, v_steps, causal=True)


# size -> (B, Hq, Hkv, T cached, d, dv)
_STEP_SIZES = {
    "empty_cache": (1, 2, 2, 0, 4, 4),
    "one_cached": (1, 1, 1, 1, 3, 5),
    "gqa": (2, 4, 2, 6, 8, 8),
    "mqa_long": (1, 6, 1, 23, 16, 8),
}


def _step_case(size: str, rng: np.random.Generator) -> dict:
    b, hq, hkv, t, d, dv = _STEP_SIZES[size]

    def arr(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    return {
        "cache_k": arr(b, hkv, t, d),
        "cache_v": arr(b, hkv, t, dv),
        "q_new": arr(b, hq, 1, d),
        "k_new": arr(b, hkv, 1, d),
        "v_new": arr(b, hkv, 1, dv),
    }


# size -> (B, Hq, Hkv, T steps, d, dv)
_DECODE_SIZES = {
    "one_step": (1, 1, 1, 1, 4, 4),
    "mha": (2, 3, 3, 7, 5, 6),
    "gqa": (1, 4, 2, 12, 8, 8),
    "mqa": (2, 4, 1, 17, 16, 8),
}


def _decode_case(size: str, rng: np.random.Generator) -> dict:
    b, hq, hkv, t, d, dv = _DECODE_SIZES[size]
    return {
        "q_steps": rng.standard_normal((b, hq, t, d)).astype(np.float32),
        "k_steps": rng.standard_normal((b, hkv, t, d)).astype(np.float32),
        "v_steps": rng.standard_normal((b, hkv, t, dv)).astype(np.float32),
    }


# ---------------------------------------------------------------- FastV's scores


def fastv_scores_reference(attn, visual_start, n_visual, scoring="last"):
    """FastV's image-token scores (:func:`mllm_ref.tokens.fastv.fastv_scores`), graded on the cases of
    ``tokens.fastv`` without the hidden states and the ratio."""
    from mllm_ref.tokens.fastv import fastv_scores

    return fastv_scores(attn, visual_start, n_visual, scoring)


def _fastv_scores_case(size: str, rng: np.random.Generator) -> dict:
    kw = registry.get("tokens.fastv").make_case(size, rng)
    return {k: kw[k] for k in ("attn", "visual_start", "n_visual", "scoring")}


_KV_PAPER = "Ashish Vaswani et al., Attention Is All You Need, NeurIPS 2017 (arXiv:1706.03762)"

#: Task-only techniques (not in the registry: they are exercises, not techniques of the library).
GRADING_TECHNIQUES: dict[str, registry.Technique] = {
    "grading.kv_decode_step": registry.Technique(
        id="grading.kv_decode_step",
        reference=decode_step_reference,
        make_case=_step_case,
        paper=_KV_PAPER,
        test_sizes=tuple(_STEP_SIZES),
        compare="tolerance",
    ),
    "grading.kv_decode": registry.Technique(
        id="grading.kv_decode",
        reference=decode_reference,
        make_case=_decode_case,
        paper=_KV_PAPER,
        test_sizes=tuple(_DECODE_SIZES),
        compare="tolerance",
    ),
    "grading.fastv_scores": registry.Technique(
        id="grading.fastv_scores",
        reference=fastv_scores_reference,
        make_case=_fastv_scores_case,
        paper="L. Chen et al., An Image is Worth 1/2 Tokens After Layer 2, ECCV 2024 (arXiv 2403.06764)",
        test_sizes=("tiny", "small", "small-mean", "tinyvlm"),
        compare="tolerance",
    ),
}


def technique_for(technique_id: str) -> registry.Technique:
    """The registered technique, or the task-only one of :data:`GRADING_TECHNIQUES`."""
    if technique_id in GRADING_TECHNIQUES:
        return GRADING_TECHNIQUES[technique_id]
    return registry.get(technique_id)


def grade_callable(technique_id: str, fn: Callable, *, seed: int = 0) -> Verdict:
    """Judge ``fn`` on every seeded test case of ``technique_id`` (the verdict of ``check``)."""
    technique = technique_for(technique_id)
    verdict, failed_cases = Verdict(), 0
    for size, kwargs in technique.cases("test", seed):
        case = judge_case(technique, fn, kwargs, f"case {size!r}, ")
        failed_cases += not case.passed
        verdict = verdict.merge(case)
    return summarize(technique_id, verdict, failed_cases)


def first_failure(message: str) -> str:
    """The headline and the first failing case of a merged verdict message (the other cases are counted)."""
    lines = message.splitlines()
    if not lines:
        return message
    keep, first, current = [lines[0]], None, None
    for line in lines[1:]:
        if line.startswith("case "):
            current = line.split(",", 1)[0]  # "case 'decode'": one case may fail on several outputs
            first = first or current
        if current == first:
            keep.append(line)
    rest = len(lines) - len(keep)
    return "\n".join(keep + ([f"... ({rest} more lines about the other failing cases)"] if rest else []))
