"""The checker: judge any implementation of a registered technique against its reference.

    check("nn.attention", "numba")                       # the project's own fast path
    check("nn.attention", "my_runtime.ops:attention")    # an importable function of another project
    check("nn.attention", "path/to/file.py:attention")   # a function in a file
    check("nn.attention", my_callable)

Every seeded test case of the technique is run (``technique.cases("test", seed)``) and judged by the technique's
comparison: the tolerance policy of :mod:`mllm_ref.oracle.tolerance`, bit-exact equality, or the technique's own
invariant checker. The implementation gets deep copies of the inputs, and a call that changes them fails (a kernel
that writes into its input would corrupt a caller's KV cache). An exception raised by the implementation is a
failing verdict carrying its message, not a crash of the checker.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mllm_ref.oracle import registry
from mllm_ref.oracle.registry import OracleError
from mllm_ref.oracle.tolerance import Verdict, compare_exact, compare_tolerance, flatten


def _load_module(module_name: str):
    """Import ``module_name``, or execute a ``.py`` file given by its path."""
    path = Path(module_name)
    if module_name.endswith(".py") and not path.is_file():
        raise OracleError(f"implementation file {path} does not exist")
    try:
        if not module_name.endswith(".py"):
            return importlib.import_module(module_name)
        spec = importlib.util.spec_from_file_location(f"_mllm_ref_impl_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except Exception as exc:  # a syntax error or a failing import in someone else's code: say so, briefly
        raise OracleError(f"cannot load {module_name}: {type(exc).__name__}: {exc}") from exc


def resolve_impl(impl, technique: registry.Technique | None = None) -> Callable[..., Any]:
    """The function that ``impl`` names.

    ``impl`` is a callable, a backend name (``"numba"``, ``"torch"``: the ``technique``'s fast path, found by the
    mirrored module path), ``"module:function"`` or ``"path/to/file.py:function"``. Anything that cannot be found
    is an :class:`~mllm_ref.oracle.registry.OracleError` saying what was looked for.
    """
    if callable(impl):
        return impl
    if not isinstance(impl, str):
        raise OracleError(f"impl must be a callable or a string, got {type(impl).__name__}")
    if impl in registry.BACKENDS:
        if technique is None:
            raise OracleError(f"impl {impl!r} names a fast path, which needs a technique")
        fn = technique.fast_path(impl)
        if fn is None:
            where = technique.fast_path_path(impl)
            raise OracleError(f"{technique.id} has no {impl} fast path" + (f" (looked for {where})" if where else ""))
        return fn
    module_name, sep, func_name = impl.rpartition(":")
    if not sep or not module_name or not func_name:
        raise OracleError(
            f"impl must be {', '.join(map(repr, registry.BACKENDS))}, 'module:function' or "
            f"'path/to/file.py:function', got {impl!r}"
        )
    fn = getattr(_load_module(module_name), func_name, None)
    if not callable(fn):
        raise OracleError(f"{module_name} has no function {func_name!r}")
    return fn


def _is_float_array(v) -> bool:
    return isinstance(v, np.ndarray) and v.dtype.kind == "f"


def _is_float_arg(v) -> bool:
    """A float array, or a dict of named arrays with at least one float array (a set of weights by name)."""
    if isinstance(v, dict):
        return any(_is_float_array(x) for x in v.values())
    return _is_float_array(v)


def _map_float(v, fn):
    """``fn`` applied to a float argument: the array itself, or each float array of a dict of weights."""
    if isinstance(v, dict):
        return {k: fn(x) if _is_float_array(x) else x for k, x in v.items()}
    return fn(np.asarray(v))


def _float_dtypes(v) -> set:
    """The dtypes of a float argument's float arrays."""
    arrays = v.values() if isinstance(v, dict) else [np.asarray(v)]
    return {x.dtype for x in arrays if _is_float_array(x)}


def float_arg_names(technique: registry.Technique, kwargs: dict) -> list[str]:
    """The arguments that follow the precision under test: ``technique.float_args``, or every float array (and
    every dict of weights holding float arrays)."""
    if technique.float_args is not None:
        return [name for name in technique.float_args if kwargs.get(name) is not None]
    return [k for k, v in kwargs.items() if _is_float_arg(v)]


def cast_float_args(technique: registry.Technique, kwargs: dict, dtype) -> dict:
    """A deep copy of ``kwargs`` with the float arguments cast to ``dtype``."""
    out = copy.deepcopy(kwargs)
    for name in float_arg_names(technique, kwargs):
        out[name] = _map_float(out[name], lambda x: np.asarray(x, dtype=dtype))
    return out


def upcast(technique: registry.Technique, kwargs: dict) -> dict:
    """The gold's inputs: a deep copy of ``kwargs`` with the float arguments in float64."""
    return cast_float_args(technique, kwargs, np.float64)


#: Seed of the signs of the one-ulp input perturbation: fixed, so that a verdict never changes between runs.
PERTURBATION_SEED = 0


def perturb(technique: registry.Technique, kwargs: dict) -> dict:
    """The perturbed run's inputs: the float arguments in float64, every element multiplied by ``1 + eps`` or
    ``1 - eps`` (``eps`` of its own precision, the sign drawn from :data:`PERTURBATION_SEED`); a dict of weights
    is perturbed array by array, in its key order."""
    out = copy.deepcopy(kwargs)
    rng = np.random.default_rng(PERTURBATION_SEED)

    def nudge(x: np.ndarray) -> np.ndarray:
        signs = rng.choice([-1.0, 1.0], size=x.shape)
        return x.astype(np.float64) * (1.0 + float(np.finfo(x.dtype).eps) * signs)

    for name in float_arg_names(technique, kwargs):
        out[name] = _map_float(kwargs[name], nudge)
    return out


