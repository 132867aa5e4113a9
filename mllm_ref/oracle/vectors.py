"""Golden test vectors: a technique's seeded test cases on disk, for runtimes in other languages.

``write_vectors("nn.attention", "out/")`` writes one ``nn.attention__<size>.npz`` per test case and one
``manifest.json``. Each npz holds arrays only (``np.savez``; it loads with ``allow_pickle=False``):

- ``in.<name>``: every array argument, exactly as the reference was called;
- ``gold.<leaf>``: the reference's outputs; for a "tolerance" technique computed from float64 copies of the float
  inputs, for an "exact" technique on the inputs as given;
- "tolerance" only: ``baseline.<leaf>`` (the naive run on the inputs as given), ``perturbed.<leaf>`` (the float64
  run on inputs moved by one ulp) and, for float64 inputs, ``float32.<leaf>`` (the run on float32 copies); the
  runs that the tolerance policy builds its bound from (:mod:`mllm_ref.oracle.tolerance`).

``<leaf>`` names a part of the output as :func:`~mllm_ref.oracle.tolerance.flatten` does: ``out`` for a single
array, ``out[0]``, ``out[1]`` for a tuple, ``out['key']`` for a dict, ``out.field`` for a dataclass.

The manifest holds the technique id, the library version, the paper, the comparison mode, the tolerance rule and
its constants, and per case: the file and its sha256, every argument (shape and dtype of arrays, the value of
scalars and strings) and every output leaf (shape, dtype and, for float leaves of a "tolerance" technique,
``allowed``: the largest ``max|impl - gold|`` that passes). A runtime in any language passes a case when each
float leaf is within ``allowed`` of the gold, with NaN and infinity in the same places, and every other leaf is
equal; for "exact", when every leaf is equal. Its outputs must have the listed dtypes.

:func:`check_against_vectors` does that check in Python from the files alone: the reference is never called.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import mllm_ref
from mllm_ref.oracle import registry, tolerance
from mllm_ref.oracle.check import ReferenceRuns, call_impl, reference_runs, resolve_impl, summarize
from mllm_ref.oracle.registry import OracleError
from mllm_ref.oracle.tolerance import Verdict, compare_exact, compare_tolerance, flatten

FORMAT = "mllm-ref-vectors/1"
MANIFEST = "manifest.json"


@dataclass
class VectorCase:
    """One case read back from disk: the arguments, and the reference's runs by output leaf name."""

    size: str
    kwargs: dict
    gold: dict[str, np.ndarray]
    baseline: dict[str, np.ndarray] | None = None  # "tolerance" only, like the two below
    perturbed: dict[str, np.ndarray] | None = None
    float32_run: dict[str, np.ndarray] | None = None  # float64 inputs only


#: npz prefix of each run of :class:`~mllm_ref.oracle.check.ReferenceRuns` besides the gold ("tolerance" only).
TOLERANCE_RUNS = {"baseline": "baseline", "perturbed": "perturbed", "float32_run": "float32"}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _describe_arg(name: str, value) -> dict:
    if isinstance(value, np.ndarray):
        return {"shape": list(value.shape), "dtype": str(value.dtype)}
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return {"value": value.item()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    if isinstance(value, dict) and value and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in value.items()):
        return {"arrays": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in value.items()}}
    raise OracleError(f"argument {name} of type {type(value).__name__} cannot be written as a golden vector")


def _outputs(runs: ReferenceRuns, tolerance_mode: bool) -> list[dict]:
    """The manifest's description of each output leaf, with the allowed error of float leaves."""
    perturbed = dict(flatten(runs.perturbed)) if runs.perturbed is not None else {}
    float32_run = dict(flatten(runs.float32_run)) if runs.float32_run is not None else {}
    outputs = []
    for (leaf, gold), (_, base) in zip(flatten(runs.gold), flatten(runs.baseline)):
        base = np.asarray(base)
        entry = {"name": leaf, "shape": list(base.shape), "dtype": str(base.dtype)}
        if tolerance_mode and base.dtype.kind == "f":
            b = tolerance.bound(np.asarray(gold, np.float64), base, base.dtype, perturbed.get(leaf), float32_run.get(leaf))
            entry["allowed"] = b.allowed
        outputs.append(entry)
    return outputs


