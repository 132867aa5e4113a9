"""The tolerance policy, written once: when does an implementation agree with the reference?

The implementation's output is compared with runs of the reference on the same case:

- the **gold**: the reference on float64 copies of the float inputs (``Technique.float_args``);
- the **naive baseline**: the reference on the inputs as given, in the precision ``p`` under test (float32, say).
  Its distance to the gold is the rounding error that a plain computation in that precision makes. For float64
  inputs the naive run *is* the gold, so its error is estimated from the reference run on float32 copies of the
  inputs, scaled by eps(float64) / eps(float32);
- the **perturbed run**: the reference in float64 on the float inputs each multiplied by ``1 +- eps(p)`` (signs
  from a fixed seed). Its distance to the gold is how far the output moves when the inputs move by one unit in the
  last place: the conditioning of the case at precision ``p``.

References and fast paths keep the dtype of their inputs, so the implementation's precision is the precision of
its inputs, and it must return that dtype. With the baseline error ``E``, the larger of the naive and the perturbed
run's distances to the gold, every float output array (leaves of a tuple, list, dict or dataclass are judged one by
one) must satisfy::

    max |impl - gold|  <=  K * E  +  C * eps(p) * max |gold|  +  tiny(p)

where ``eps(p)`` is the machine epsilon (1.19e-7 for float32) and ``tiny(p)`` the smallest normal number (1.18e-38
for float32). The bound is normwise (a maximum over the whole output array), like the errors it is built from.

- ``K = 4``. flash-attention's tests allow 2x a naive same-precision run for the forward pass and 3x for the
  backward. A fast path reorders sums (blocks, an online softmax, several threads), fuses multiply-adds and may use
  a polynomial ``exp`` of a few ulps: its error is of the same order as the baseline's but not bounded by it
  element by element. Measured on this project's own Numba and torch fast paths over the ``nn`` test cases
  (November 2026): error / E is at most 1.4 (median 0.56), and against the naive run alone it reached 3.1 (a
  one-row RMSNorm whose naive run happened to be nearly exact); no case used more than a fifth of the bound. 4
  covers that and leaves room for other runtimes' reduction orders. Float16 arithmetic is about 8000 times less
  precise than float32 and fails by orders of magnitude.
- Two estimates of E, because a single naive run can be luckily accurate: when two attention scores share most of
  their terms, the naive order rounds them alike and the rounding cancels in their difference, while a kernel
  summing in another order does not get that luck; and for float64 inputs the naive run is the gold itself. The
  perturbed run moves every input independently; the naive (or float32) run sees the rounding of long sums, which
  a one-ulp change of the inputs does not.
- ``C = 16``, the noise floor. When the baseline error is 0 (a one-element softmax is exactly 1, RoPE at position
  0 is the identity), a K-multiple alone would demand bit-exactness (the failure of flash-attention #1231). The
  floor allows 16 units in the last place of the output's largest magnitude, about the error of a pairwise
  reordering of a 2**16-term sum. It scales with the output, so a bound is never absolute only: an all-zeros
  answer is off by ``max|gold|``, which is ``1 / (16 eps)`` (about 500 000) times the float32 floor, however
  small the outputs are (KernelBench #165: absolute tolerances let zeros pass on tiny outputs). Over 300
  Hypothesis-drawn cases per ``nn`` technique, the worst error of the Numba and torch fast paths went at most 3.5
  ulps beyond ``K * E`` (a float64 softmax), so 16 leaves a margin of four.
- ``tiny(p)`` only matters when the gold is all zeros; then it accepts zeros and subnormal noise, nothing else.

The rule is only as strict as the case is well-conditioned: where the naive run is off by as much as the output
itself (a layer norm of a nearly constant row in float32), ``K * E`` accepts almost anything, zeros included.
The seeded test cases are therefore checked to keep E within sqrt(eps) of the output's size
(``tests/test_registry_properties.py``); drawn cases may be ill-conditioned, and are judged leniently.

Outputs must also agree in structure (the same nesting and leaf names), shape and dtype, and in where they are NaN
or infinite (same positions, same signs of infinity). Non-float leaves (indices, masks) are compared exactly.

The exact mode, for discrete outputs (kept indices, codes, routes): every leaf equals the reference's output on
the inputs as given, bit for bit, with the same dtype kind and shape. The reference's docstring fixes tie-breaking
and rounding, so there is only one right answer.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

#: Multiple of the baseline error E that an implementation may make (see the module docstring).
K = 4.0
#: Noise floor, in units of eps(precision) times the output's largest magnitude.
C = 16.0
#: How many mismatching elements a message lists.
MAX_REPORTED = 5

RULE = (
    "max|impl - gold| <= K * E + C * eps(p) * max|gold| + tiny(p); p: the precision of the inputs; E: the larger of "
    "max|baseline - gold| (for p = float64: max|float32 - gold| * eps(float64) / eps(float32)) and max|perturbed - gold|"
)


@dataclass
class Verdict:
    """The outcome of comparing an implementation with the reference over one or more cases.

    Attributes:
        passed: every case agrees.
        cases: number of cases run.
        max_abs_error: largest ``|impl - gold|`` over all float outputs (exact mode: over numeric leaves);
            infinite when a case could not be compared (an exception, a wrong shape).
        max_rel_error: largest ``max|impl - gold| / max|gold|`` of an output (normwise relative error).
        mismatches: number of elements outside the bound, or differing in exact mode.
        message: what went wrong, case by case, with the first bad indices and both values; a one-line summary
            when everything passed.
    """

    passed: bool = True
    cases: int = 0
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    mismatches: int = 0
    message: str = ""

    @classmethod
    def failure(cls, message: str, cases: int = 1) -> "Verdict":
        """A failed case that could not be compared element by element."""
        return cls(False, cases, math.inf, math.inf, 0, message)

    def merge(self, other: "Verdict") -> "Verdict":
        """The verdict over both sets of cases."""
        return Verdict(
            self.passed and other.passed,
            self.cases + other.cases,
            max(self.max_abs_error, other.max_abs_error),
            max(self.max_rel_error, other.max_rel_error),
            self.mismatches + other.mismatches,
            "\n".join(m for m in (self.message, other.message) if m),
        )

    def to_json(self) -> dict:
        """A JSON-ready dict; an infinite or NaN error becomes ``None`` (JSON has no infinity)."""

        def num(x: float) -> float | None:
            return float(x) if math.isfinite(x) else None

        return {
            "passed": self.passed,
            "cases": self.cases,
            "max_abs_error": num(self.max_abs_error),
            "max_rel_error": num(self.max_rel_error),
            "mismatches": self.mismatches,
            "message": self.message,
        }


def flatten(out, path: str = "out") -> list[tuple[str, object]]:
    """The leaves of an output, ``[(path, value), ...]``, through tuples, lists, dicts and dataclasses.

    A single array is ``[("out", array)]``; ``(a, b)`` gives ``out[0]`` and ``out[1]``; a dict ``out['key']``; a
    dataclass ``out.field``.
    """
    if isinstance(out, (tuple, list)):
        return [leaf for i, x in enumerate(out) for leaf in flatten(x, f"{path}[{i}]")]
    if isinstance(out, dict):
        return [leaf for k in sorted(out, key=str) for leaf in flatten(out[k], f"{path}[{k!r}]")]
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return [leaf for f in dataclasses.fields(out) for leaf in flatten(getattr(out, f.name), f"{path}.{f.name}")]
    return [(path, out)]


def _fmt(x) -> str:
    x = np.asarray(x)
    return f"{float(x):.7g}" if x.dtype.kind == "f" else str(x.item())


def _first_bad(bad: np.ndarray, got: np.ndarray, want: np.ndarray) -> str:
    """``"(i, j): got a, expected b; ..."`` for the first :data:`MAX_REPORTED` true entries of ``bad``."""
    parts = []
    for index in np.argwhere(bad)[:MAX_REPORTED]:
        t = tuple(int(j) for j in index)
        parts.append(f"{t}: got {_fmt(got[t])}, expected {_fmt(want[t])}")
    more = int(bad.sum()) - len(parts)
    return "; ".join(parts) + (f"; ... ({more} more)" if more > 0 else "")


def _same_structure(want_leaves, got_leaves, label: str) -> Verdict | None:
    """A failing verdict if the two outputs are not nested the same way, else ``None``."""
    want_paths = [p for p, _ in want_leaves]
    got_paths = [p for p, _ in got_leaves]
    if want_paths != got_paths:
        return Verdict.failure(f"{label}the output's structure differs: expected leaves {want_paths}, got {got_paths}", 0)
    return None


def _same_shape_and_kind(path: str, want: np.ndarray, got: np.ndarray, label: str, *, same_dtype: bool) -> Verdict | None:
    """A failing verdict if the shapes differ, or the dtype kinds (``same_dtype``: the dtypes), else ``None``."""
    if got.shape != want.shape:
        return Verdict.failure(f"{label}{path}: shape {got.shape}, expected {want.shape}", 0)
    if got.dtype.kind != want.dtype.kind or (same_dtype and got.dtype != want.dtype):
        why = " (a float path keeps the dtype of its inputs)" if same_dtype else ""
        return Verdict.failure(f"{label}{path}: dtype {got.dtype}, expected {want.dtype}{why}", 0)
    return None


def compare_exact(want, got, label: str = "", path: str = "out") -> Verdict:
    """Bit-exact comparison of every leaf: the same structure, shapes, dtype kinds and values (NaN equals NaN).
    ``path`` names the top of the output in messages."""
    want_leaves, got_leaves = flatten(want, path), flatten(got, path)
    failed = _same_structure(want_leaves, got_leaves, label)
    if failed:
        return failed
    v = Verdict()
    for (leaf, w), (_, g) in zip(want_leaves, got_leaves):
        w, g = np.asarray(w), np.asarray(g)
        failed = _same_shape_and_kind(leaf, w, g, label, same_dtype=False)
        if failed:
            v = v.merge(failed)
            continue
        same = np.asarray(w == g)
        if w.dtype.kind in "fc":
            same |= np.isnan(w) & np.isnan(g)
        if same.all():
            continue
        bad = ~same
        max_abs = 0.0
        if w.dtype.kind in "biuf":
            diff = np.abs(w.astype(np.float64) - g.astype(np.float64))[bad]
            max_abs = float(np.nanmax(diff)) if np.isfinite(diff).any() else math.inf
        message = f"{label}{leaf}: {int(bad.sum())} of {w.size} elements differ (exact comparison); first: {_first_bad(bad, g, w)}"
        v = v.merge(Verdict(False, 0, max_abs, 0.0, int(bad.sum()), message))
    return v


class Bound(NamedTuple):
    """The allowed error of one output and what it is made of."""

    allowed: float
    naive_error: float  # of the naive run in the precision under test (measured, or estimated for float64)
    perturbation_error: float  # of the perturbed run
    floor: float

    @property
    def baseline_error(self) -> float:
        return max(self.naive_error, self.perturbation_error)


def bound(gold: np.ndarray, baseline: np.ndarray, precision, perturbed=None, float32_run=None) -> Bound:
    """The largest absolute error an implementation in ``precision`` may make on one output.

    ``baseline`` is the naive run in ``precision``; ``perturbed`` the perturbed run; ``float32_run`` (used when
    ``precision`` is float64) the naive run on float32 copies of the inputs. Only positions where the gold is
    finite count, and of the other runs only those where they are finite too (a float32 run may overflow).
    """
    finite = np.isfinite(gold)
    if not finite.any():
        return Bound(0.0, 0.0, 0.0, 0.0)

    def error(run) -> float:
        run = np.asarray(run)
        if run.shape != gold.shape:
            return 0.0
        usable = finite & np.isfinite(run)
        return float(np.max(np.abs(run[usable].astype(np.float64) - gold[usable]))) if usable.any() else 0.0

    if np.dtype(precision) == np.float64 and float32_run is not None:
        naive = error(float32_run) * float(np.finfo(np.float64).eps / np.finfo(np.float32).eps)
    else:
        naive = error(baseline)
    perturbation = error(perturbed) if perturbed is not None else 0.0
    info = np.finfo(precision)
    floor = C * float(info.eps) * float(np.max(np.abs(gold[finite]))) + float(info.tiny)
    return Bound(K * max(naive, perturbation) + floor, naive, perturbation, floor)


def _compare_float_leaf(leaf: str, gold, baseline, got, label: str, perturbed, float32_run) -> Verdict:
    """Judge one float output: NaN/inf placement, then the error bound on the finite elements."""
    gold = gold.astype(np.float64)
    got64 = got.astype(np.float64)
    nonfinite = ~np.isfinite(gold) | ~np.isfinite(got64)
    disagree = nonfinite & ~((gold == got64) | (np.isnan(gold) & np.isnan(got64)))
    v = Verdict()
    if disagree.any():
        n = int(disagree.sum())
        message = (
            f"{label}{leaf}: NaN or infinity where the reference has another value, at {n} elements; "
            f"first: {_first_bad(disagree, got, gold)}"
        )
        v = Verdict(False, 0, math.inf, math.inf, n, message)
    finite = ~nonfinite
    if not finite.any():
        return v
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf at the non-finite positions, masked out
        err = np.where(finite, np.abs(got64 - gold), 0.0)
    b = bound(gold, baseline, baseline.dtype, perturbed, float32_run)
    scale = float(np.max(np.abs(gold[finite])))
    max_err = float(err.max())
    rel = max_err / scale if scale > 0 else (0.0 if max_err == 0 else math.inf)
    bad = err > b.allowed
    message = ""
    if bad.any():
        worst = tuple(int(i) for i in np.unravel_index(np.argmax(err), err.shape))
        message = (
            f"{label}{leaf}: {int(bad.sum())} of {err.size} elements exceed the allowed error {b.allowed:.3g} "
            f"(= {K:g} x baseline error {b.baseline_error:.3g} + noise floor {b.floor:.3g}; naive {baseline.dtype} "
            f"run {b.naive_error:.3g}, one-ulp input change {b.perturbation_error:.3g}); max abs error "
            f"{max_err:.3g} at {worst}: got {_fmt(got[worst])}, expected {_fmt(gold[worst])}\n"
            f"    first mismatches: {_first_bad(bad, got, gold)}"
        )
    return v.merge(Verdict(not bad.any(), 0, max_err, rel, int(bad.sum()), message))


def compare_tolerance(gold, baseline, got, label: str = "", path: str = "out", *, perturbed=None, float32_run=None) -> Verdict:
    """Judge ``got`` against the float64 ``gold`` under the policy.

    ``baseline`` is the reference's output on the inputs as given (the naive run: it also fixes the expected
    dtypes and the exact leaves); ``perturbed`` and ``float32_run`` are the optional other runs (see
    :func:`bound`). All have the structure of ``gold``; ``path`` names the top of the output in messages.
    """
    gold_leaves, baseline_leaves, got_leaves = flatten(gold, path), flatten(baseline, path), flatten(got, path)
    failed = _same_structure(gold_leaves, got_leaves, label)
    if failed:
        return failed
    perturbed_leaves = dict(flatten(perturbed, path)) if perturbed is not None else {}
    float32_leaves = dict(flatten(float32_run, path)) if float32_run is not None else {}
    v = Verdict()
    for (leaf, g), (_, b), (_, o) in zip(gold_leaves, baseline_leaves, got_leaves):
        g, b, o = np.asarray(g), np.asarray(b), np.asarray(o)
        if b.dtype.kind != "f":  # indices, masks, counts: exact
            v = v.merge(compare_exact(b, o, label, leaf))
            continue
        failed = _same_shape_and_kind(leaf, b, o, label, same_dtype=True)
        v = v.merge(failed or _compare_float_leaf(leaf, g, b, o, label, perturbed_leaves.get(leaf), float32_leaves.get(leaf)))
    return v
