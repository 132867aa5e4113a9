"""One generic test over the whole registry: every fast path agrees with its reference, and every technique keeps
the contract (paper, documented deviations, deterministic and well-conditioned cases, pure references).

A technique registered tomorrow is covered without editing this file; each shows as its own test id.
"""

from __future__ import annotations

import copy
import inspect
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mllm_ref.oracle import registry
from mllm_ref.oracle.check import check, judge_case, reference_runs
from mllm_ref.oracle.registry import OracleError, Technique, UnknownTechniqueError
from mllm_ref.oracle.tolerance import bound, flatten

TECHNIQUES = registry.all_techniques()
IDS = [t.id for t in TECHNIQUES]
PAIRS = [(t, b) for t in TECHNIQUES for b in registry.BACKENDS if t.fast_path(b) is not None]
PAIR_IDS = [f"{t.id}-{b}" for t, b in PAIRS]


def _drawn_cases(technique: Technique):
    """The technique's own Hypothesis strategy, or else its seeded cases at drawn seeds."""
    if technique.strategy is not None:
        return technique.strategy()
    seeds = st.integers(0, 2**32 - 1)
    sizes = st.sampled_from(list(technique.test_sizes))
    return st.builds(lambda size, seed: technique.make_case(size, np.random.default_rng(seed)), sizes, seeds)


# ---------------------------------------------------------------- fast paths against references


def test_the_first_techniques_have_both_fast_paths():
    for tid in ("nn.softmax", "nn.rmsnorm", "nn.layernorm", "nn.rope", "nn.attention"):
        t = registry.get(tid)
        assert t.fast_path("numba") is not None and t.fast_path("torch") is not None, tid


@pytest.mark.parametrize("technique, backend", PAIRS, ids=PAIR_IDS)
def test_fast_path_passes_every_seeded_case(technique, backend):
    verdict = check(technique.id, backend)
    assert verdict.passed, verdict.message
    assert verdict.cases == len(technique.test_sizes)


@pytest.mark.parametrize("technique, backend", PAIRS, ids=PAIR_IDS)
def test_fast_path_agrees_with_the_reference_on_drawn_inputs(technique, backend):
    fn = technique.fast_path(backend)

    @given(_drawn_cases(technique))
    def agrees(kwargs):
        verdict = judge_case(technique, fn, kwargs, "drawn case, ")
        assert verdict.passed, verdict.message

    agrees()


# ---------------------------------------------------------------- the contract of every technique


@pytest.mark.parametrize("technique", TECHNIQUES, ids=IDS)
def test_technique_is_documented(technique):
    assert technique.paper.strip(), "every technique cites its paper"
    module_doc = inspect.getmodule(technique.reference).__doc__ or ""
    assert "Deviations from the paper" in module_doc, "the module docstring has a 'Deviations from the paper' paragraph"
    assert technique.reference.__doc__, "the reference has a docstring"
    assert technique.test_sizes, "at least one seeded test case"


@pytest.mark.parametrize("technique", TECHNIQUES, ids=IDS)
def test_cases_are_deterministic(technique):
    first, second = technique.cases("test", seed=3), technique.cases("test", seed=3)
    for (size_a, a), (size_b, b) in zip(first, second):
        assert size_a == size_b and a.keys() == b.keys()
        for name in a:
            for (path, x), (_, y) in zip(flatten(a[name], name), flatten(b[name], name)):
                if isinstance(x, np.ndarray):
                    assert x.dtype == y.dtype and np.array_equal(x, y), f"{size_a}: {path} differs"
                else:
                    assert x == y, f"{size_a}: {path} differs"


@pytest.mark.parametrize("technique", TECHNIQUES, ids=IDS)
def test_reference_is_pure_and_idempotent(technique):
    for size, kwargs in technique.cases("test"):
        before = copy.deepcopy(kwargs)
        first = technique.reference(**kwargs)
        for name in before:
            for (path, x), (_, y) in zip(flatten(before[name], name), flatten(kwargs[name], name)):
                if isinstance(x, np.ndarray):
                    assert np.array_equal(x, y, equal_nan=True), f"{size}: the reference changed its input {path}"
        second = technique.reference(**kwargs)
        for (path, x), (_, y) in zip(flatten(first), flatten(second)):
            x, y = np.asarray(x), np.asarray(y)
            assert x.dtype == y.dtype and np.array_equal(x, y, equal_nan=x.dtype.kind in "fc"), f"{size}: {path}"


