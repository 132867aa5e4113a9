"""The tolerance policy, written once: when does an implementation agree with the reference?

For continuous outputs the gold is the reference computed in float64 (its float inputs cast up). A naive
same-precision baseline is the reference itself run on the inputs as given (float32, say): its distance to the
gold is the rounding error that precision cannot avoid. An implementation passes when, for every output array,

    max |impl - gold|  <=  K * max |baseline - gold|  +  C * eps(precision) * max |gold|  +  tiny

- ``K = 4``: a fast path may reorder sums, fuse operations or use a polynomial ``exp``; that costs a small factor
  over the naive baseline's error, never orders of magnitude. Float16 accumulation in a float32 path is
  ~1000 times worse and fails.
- The noise floor ``C * eps * max|gold|`` (``C = 16``) keeps the rule from collapsing when the baseline happens to
  be exact (its error 0), and it scales with the output, so an all-zeros output never passes: its error is
  ``max|gold|``, far above ``16 eps max|gold|``. The bound is never an absolute number alone.
- ``tiny`` (the smallest normal number of the precision) only lets an all-zero gold accept an all-zero answer.

Outputs must also agree in structure (the same nesting of tuples, lists, dicts or dataclass fields), shape, and
dtype (a float32 path returns float32), and in where they are NaN or infinite.

Discrete outputs (indices, codes, routes) use the exact mode: bit-for-bit equality with the reference run on the
inputs as given, since the reference fixes tie-breaking and rounding.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

K = 4.0
C = 16.0
MAX_REPORTED = 5


@dataclass
class Verdict:
    """The outcome of comparing an implementation with the reference over one or more cases."""

    passed: bool = True
    cases: int = 0
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    mismatches: int = 0
    message: str = ""

    def merge(self, other: "Verdict") -> "Verdict":
        msg = "\n".join(m for m in (self.message, other.message) if m)
        return Verdict(
            self.passed and other.passed,
            self.cases + other.cases,
            max(self.max_abs_error, other.max_abs_error),
            max(self.max_rel_error, other.max_rel_error),
            self.mismatches + other.mismatches,
            msg,
        )

    def to_json(self) -> dict:
        return {
            "passed": self.passed,
            "cases": self.cases,
            "max_abs_error": self.max_abs_error,
            "max_rel_error": self.max_rel_error,
            "message": self.message,
        }


def flatten(out, path: str = "out") -> list[tuple[str, object]]:
    """The leaves of an output: ``[(path, value), ...]`` through tuples, lists, dicts and dataclasses."""
    if isinstance(out, (tuple, list)):
        return [leaf for i, x in enumerate(out) for leaf in flatten(x, f"{path}[{i}]")]
    if isinstance(out, dict):
        return [leaf for k in sorted(out) for leaf in flatten(out[k], f"{path}[{k!r}]")]
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return [leaf for f in dataclasses.fields(out) for leaf in flatten(getattr(out, f.name), f"{path}.{f.name}")]
    return [(path, out)]


def _as_array(x) -> np.ndarray:
    return x if isinstance(x, np.ndarray) else np.asarray(x)


def _fmt(x) -> str:
    x = np.asarray(x)
    return f"{float(x):.7g}" if x.dtype.kind == "f" else str(x.item())


def _first_bad(bad: np.ndarray, got: np.ndarray, want: np.ndarray) -> str:
    idx = np.argwhere(bad)[:MAX_REPORTED]
    parts = []
    for i in idx:
        t = tuple(int(j) for j in i)
        parts.append(f"{t}: got {_fmt(got[t])}, expected {_fmt(want[t])}")
    return "; ".join(parts)


def compare_exact(want, got, label: str = "") -> Verdict:
    """Bit-exact comparison of every leaf (dtype kind, shape and values)."""
    v = Verdict(cases=0)
    wl, gl = flatten(want), flatten(got)
    if [p for p, _ in wl] != [p for p, _ in gl]:
        return Verdict(False, 0, np.inf, np.inf, 1, f"{label}output structure differs: expected {[p for p, _ in wl]}, got {[p for p, _ in gl]}")
    for (path, w), (_, g) in zip(wl, gl):
        w, g = _as_array(w), _as_array(g)
        if w.shape != g.shape:
            return Verdict(False, 0, np.inf, np.inf, 1, f"{label}{path}: shape {g.shape}, expected {w.shape}")
        if w.dtype.kind != g.dtype.kind:
            return Verdict(False, 0, np.inf, np.inf, 1, f"{label}{path}: dtype {g.dtype}, expected {w.dtype}")
        same = (w == g) | ((w != w) & (g != g)) if w.dtype.kind in "fc" else (w == g)
        if not np.all(same):
            bad = ~same
            n = int(bad.sum())
            diff = np.abs(w.astype(np.float64) - g.astype(np.float64)) if w.dtype.kind in "iufb" else np.array([np.inf])
            v.passed = False
            v.mismatches += n
            v.max_abs_error = max(v.max_abs_error, float(np.nanmax(diff)) if diff.size else np.inf)
            v.message += f"{label}{path}: {n} of {w.size} elements differ (exact comparison): {_first_bad(bad, g, w)}\n"
    v.message = v.message.rstrip()
    return v


def bound(gold: np.ndarray, baseline: np.ndarray, precision: np.dtype) -> tuple[float, float]:
    """``(allowed, baseline_error)``: the largest absolute error an implementation in ``precision`` may make on
    this output, and the naive same-precision baseline's own error."""
    fin = np.isfinite(gold)
    scale = float(np.max(np.abs(gold[fin]))) if fin.any() else 0.0
    base_err = float(np.max(np.abs(baseline[fin].astype(np.float64) - gold[fin]))) if fin.any() else 0.0
    info = np.finfo(precision)
    return K * base_err + C * float(info.eps) * scale + float(info.tiny), base_err