def write_vectors(technique_id: str, out_dir, seed: int = 0) -> Path:
    """Write the golden vectors of every seeded test case of ``technique_id`` into ``out_dir``; returns the
    manifest's path."""
    technique = registry.get(technique_id)
    if technique.compare not in ("exact", "tolerance"):
        raise OracleError(f"{technique_id} is judged by an invariant checker: it has no golden outputs to write")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cases = []
    for size, kwargs in technique.cases("test", seed):
        args = {name: _describe_arg(name, value) for name, value in kwargs.items()}
        arrays = {f"in.{name}": value for name, value in kwargs.items() if isinstance(value, np.ndarray)}
        for name, value in kwargs.items():  # a dict of named weights: one npz entry per array
            if isinstance(value, dict):
                arrays.update({f"in.{name}/{key}": array for key, array in value.items()})
        runs = reference_runs(technique, kwargs)
        kept = {"gold": "gold", **(TOLERANCE_RUNS if technique.compare == "tolerance" else {})}
        for field, prefix in kept.items():
            result = getattr(runs, field)
            if result is not None:
                arrays.update({f"{prefix}.{leaf}": np.asarray(value) for leaf, value in flatten(result)})
        file = out / f"{technique_id}__{size}.npz"
        np.savez(file, **arrays)
        outputs = _outputs(runs, technique.compare == "tolerance")
        cases.append({"size": size, "file": file.name, "sha256": _sha256(file), "args": args, "outputs": outputs})
    manifest = {
        "format": FORMAT,
        "id": technique_id,
        "library_version": mllm_ref.__version__,
        "paper": technique.paper,
        "reference": technique.reference_path,
        "compare": technique.compare,
        "seed": seed,
        "tolerance": {"rule": tolerance.RULE, "K": tolerance.K, "C": tolerance.C},
        "cases": cases,
    }
    path = out / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def read_vectors(in_dir) -> tuple[dict, list[VectorCase]]:
    """``(manifest, cases)`` from a folder written by :func:`write_vectors`, after verifying every file's sha256."""
    folder = Path(in_dir)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise OracleError(f"{folder} has no {MANIFEST}")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT:
        raise OracleError(f"{manifest_path} is not a {FORMAT} manifest")
    cases = []
    for case in manifest["cases"]:
        file = folder / case["file"]
        if _sha256(file) != case["sha256"]:
            raise OracleError(f"{file} does not match its sha256 in the manifest")
        with np.load(file, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
        kwargs = {name: _read_arg(data, name, spec) for name, spec in case["args"].items()}
        leaves = [o["name"] for o in case["outputs"]]
        gold = {leaf: data[f"gold.{leaf}"] for leaf in leaves}
        runs = {
            field: {leaf: data[f"{prefix}.{leaf}"] for leaf in leaves}
            for field, prefix in TOLERANCE_RUNS.items()
            if leaves and f"{prefix}.{leaves[0]}" in data
        }
        cases.append(VectorCase(case["size"], kwargs, gold, **runs))
    return manifest, cases


def _read_arg(data: dict, name: str, spec: dict):
    if "shape" in spec:
        return data[f"in.{name}"]
    if "arrays" in spec:
        return {key: data[f"in.{name}/{key}"] for key in spec["arrays"]}
    return spec["value"]


def _judge(case: VectorCase, got, label: str) -> Verdict:
    """Compare one output with a case read from disk, leaf by leaf."""
    got_leaves = dict(flatten(got))
    if list(got_leaves) != list(case.gold):
        return Verdict.failure(f"{label}the output has leaves {list(got_leaves)}, expected {list(case.gold)}")
    v = Verdict()
    for leaf, gold in case.gold.items():
        if case.baseline is None:  # an "exact" technique
            v = v.merge(compare_exact(gold, got_leaves[leaf], label, leaf))
            continue
        others = {
            "perturbed": case.perturbed[leaf] if case.perturbed else None,
            "float32_run": case.float32_run[leaf] if case.float32_run else None,
        }
        v = v.merge(compare_tolerance(gold, case.baseline[leaf], got_leaves[leaf], label, leaf, **others))
    return v


def check_against_vectors(in_dir, impl) -> Verdict:
    """Judge ``impl`` with the vectors in ``in_dir`` alone, without calling the reference.

    ``impl`` is a callable, ``"module:function"`` or ``"file.py:function"``; ``"numba"``/``"torch"`` also work when
    the technique is registered here (they are found through the registry).
    """
    manifest, cases = read_vectors(in_dir)
    technique = registry.get(manifest["id"]) if isinstance(impl, str) and impl in registry.BACKENDS else None
    fn = resolve_impl(impl, technique)
    verdict, failed_cases = Verdict(), 0
    for case in cases:
        label = f"case {case.size!r}, "
        got, failed = call_impl(fn, case.kwargs, label)
        v = failed or _judge(case, got, label)
        v.cases = 1
        failed_cases += not v.passed
        verdict = verdict.merge(v)
    return summarize(manifest["id"], verdict, failed_cases)