@pytest.mark.parametrize("technique", [t for t in TECHNIQUES if t.compare == "tolerance"], ids=lambda t: t.id)
def test_seeded_cases_are_well_conditioned(technique):
    """The baseline error stays within sqrt(eps) of the output's size; otherwise ``K x`` it would let almost anything
    pass, zeros included (gpu-mode #127: choose well-conditioned inputs)."""
    for size, kwargs in technique.cases("test"):
        runs = reference_runs(technique, kwargs)
        perturbed = dict(flatten(runs.perturbed)) if runs.perturbed is not None else {}
        float32_run = dict(flatten(runs.float32_run)) if runs.float32_run is not None else {}
        for (path, g), (_, b) in zip(flatten(runs.gold), flatten(runs.baseline)):
            g, b = np.asarray(g, dtype=np.float64), np.asarray(b)
            if b.dtype.kind != "f" or not np.isfinite(g).any():
                continue
            e = bound(g, b, b.dtype, perturbed.get(path), float32_run.get(path)).baseline_error
            scale = np.abs(g[np.isfinite(g)]).max()
            assert e <= np.sqrt(np.finfo(b.dtype).eps) * scale, f"{size}: {path}: baseline error {e:.3g}, scale {scale:.3g}"


# ---------------------------------------------------------------- the registry itself


def test_seeds_change_the_cases_and_kinds_are_checked():
    t = registry.get("nn.attention")
    assert not np.array_equal(t.cases("test", seed=0)[1][1]["q"], t.cases("test", seed=1)[1][1]["q"])
    with pytest.raises(OracleError, match="kind must be"):
        t.cases("train")


def test_registering_is_checked(scratch_registry):
    def f(x):
        """Identity."""
        return x

    def case(size, rng):
        return {"x": rng.standard_normal(3)}

    with pytest.raises(ValueError, match="family.name"):
        scratch_registry(Technique("nofamily", f, case, "p"))
    with pytest.raises(ValueError, match="family.name"):
        scratch_registry(Technique("pets.cat", f, case, "p"))
    with pytest.raises(ValueError, match="compare"):
        scratch_registry(Technique("nn.test_f", f, case, "p", compare="close enough"))
    scratch_registry(Technique("nn.test_f", f, case, "p"))
    with pytest.raises(ValueError, match="registered twice"):
        scratch_registry(Technique("nn.test_f", lambda x: x, case, "p"))
    assert registry.get("nn.test_f").fast_path("numba") is None  # a reference outside mllm_ref has no mirror
    with pytest.raises(UnknownTechniqueError, match="known: .*nn.test_f") as info:
        registry.get("nn.test_g")
    assert isinstance(info.value, KeyError)


_IMPORT_EVERYTHING = """
import importlib, pkgutil, sys
before = set(sys.modules)
import mllm_ref
{extra}
for m in pkgutil.walk_packages(mllm_ref.__path__, "mllm_ref."):
    if m.name.split(".")[1] not in ("cli", "viz"):
        importlib.import_module(m.name)
new = {{name.split(".")[0] for name in set(sys.modules) - before}}
print(sorted(n for n in new - set(sys.stdlib_module_names) if not n.startswith("_") and n not in ("mllm_ref", "numpy")))
"""


def _third_party_imported(extra: str = "") -> str:
    """The third-party packages that importing every module of mllm_ref (and ``extra``) pulls in, in a fresh
    interpreter."""
    code = _IMPORT_EVERYTHING.format(extra=extra)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_the_reference_package_imports_numpy_only():
    """``import mllm_ref`` and every module under it but the command line and the plots pull in no third-party
    package but NumPy; fast paths import Numba and torch themselves, only when asked for."""
    assert _third_party_imported() == "[]"
    assert "'hypothesis'" in _third_party_imported("import hypothesis")  # the check can see an import