def compare_tolerance(gold, baseline, got, label: str = "") -> Verdict:
    """Compare ``got`` with the float64 ``gold`` under the policy, ``baseline`` being the same-precision reference."""
    v = Verdict()
    gl, bl, ol = flatten(gold), flatten(baseline), flatten(got)
    if [p for p, _ in gl] != [p for p, _ in ol]:
        return Verdict(False, 0, np.inf, np.inf, 1, f"{label}output structure differs: expected {[p for p, _ in gl]}, got {[p for p, _ in ol]}")
    for (path, g64), (_, base), (_, out) in zip(gl, bl, ol):
        g64, base, out = _as_array(g64), _as_array(base), _as_array(out)
        if out.shape != base.shape:
            v.passed = False
            v.mismatches += 1
            v.message += f"{label}{path}: shape {out.shape}, expected {base.shape}\n"
            continue
        if base.dtype.kind != "f":  # a non-float leaf (e.g. kept indices) must match exactly
            sub = compare_exact(base, out, label)
            v = v.merge(sub)
            continue
        if out.dtype != base.dtype:
            v.passed = False
            v.mismatches += 1
            v.message += f"{label}{path}: dtype {out.dtype}, expected {base.dtype} (the precision of the inputs)\n"
            continue
        o64 = out.astype(np.float64)
        nonfinite = ~np.isfinite(g64) | ~np.isfinite(o64)
        disagree = nonfinite & ~((g64 == o64) | (np.isnan(g64) & np.isnan(o64)))
        if disagree.any():
            v.passed = False
            v.mismatches += int(disagree.sum())
            v.message += f"{label}{path}: NaN/inf where the reference has none (or the reverse): {_first_bad(disagree, out, g64)}\n"
        fin = ~nonfinite
        if not fin.any():
            continue
        err = np.abs(o64 - g64)
        err[~fin] = 0.0
        allowed, base_err = bound(g64, base, base.dtype)
        scale = float(np.max(np.abs(g64[fin])))
        max_err = float(err.max())
        v.max_abs_error = max(v.max_abs_error, max_err)
        v.max_rel_error = max(v.max_rel_error, max_err / scale if scale > 0 else (0.0 if max_err == 0 else np.inf))
        bad = err > allowed
        if bad.any():
            v.passed = False
            v.mismatches += int(bad.sum())
            worst = tuple(int(i) for i in np.unravel_index(np.argmax(err), err.shape))
            v.message += (
                f"{label}{path}: {int(bad.sum())} of {err.size} elements exceed the allowed error {allowed:.3g} "
                f"(max abs error {max_err:.3g} at {worst}: got {_fmt(out[worst])}, expected {_fmt(g64[worst])}; "
                f"the naive {base.dtype} baseline's error is {base_err:.3g}). "
                f"First mismatches: {_first_bad(bad, out, g64)}\n"
            )
    v.message = v.message.rstrip()
    return v
