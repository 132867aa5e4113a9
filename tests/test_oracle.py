"""The oracle must reject known-wrong implementations with readable messages, and accept the right ones."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from mllm_ref.cli import main
from mllm_ref.nn.attention import attention
from mllm_ref.nn.rmsnorm import rmsnorm
from mllm_ref.nn.softmax import softmax
from mllm_ref.oracle import registry
from mllm_ref.oracle.check import check
from mllm_ref.oracle.tolerance import compare_tolerance
from mllm_ref.oracle.vectors import check_against_vectors, read_vectors, write_vectors

# ---------------------------------------------------------------- known-wrong implementations


def zeros_attention(q, k, v, **kw):
    out = attention(q, k, v, **kw)
    return tuple(np.zeros_like(o) for o in out) if isinstance(out, tuple) else np.zeros_like(out)


def float16_attention(q, k, v, **kw):
    """Computes in float16 (as a kernel accumulating in half precision would), returns float32."""
    out = attention(q.astype(np.float16), k.astype(np.float16), v.astype(np.float16), **kw)
    return tuple(o.astype(q.dtype) for o in out) if isinstance(out, tuple) else out.astype(q.dtype)


def off_by_one_causal_attention(q, k, v, *, causal=False, key_mask=None, scale=None, return_weights=False):
    """Lets each query see one key too many (j <= i + 1) under the causal mask."""
    if not causal:
        return attention(q, k, v, key_mask=key_mask, scale=scale, return_weights=return_weights)
    b, hq, tq, d = q.shape
    tk = k.shape[2]
    g = hq // k.shape[1]
    kk, vv = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    s = q @ kk.transpose(0, 1, 3, 2) * (scale if scale is not None else 1 / np.sqrt(d))
    i = np.arange(tq)[:, None] + (tk - tq)
    allowed = np.arange(tk)[None, :] <= i + 1
    if key_mask is not None:
        allowed = allowed[None] & key_mask[:, None, :]
        allowed = allowed[:, None]
    s = np.where(allowed, s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    w = np.exp(s - m)
    w = w / np.maximum(w.sum(-1, keepdims=True), 1e-30)
    out = (w @ vv).astype(q.dtype)
    return (out, w.astype(q.dtype)) if return_weights else out


def unscaled_attention(q, k, v, *, scale=None, **kw):
    """Forgets the 1/sqrt(d) scale."""
    return attention(q, k, v, scale=1.0, **kw)


def rmsnorm_without_weight(x, weight, eps=1e-6):
    return rmsnorm(x, np.ones_like(weight), eps=eps)


@pytest.mark.parametrize(
    "impl, words",
    [
        (zeros_attention, "exceed the allowed error"),
        (float16_attention, "exceed the allowed error"),
        (off_by_one_causal_attention, "exceed the allowed error"),
        (unscaled_attention, "exceed the allowed error"),
    ],
    ids=["all-zeros", "float16-accumulation", "off-by-one-causal-mask", "missing-scale"],
)
def test_checker_rejects_wrong_attention(impl, words):
    verdict = check("nn.attention", impl)
    assert not verdict.passed
    assert words in verdict.message
    assert "got" in verdict.message and "expected" in verdict.message  # the first bad values are shown
    assert verdict.mismatches > 0 and verdict.max_abs_error > 0


def test_checker_rejects_a_missing_weight_and_a_wrong_dtype():
    assert not check("nn.rmsnorm", rmsnorm_without_weight).passed
    v = check("nn.softmax", lambda x, axis=-1: softmax(x.astype(np.float64), axis))
    assert not v.passed and "dtype float64, expected float32" in v.message


def test_checker_reports_exceptions_and_mutation():
    def boom(**kw):
        raise RuntimeError("kernel launch failed")

    v = check("nn.softmax", boom)
    assert not v.passed and "RuntimeError: kernel launch failed" in v.message

    def mutating(x, axis=-1):
        out = softmax(x, axis)
        x[...] = 0
        return out

    v = check("nn.softmax", mutating)
    assert not v.passed and "modified its input" in v.message


def _topk_reference(scores, k):
    """Indices of the k largest scores, largest first; ties go to the lower index (a stable sort)."""
    return np.argsort(-scores, kind="stable")[:k]


def _topk_wrong_tiebreak(scores, k):
    """Ties go to the higher index."""
    n = scores.shape[0]
    return (n - 1 - np.argsort(-scores[::-1], kind="stable"))[:k]


def test_checker_rejects_a_wrong_tie_break(monkeypatch):
    tech = registry.Technique(
        id="tokens.topk_for_test",
        reference=_topk_reference,
        make_case=lambda size, rng: {"scores": rng.integers(0, 3, 20).astype(np.float32), "k": 5},
        paper="a test fixture",
        test_sizes=("a", "b", "c"),
        compare="exact",
    )
    monkeypatch.setitem(registry._REGISTRY, tech.id, tech)
    assert check(tech.id, _topk_reference).passed
    v = check(tech.id, _topk_wrong_tiebreak)
    assert not v.passed and "differ (exact comparison)" in v.message


def test_the_noise_floor_does_not_collapse_when_the_baseline_is_exact():
    gold = np.array([1.0, 2.0, 4.0])
    base = gold.astype(np.float32)  # exact: its error is 0
    good = (gold * (1 + 1e-7)).astype(np.float32)
    assert compare_tolerance(gold, base, good).passed
    assert not compare_tolerance(gold, base, np.zeros(3, np.float32)).passed
    tiny = gold * 1e-30
    assert not compare_tolerance(tiny, tiny.astype(np.float32), np.zeros(3, np.float32)).passed


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("tid", ["nn.softmax", "nn.rmsnorm", "nn.layernorm", "nn.rope", "nn.attention"])
def test_checker_accepts_the_fast_paths(tid, backend):
    assert check(tid, backend).passed


# ---------------------------------------------------------------- golden vectors


def test_vectors_round_trip_and_judge_without_the_reference(tmp_path):
    manifest_path = write_vectors("nn.attention", tmp_path)
    manifest = json.loads(manifest_path.read_text())
    assert manifest["id"] == "nn.attention" and manifest["tolerance"]["K"] > 0
    _, cases = read_vectors(tmp_path)
    assert len(cases) == len(registry.get("nn.attention").test_sizes)
    for case in manifest["cases"]:
        with np.load(tmp_path / case["file"], allow_pickle=False) as npz:
            assert all(npz[k].dtype != object for k in npz.files)
    assert check_against_vectors(tmp_path, "kernels_numba.nn.attention:attention").passed
    assert not check_against_vectors(tmp_path, zeros_attention).passed
    npz = tmp_path / manifest["cases"][0]["file"]
    npz.write_bytes(npz.read_bytes() + b"x")
    with pytest.raises(ValueError, match="sha256"):
        read_vectors(tmp_path)


# ---------------------------------------------------------------- the command line


def test_list_json_has_the_coverage_keys(capsys):
    assert main(["list", "--json"]) == 0
    rows = {r["id"]: r for r in json.loads(capsys.readouterr().out)}
    keys = {"id", "family", "paper", "reference", "numba", "torch", "chapter", "exercise"}
    assert all(keys <= set(r) for r in rows.values())
    assert rows["nn.attention"]["numba"] == "kernels_numba.nn.attention:attention"
    assert rows["nn.attention"]["torch"] == "kernels_torch.nn.attention:attention"
    assert rows["system.latency"]["numba"] is None


def test_check_command(capsys, tmp_path):
    assert main(["check", "nn.attention", "--impl", "torch", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"id", "impl", "passed", "cases", "max_abs_error", "max_rel_error", "message"} <= set(out)
    assert out["passed"] is True
    wrong = tmp_path / "wrong.py"
    wrong.write_text("import numpy as np\ndef attention(q, k, v, **kw):\n    return np.zeros(q.shape[:3] + v.shape[3:], q.dtype)\n")
    assert main(["check", "nn.attention", "--impl", f"{wrong}:attention"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_cli_errors_are_readable(capsys):
    assert main(["check", "nn.nothing", "--impl", "numba"]) == 2
    err = capsys.readouterr().err
    assert "no technique 'nn.nothing'" in err and "nn.attention" in err
    assert main(["check", "system.latency", "--impl", "numba"]) == 2
    assert "no numba fast path" in capsys.readouterr().err


def test_vectors_command(tmp_path, capsys):
    assert main(["vectors", "nn.softmax", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "manifest.json").is_file()


def test_bench_quick_json(capsys):
    assert main(["bench", "nn.rmsnorm", "--json", "--quick"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["limits"]["bandwidth_gbs"] > 0 and out["limits"]["matmul_gflops"] > 0
    rows = out["rows"]
    assert {r["impl"] for r in rows} == {"reference", "numba", "torch"}
    for r in rows:
        assert {"id", "impl", "size", "seconds", "ratio_to_reference", "achieved", "limit", "unit"} <= set(r)
        assert r["seconds"] > 0


# ---------------------------------------------------------------- NumPy only


def test_the_reference_package_imports_numpy_only():
    code = """
import importlib, pkgutil, sys
before = set(sys.modules)
import mllm_ref
for m in pkgutil.walk_packages(mllm_ref.__path__, "mllm_ref."):
    if m.name.split(".")[1] in ("cli", "viz"):
        continue
    importlib.import_module(m.name)
third = {n.split(".")[0] for n in set(sys.modules) - before} - set(sys.stdlib_module_names)
print(sorted(n for n in third if not n.startswith("_") and n not in ("mllm_ref", "numpy")))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
