"""Golden test vectors: a technique's seeded cases on disk, for runtimes in other languages.

``write_vectors("nn.attention", "out/")`` writes one ``<id>__<size>.npz`` per test case and a ``manifest.json``.
Each npz holds only arrays (it loads with ``allow_pickle=False``):

- ``in.<name>``: every array argument, as the reference was called;
- ``gold.<path>``: the reference's outputs computed in float64 (for "exact" techniques: the outputs as given);
- ``baseline.<path>``: the reference's outputs in the inputs' own precision (the naive baseline of the
  tolerance policy).

The manifest names the technique, the library version, the paper, the comparison mode and the tolerance
constants, and for every case the file, its sha256, the shapes and dtypes of the array arguments and the values of
the others. :func:`check_against_vectors` judges an implementation from the files alone, without the reference.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

import mllm_ref
from mllm_ref.oracle import registry, tolerance
from mllm_ref.oracle.check import resolve_impl, upcast
from mllm_ref.oracle.tolerance import Verdict, compare_exact, compare_tolerance, flatten

FORMAT = "mllm-ref-vectors/1"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _scalar(v):
    if isinstance(v, (np.integer, np.floating, np.bool_)):
        return v.item()
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"argument of type {type(v).__name__} cannot be written to a manifest")


def write_vectors(technique_id: str, out_dir, seed: int = 0) -> Path:
    """Write the golden vectors of ``technique_id`` into ``out_dir``; returns the manifest's path."""
    technique = registry.get(technique_id)
    if technique.compare not in ("exact", "tolerance"):
        raise ValueError(f"{technique_id} is judged by an invariant checker; it has no golden outputs to write")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cases = []
    for size, kwargs in technique.cases("test", seed):
        arrays, args = {}, {}
        for name, value in kwargs.items():
            if isinstance(value, np.ndarray):
                arrays[f"in.{name}"] = value
                args[name] = {"shape": list(value.shape), "dtype": str(value.dtype)}
            else:
                args[name] = {"value": _scalar(value)}
        baseline = technique.reference(**kwargs)
        gold = baseline if technique.compare == "exact" else technique.reference(**upcast(technique, kwargs))
        outputs = []
        for prefix, result in (("gold", gold), ("baseline", baseline)):
            for path, leaf in flatten(result):
                arrays[f"{prefix}.{path}"] = np.asarray(leaf)
                if prefix == "gold":
                    outputs.append(path)
        file = out / f"{technique_id}__{size}.npz"
        np.savez(file, **arrays)
        cases.append({"size": size, "file": file.name, "sha256": _sha256(file), "args": args, "outputs": outputs})
    manifest = {
        "format": FORMAT,
        "id": technique_id,
        "library_version": mllm_ref.__version__,
        "paper": technique.paper,
        "reference": technique.reference_path,
        "compare": technique.compare,
        "seed": seed,
        "tolerance": {
            "rule": "max|impl - gold| <= K * max|baseline - gold| + C * eps(precision) * max|gold| + tiny(precision)",
            "K": tolerance.K,
            "C": tolerance.C,
        },
        "cases": cases,
    }
    path = out / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def read_vectors(in_dir) -> tuple[dict, list[tuple[str, dict, dict, dict]]]:
    """``(manifest, [(size, kwargs, gold, baseline), ...])``, verifying every file's sha256."""
    folder = Path(in_dir)
    manifest = json.loads((folder / "manifest.json").read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{folder / 'manifest.json'} is not a {FORMAT} manifest")
    cases = []
    for case in manifest["cases"]:
        file = folder / case["file"]
        if _sha256(file) != case["sha256"]:
            raise ValueError(f"{file} does not match its sha256 in the manifest")
        with np.load(file, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
        kwargs = {}
        for name, spec in case["args"].items():
            kwargs[name] = data[f"in.{name}"] if "shape" in spec else spec["value"]
        gold = {p: data[f"gold.{p}"] for p in case["outputs"]}
        baseline = {p: data[f"baseline.{p}"] for p in case["outputs"]}
        cases.append((case["size"], kwargs, gold, baseline))
    return manifest, cases


def check_against_vectors(in_dir, impl) -> Verdict:
    """Judge ``impl`` (a callable or ``module:function``) with the vectors in ``in_dir`` alone."""
    manifest, cases = read_vectors(in_dir)
    technique = registry.get(manifest["id"])
    fn, _ = resolve_impl(technique, impl)
    verdict = Verdict()
    for size, kwargs, gold, baseline in cases:
        label = f"case {size!r}: "
        try:
            got = fn(**kwargs)
        except Exception as exc:
            verdict = verdict.merge(Verdict(False, 1, np.inf, np.inf, 1, f"{label}raised {type(exc).__name__}: {exc}"))
            continue
        got_leaves = dict(flatten(got))
        if set(got_leaves) != set(gold):
            v = Verdict(False, 1, np.inf, np.inf, 1, f"{label}outputs {sorted(got_leaves)}, expected {sorted(gold)}")
        elif manifest["compare"] == "exact":
            v = compare_exact([gold[p] for p in sorted(gold)], [got_leaves[p] for p in sorted(gold)], label)
        else:
            keys = sorted(gold)
            v = compare_tolerance([gold[p] for p in keys], [baseline[p] for p in keys], [got_leaves[p] for p in keys], label)
        v.cases = 1
        verdict = verdict.merge(v)
    return verdict