@dataclass
class ReferenceRuns:
    """The reference's runs that an implementation is compared with (see :mod:`mllm_ref.oracle.tolerance`)."""

    baseline: Any  # on the inputs as given: the naive run in the precision under test
    gold: Any  # on float64 copies of the float inputs
    perturbed: Any = None  # in float64 on inputs moved by one ulp (None if the reference refused them)
    float32_run: Any = None  # on float32 copies, when the inputs are float64 (None otherwise)


def _run_or_none(technique: registry.Technique, kwargs: dict):
    """The reference on derived inputs that it may legitimately refuse (a distribution that must sum to 1 exactly
    after a one-ulp change, float32 where only float64 is accepted): then that estimate is left out."""
    try:
        return technique.reference(**kwargs)
    except (ValueError, TypeError):
        return None


def reference_runs(technique: registry.Technique, kwargs: dict) -> ReferenceRuns:
    """Run the reference as the technique's comparison needs: the baseline alone for "exact" and invariant
    checkers; baseline, gold, perturbed run and (for float64 inputs) the float32 run for "tolerance"."""
    baseline = technique.reference(**copy.deepcopy(kwargs))
    if technique.compare != "tolerance":
        return ReferenceRuns(baseline, baseline)
    gold = technique.reference(**upcast(technique, kwargs))
    perturbed = _run_or_none(technique, perturb(technique, kwargs))
    names = float_arg_names(technique, kwargs)
    float32_run = None
    if names and all(_float_dtypes(kwargs[n]) == {np.dtype(np.float64)} for n in names):
        float32_run = _run_or_none(technique, cast_float_args(technique, kwargs, np.float32))
    return ReferenceRuns(baseline, gold, perturbed, float32_run)


def _changed_inputs(before: dict, after: dict) -> list[str]:
    """Names of the arguments whose arrays (also those nested in tuples, dicts, dataclasses) changed."""
    changed = []
    for name, value in before.items():
        for (path, x), (_, y) in zip(flatten(value, name), flatten(after[name], name)):
            if isinstance(x, np.ndarray) and not (
                isinstance(y, np.ndarray) and np.array_equal(x, y, equal_nan=x.dtype.kind in "fc")
            ):
                changed.append(path)
    return changed


def call_impl(fn: Callable, kwargs: dict, label: str = "") -> tuple[Any, Verdict | None]:
    """Call ``fn`` on a deep copy of ``kwargs``: ``(output, None)``, or ``(None, failing verdict)`` when it raised
    or modified its inputs."""
    given = copy.deepcopy(kwargs)
    try:
        got = fn(**given)
    except Exception as exc:  # the implementation's failure is a verdict, not a crash of the checker
        return None, Verdict.failure(f"{label}the implementation raised {type(exc).__name__}: {exc}")
    changed = _changed_inputs(kwargs, given)
    if changed:
        return None, Verdict.failure(f"{label}the implementation modified its input(s) {', '.join(changed)}")
    return got, None


def judge_case(technique: registry.Technique, fn: Callable, kwargs: dict, label: str = "") -> Verdict:
    """Run ``fn`` on one case and compare it with the reference under the technique's comparison."""
    got, failed = call_impl(fn, kwargs, label)
    if failed:
        return failed
    runs = reference_runs(technique, kwargs)
    if technique.compare == "exact":
        v = compare_exact(runs.baseline, got, label)
    elif technique.compare == "tolerance":
        v = compare_tolerance(runs.gold, runs.baseline, got, label, perturbed=runs.perturbed, float32_run=runs.float32_run)
    else:
        try:
            passed, message = technique.compare(runs.baseline, got, kwargs)
        except Exception as exc:  # a malformed output can break the invariant checker: the output's fault
            passed, message = False, f"the comparison raised {type(exc).__name__}: {exc}"
        v = Verdict(passed=bool(passed), message="" if passed else f"{label}{message}")
    v.cases = 1
    return v


def summarize(technique_id: str, verdict: Verdict, failed_cases: int) -> Verdict:
    """Put a headline on a verdict merged over cases: one line when it passed, ``FAILED`` and the details if not."""
    if verdict.passed:
        verdict.message = (
            f"{technique_id}: all {verdict.cases} cases agree with the reference "
            f"(max abs error {verdict.max_abs_error:.3g}, max rel error {verdict.max_rel_error:.3g})"
        )
    else:
        verdict.message = f"{technique_id}: FAILED on {failed_cases} of {verdict.cases} cases\n{verdict.message}"
    return verdict


def check(technique_id: str, impl, *, kind: str = "test", seed: int = 0) -> Verdict:
    """Judge ``impl`` on every seeded ``kind`` case (``"test"`` or ``"bench"``) of ``technique_id``."""
    technique = registry.get(technique_id)
    fn = resolve_impl(impl, technique)
    verdict, failed_cases = Verdict(), 0
    for size, kwargs in technique.cases(kind, seed):
        case = judge_case(technique, fn, kwargs, f"case {size!r}, ")
        failed_cases += not case.passed
        verdict = verdict.merge(case)
    return summarize(technique_id, verdict, failed_cases)
