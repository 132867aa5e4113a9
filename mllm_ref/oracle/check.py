"""The checker: judge any implementation of a registered technique against its reference.

    check("nn.attention", "numba")                       # the project's own fast path
    check("nn.attention", "my_runtime.ops:attention")    # an importable function of another project
    check("nn.attention", "path/to/file.py:attention")   # a function in a file
    check("nn.attention", my_callable)

Every seeded test case of the technique is run. Inputs are deep-copied before the call, and a call that changes
its inputs fails. An exception raised by the implementation is a failing verdict with its message, not a crash.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mllm_ref.oracle import registry
from mllm_ref.oracle.tolerance import Verdict, compare_exact, compare_tolerance


def resolve_impl(technique: registry.Technique, impl) -> tuple[Callable[..., Any], str]:
    """``(callable, label)`` for ``impl``: a callable, ``"numba"``, ``"torch"``, ``"module:function"`` or
    ``"file.py:function"``. A missing backend or function is a ``ValueError`` saying what was looked for."""
    if callable(impl):
        return impl, getattr(impl, "__qualname__", repr(impl))
    if not isinstance(impl, str):
        raise TypeError(f"impl must be a callable or a string, got {type(impl).__name__}")
    if impl in registry.BACKENDS:
        fn = technique.fast_path(impl)
        if fn is None:
            raise ValueError(f"{technique.id} has no {impl} fast path (looked for {technique.fast_path_path(impl)})")
        return fn, impl
    module_name, sep, func_name = impl.rpartition(":")
    if not sep or not module_name or not func_name:
        raise ValueError(f"impl must be 'numba', 'torch', 'module:function' or 'file.py:function', got {impl!r}")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise ValueError(f"impl file {path} does not exist")
        spec = importlib.util.spec_from_file_location(f"_mllm_ref_impl_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"cannot import {module_name!r}: {exc}") from exc
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise ValueError(f"{module_name} has no function {func_name!r}")
    return fn, impl


def _float_args(technique: registry.Technique, kwargs: dict) -> set[str]:
    if technique.float_args is not None:
        return set(technique.float_args)
    return {k for k, v in kwargs.items() if isinstance(v, np.ndarray) and v.dtype.kind == "f"}


def upcast(technique: registry.Technique, kwargs: dict) -> dict:
    """A copy of ``kwargs`` with the float arguments cast to float64 (the gold's inputs)."""
    out = copy.deepcopy(kwargs)
    for k in _float_args(technique, kwargs):
        out[k] = np.asarray(out[k], dtype=np.float64)
    return out


def _unchanged(before: dict, after: dict) -> list[str]:
    changed = []
    for k, v in before.items():
        if isinstance(v, np.ndarray) and not np.array_equal(v, after[k], equal_nan=v.dtype.kind in "fc"):
            changed.append(k)
    return changed


def judge_case(technique: registry.Technique, fn: Callable, kwargs: dict, label: str, reference_out=None, gold=None) -> Verdict:
    """Run ``fn`` on one case and compare it with the reference under the technique's comparison."""
    given = copy.deepcopy(kwargs)
    try:
        got = fn(**given)
    except Exception as exc:  # the implementation's failure is a verdict, not a crash of the checker
        return Verdict(False, 1, np.inf, np.inf, 1, f"{label}the implementation raised {type(exc).__name__}: {exc}")
    changed = _unchanged(kwargs, given)
    if changed:
        return Verdict(False, 1, np.inf, np.inf, 1, f"{label}the implementation modified its input(s) {changed}")
    if reference_out is None:
        reference_out = technique.reference(**copy.deepcopy(kwargs))
    compare = technique.compare
    if compare == "exact":
        v = compare_exact(reference_out, got, label)
    elif compare == "tolerance":
        if gold is None:
            gold = technique.reference(**upcast(technique, kwargs))
        v = compare_tolerance(gold, reference_out, got, label)
    else:
        passed, message = compare(reference_out, got, kwargs)
        v = Verdict(bool(passed), 0, 0.0, 0.0, 0 if passed else 1, "" if passed else f"{label}{message}")
    v.cases = 1
    return v


def check(technique_id: str, impl, *, kind: str = "test", seed: int = 0) -> Verdict:
    """Judge ``impl`` on every seeded ``kind`` case of ``technique_id``."""
    technique = registry.get(technique_id)
    fn, _ = resolve_impl(technique, impl)
    verdict = Verdict()
    for size, kwargs in technique.cases(kind, seed):
        verdict = verdict.merge(judge_case(technique, fn, kwargs, f"case {size!r}: "))
    if verdict.passed:
        verdict.message = (
            f"{technique_id}: all {verdict.cases} cases agree with the reference "
            f"(max abs error {verdict.max_abs_error:.3g}, max rel error {verdict.max_rel_error:.3g})"
        )
    else:
        verdict.message = f"{technique_id}: FAILED\n" + verdict.message
    return verdict
