"""Golden vectors: written, read back with their checksums, and enough on their own to judge an implementation."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

import mllm_ref
from mllm_ref.oracle import registry
from mllm_ref.oracle.registry import OracleError, Technique
from mllm_ref.oracle.tolerance import C, K
from mllm_ref.oracle.vectors import check_against_vectors, read_vectors, write_vectors


@dataclass
class Scores:
    probs: np.ndarray
    best: np.ndarray


def scaled_softmax(x, temperature=1.0):
    """Softmax of ``x / temperature`` over the last axis, and the index of the largest entry of each row."""
    e = np.exp((x - x.max(axis=-1, keepdims=True)) / x.dtype.type(temperature))
    return Scores(e / e.sum(axis=-1, keepdims=True), np.argmax(x, axis=-1))


def _case(size, rng):
    rows = {"a": 2, "b": 5}[size]
    return {"x": rng.standard_normal((rows, 11)).astype(np.float32), "temperature": 0.7}


def rank(x):
    """Position of each entry in ascending order (ties by index)."""
    return np.argsort(np.argsort(x, kind="stable"), kind="stable")


@pytest.fixture
def techniques(scratch_registry):
    scratch_registry(Technique("nn.test_scaled_softmax", scaled_softmax, _case, "a test fixture", ("a", "b")))
    scratch_registry(
        Technique("tokens.test_rank", rank, lambda s, rng: {"x": rng.integers(0, 3, 12)}, "a test fixture", compare="exact")
    )
    scratch_registry(
        Technique("tokens.test_invariant", rank, lambda s, rng: {"x": np.arange(3)}, "a test fixture", compare=lambda r, g, i: (True, ""))
    )


def test_the_files_hold_arrays_only_and_the_manifest_says_everything(tmp_path, techniques):
    path = write_vectors("nn.test_scaled_softmax", tmp_path, seed=5)
    manifest = json.loads(path.read_text())
    assert manifest["id"] == "nn.test_scaled_softmax" and manifest["library_version"] == mllm_ref.__version__
    assert manifest["paper"] == "a test fixture" and manifest["compare"] == "tolerance" and manifest["seed"] == 5
    assert (manifest["tolerance"]["K"], manifest["tolerance"]["C"]) == (K, C)
    case = manifest["cases"][1]
    assert case["file"] == "nn.test_scaled_softmax__b.npz" and len(case["sha256"]) == 64
    assert case["args"] == {"x": {"shape": [5, 11], "dtype": "float32"}, "temperature": {"value": 0.7}}
    probs, best = case["outputs"]
    assert best == {"name": "out.best", "shape": [5], "dtype": "int64"}  # exact: no allowed error
    assert (probs["name"], probs["shape"], probs["dtype"]) == ("out.probs", [5, 11], "float32")
    assert 0 < probs["allowed"] < 1e-5
    with np.load(tmp_path / case["file"], allow_pickle=False) as npz:
        assert sorted(npz.files) == sorted(
            ["in.x"] + [f"{run}.out.{leaf}" for run in ("gold", "baseline", "perturbed") for leaf in ("best", "probs")]
        )
        assert npz["gold.out.probs"].dtype == np.float64 and npz["baseline.out.probs"].dtype == np.float32
        tech = registry.get("nn.test_scaled_softmax")
        np.testing.assert_array_equal(npz["in.x"], tech.cases("test", seed=5)[1][1]["x"])


def test_the_allowed_error_in_the_manifest_is_the_one_the_checker_applies(tmp_path, techniques):
    manifest = json.loads(write_vectors("nn.test_scaled_softmax", tmp_path).read_text())
    allowed = min(case["outputs"][0]["allowed"] for case in manifest["cases"])

    def off_by(delta):
        def impl(x, temperature):
            out = scaled_softmax(x.astype(np.float64), temperature)
            return Scores((out.probs + delta).astype(np.float32), out.best)

        return impl

    assert check_against_vectors(tmp_path, off_by(0.9 * allowed)).passed
    assert not check_against_vectors(tmp_path, off_by(1.1 * allowed)).passed


def test_float64_cases_carry_the_float32_run(tmp_path, scratch_registry):
    scratch_registry(Technique("nn.test_double_softmax", scaled_softmax, lambda s, rng: {"x": rng.standard_normal((2, 5))}, "p"))
    write_vectors("nn.test_double_softmax", tmp_path)
    _, (case,) = read_vectors(tmp_path)
    assert case.float32_run["out.probs"].dtype == np.float32 and case.perturbed["out.probs"].dtype == np.float64
    assert check_against_vectors(tmp_path, scaled_softmax).passed


def test_round_trip(tmp_path, techniques):
    write_vectors("nn.test_scaled_softmax", tmp_path)
    manifest, cases = read_vectors(tmp_path)
    assert [c.size for c in cases] == ["a", "b"]
    for case, (_, kwargs) in zip(cases, registry.get("nn.test_scaled_softmax").cases("test")):
        assert case.kwargs.keys() == kwargs.keys() and case.kwargs["temperature"] == 0.7
        np.testing.assert_array_equal(case.kwargs["x"], kwargs["x"])
        np.testing.assert_array_equal(case.baseline["out.probs"], scaled_softmax(**kwargs).probs)


def test_an_implementation_is_judged_from_the_files_alone(tmp_path, techniques, monkeypatch):
    write_vectors("nn.test_scaled_softmax", tmp_path)
    monkeypatch.delitem(registry._REGISTRY, "nn.test_scaled_softmax")  # no reference to fall back on
    assert check_against_vectors(tmp_path, scaled_softmax).passed

    def zeros(x, temperature):
        out = scaled_softmax(x, temperature)
        return Scores(np.zeros_like(out.probs), out.best)

    def wrong_argmax(x, temperature):
        return Scores(scaled_softmax(x, temperature).probs, np.argmin(x, axis=-1))

    def forgets_temperature(x, temperature):
        return scaled_softmax(x, 1.0)

    for wrong, words in [
        (zeros, "out.probs: 22 of 22 elements exceed the allowed error"),
        (wrong_argmax, "out.best"),
        (forgets_temperature, "exceed the allowed error"),
        (lambda x, temperature: scaled_softmax(x, temperature).probs, "the output has leaves ['out']"),
    ]:
        v = check_against_vectors(tmp_path, wrong)
        assert not v.passed and words in v.message, v.message


def test_exact_vectors_and_the_library_fast_paths(tmp_path, techniques):
    write_vectors("tokens.test_rank", tmp_path / "rank")
    assert check_against_vectors(tmp_path / "rank", rank).passed
    assert not check_against_vectors(tmp_path / "rank", lambda x: rank(x)[::-1].copy()).passed
    write_vectors("nn.attention", tmp_path / "attention")
    assert check_against_vectors(tmp_path / "attention", "numba").passed
    assert check_against_vectors(tmp_path / "attention", "kernels_torch.nn.attention:attention").passed


def test_tampering_and_impossible_requests_are_refused(tmp_path, techniques):
    manifest = json.loads(write_vectors("nn.test_scaled_softmax", tmp_path).read_text())
    npz = tmp_path / manifest["cases"][0]["file"]
    npz.write_bytes(npz.read_bytes() + b"x")
    with pytest.raises(OracleError, match="sha256"):
        read_vectors(tmp_path)
    with pytest.raises(OracleError, match="has no manifest.json"):
        read_vectors(tmp_path / "elsewhere")
    with pytest.raises(OracleError, match="invariant checker"):
        write_vectors("tokens.test_invariant", tmp_path / "x")


def weighted_layer(x, weights):
    """``tanh(x @ weights["w"] + weights["b"])``: a reference whose parameters come as a dict of named arrays, as a
    connector loading a checkpoint's state dict does."""
    return np.tanh(x @ weights["w"] + weights["b"])


