"""One generic test over the whole registry: every fast path equals its reference, and every technique keeps
the contract (paper, documented deviations, deterministic cases, no mutation of inputs, idempotence)."""

from __future__ import annotations

import copy
import inspect

import numpy as np
import pytest
from hypothesis import given

from mllm_ref.oracle import registry
from mllm_ref.oracle.check import check, judge_case
from mllm_ref.oracle.tolerance import flatten

TECHNIQUES = registry.all_techniques()
IDS = [t.id for t in TECHNIQUES]
PAIRS = [(t, b) for t in TECHNIQUES for b in registry.BACKENDS if t.fast_path(b) is not None]


def test_the_first_techniques_are_registered_with_both_fast_paths():
    for tid in ("nn.softmax", "nn.rmsnorm", "nn.layernorm", "nn.rope", "nn.attention"):
        t = registry.get(tid)
        assert t.fast_path("numba") is not None and t.fast_path("torch") is not None, tid


@pytest.mark.parametrize("technique, backend", PAIRS, ids=[f"{t.id}-{b}" for t, b in PAIRS])
def test_fast_path_passes_every_seeded_case(technique, backend):
    verdict = check(technique.id, backend)
    assert verdict.passed, verdict.message
    assert verdict.cases == len(technique.test_sizes)


@pytest.mark.parametrize("technique, backend", PAIRS, ids=[f"{t.id}-{b}" for t, b in PAIRS])
def test_fast_path_matches_reference_on_drawn_inputs(technique, backend):
    if technique.strategy is None:
        pytest.skip(f"{technique.id} has no Hypothesis strategy; its seeded cases are checked above")
    fn = technique.fast_path(backend)

    @given(technique.strategy())
    def prop(kwargs):
        verdict = judge_case(technique, fn, kwargs, "drawn case: ")
        assert verdict.passed, verdict.message

    prop()


@pytest.mark.parametrize("technique", TECHNIQUES, ids=IDS)
def test_technique_contract(technique):
    assert technique.paper.strip(), "every technique cites its paper"
    module = inspect.getmodule(technique.reference)
    assert "Deviations from the paper" in (module.__doc__ or "") or "Deviations from the papers" in (module.__doc__ or "")
    assert technique.reference.__doc__, "the reference has a docstring"
    a = technique.cases("test", seed=3)
    b = technique.cases("test", seed=3)
    for (sa, ka), (sb, kb) in zip(a, b):
        assert sa == sb and ka.keys() == kb.keys()
        for k in ka:
            if isinstance(ka[k], np.ndarray):
                assert np.array_equal(ka[k], kb[k]) and ka[k].dtype == kb[k].dtype
            else:
                assert ka[k] == kb[k]


@pytest.mark.parametrize("technique", TECHNIQUES, ids=IDS)
def test_reference_is_pure(technique):
    for _, kwargs in technique.cases("test"):
        before = copy.deepcopy(kwargs)
        first = technique.reference(**kwargs)
        for k, v in before.items():
            if isinstance(v, np.ndarray):
                assert np.array_equal(v, kwargs[k]), f"the reference changed its input {k}"
        second = technique.reference(**kwargs)
        for (p, x), (_, y) in zip(flatten(first), flatten(second)):
            assert np.array_equal(np.asarray(x), np.asarray(y)), f"two calls differ at {p}"


@pytest.mark.parametrize("technique", [t for t in TECHNIQUES if t.compare == "tolerance"], ids=lambda t: t.id)
def test_reference_in_float32_is_within_the_policy_of_its_float64_gold(technique):
    """The naive baseline must itself pass (a reference whose float32 run is unstable would fail here)."""
    for size, kwargs in technique.cases("test"):
        verdict = judge_case(technique, technique.reference, kwargs, f"case {size}: ")
        assert verdict.passed, verdict.message