def _weights_case(size, rng):
    d = {"a": 3, "b": 8}[size]
    return {
        "x": rng.standard_normal((4, d)).astype(np.float32),
        "weights": {"w": (rng.standard_normal((d, 5)) / np.sqrt(d)).astype(np.float32),
                    "b": rng.standard_normal(5).astype(np.float32), "steps": np.arange(3)},
    }


def test_a_dict_of_weights_is_cast_perturbed_written_and_read_back(tmp_path, scratch_registry):
    from mllm_ref.oracle.check import check, float_arg_names, perturb, upcast

    scratch_registry(Technique(id="nn.test_weighted_layer", reference=weighted_layer, make_case=_weights_case,
                               paper="test", test_sizes=("a", "b")))
    t = registry.get("nn.test_weighted_layer")
    kw = t.cases("test")[0][1]
    assert float_arg_names(t, kw) == ["x", "weights"]
    gold_in, nudged = upcast(t, kw), perturb(t, kw)
    assert gold_in["weights"]["w"].dtype == np.float64 and gold_in["weights"]["steps"].dtype == kw["weights"]["steps"].dtype
    moved = nudged["weights"]["w"] / kw["weights"]["w"].astype(np.float64) - 1
    assert np.allclose(np.abs(moved), np.finfo(np.float32).eps) and np.array_equal(nudged["weights"]["steps"], np.arange(3))
    assert check("nn.test_weighted_layer", weighted_layer).passed
    wrong = lambda x, weights: np.tanh(x @ weights["w"])  # noqa: E731  (forgets the bias)
    assert not check("nn.test_weighted_layer", wrong).passed

    write_vectors("nn.test_weighted_layer", tmp_path)
    manifest, cases = read_vectors(tmp_path)
    assert manifest["cases"][0]["args"]["weights"]["arrays"]["w"] == {"shape": [3, 5], "dtype": "float32"}
    assert set(cases[0].kwargs["weights"]) == {"w", "b", "steps"}
    np.testing.assert_array_equal(cases[1].kwargs["weights"]["w"], t.cases("test")[1][1]["weights"]["w"])
    assert check_against_vectors(tmp_path, weighted_layer).passed
    assert not check_against_vectors(tmp_path, wrong).passed
