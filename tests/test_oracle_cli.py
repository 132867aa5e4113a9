"""The oracle's commands, run in-process: output, exit codes and JSON keys."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mllm_ref.cli import COMMANDS, main
from mllm_ref.oracle.registry import Technique

LIST_KEYS = {"id", "family", "paper", "reference", "numba", "torch", "chapter", "exercise"}
CHECK_KEYS = {"id", "impl", "passed", "cases", "max_abs_error", "max_rel_error", "message"}
BENCH_KEYS = {"id", "impl", "size", "seconds", "ratio_to_reference", "achieved", "limit", "unit"}


def double(x):
    """Twice ``x``."""
    return 2 * x


@pytest.fixture
def doubling(scratch_registry):
    def case(size, rng):
        return {"x": rng.standard_normal({"small": 5, "bench": 1 << 16}[size]).astype(np.float32)}

    scratch_registry(
        Technique(
            "nn.test_double", double, case, "a test fixture", bench_sizes=("bench",),
            cost=lambda kw: {"flops": kw["x"].size, "bytes": 2 * kw["x"].nbytes},
        )
    )


def test_every_command_is_one_entry_of_the_table():
    for name in ("list", "check", "vectors", "bench"):
        add, run, help_text = COMMANDS[name]
        assert callable(add) and callable(run) and help_text


def test_list(capsys, doubling):
    assert main(["list", "--json"]) == 0
    rows = {r["id"]: r for r in json.loads(capsys.readouterr().out)}
    assert all(LIST_KEYS <= set(r) for r in rows.values())
    assert rows["nn.attention"]["reference"] == "mllm_ref.nn.attention:attention"
    assert rows["nn.attention"]["numba"] == "kernels_numba.nn.attention:attention"
    assert rows["nn.attention"]["torch"] == "kernels_torch.nn.attention:attention"
    assert rows["nn.test_double"]["numba"] is None and rows["nn.test_double"]["family"] == "nn"
    assert main(["list"]) == 0
    table = capsys.readouterr().out
    assert "nn.attention" in table and "nn.test_double" in table and "with a fast path" in table


def test_check_passes_with_json(capsys):
    assert main(["check", "nn.attention", "--impl", "torch", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert CHECK_KEYS <= set(out)
    assert (out["id"], out["impl"], out["passed"], out["cases"]) == ("nn.attention", "torch", True, 8)


def test_check_fails_with_exit_code_1(capsys, tmp_path, doubling):
    wrong = tmp_path / "wrong.py"
    wrong.write_text("def double(x):\n    return x + x + 1e-3\n\ndef broken(x):\n    raise RuntimeError('no')\n")
    assert main(["check", "nn.test_double", "--impl", f"{wrong}:double"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAIL nn.test_double: FAILED") and "exceed the allowed error" in out
    assert main(["check", "nn.test_double", "--impl", f"{wrong}:broken", "--json"]) == 1
    text = capsys.readouterr().out
    assert "Infinity" not in text  # strict JSON: an error that could not be measured is null
    out = json.loads(text)
    assert out["passed"] is False and out["max_abs_error"] is None and "RuntimeError: no" in out["message"]


@pytest.mark.parametrize(
    "argv, words",
    [
        (["check", "nn.nothing", "--impl", "numba"], ["no technique 'nn.nothing'", "nn.attention"]),
        (["check", "nn.test_double", "--impl", "numba"], ["nn.test_double has no numba fast path"]),
        (["check", "nn.attention", "--impl", "nope"], ["impl must be"]),
        (["vectors", "nn.nothing", "--out", "x"], ["no technique"]),
        (["bench", "nn.nothing"], ["no technique"]),
    ],
)
def test_mistakes_are_one_readable_line_and_exit_code_2(capsys, doubling, argv, words):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    for w in words:
        assert w in err


def test_vectors(tmp_path, capsys, doubling):
    assert main(["vectors", "nn.test_double", "--out", str(tmp_path)]) == 0
    assert "wrote 1 cases (nn.test_double__small.npz)" in capsys.readouterr().out
    assert json.loads((tmp_path / "manifest.json").read_text())["id"] == "nn.test_double"


def test_bench_json(capsys, doubling):
    assert main(["bench", "nn.test_double", "--json", "--quick"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["limits"]["bandwidth_gbs"] > 0 and out["limits"]["matmul_gflops"] > 0
    (row,) = out["rows"]
    assert BENCH_KEYS <= set(row)
    assert (row["id"], row["impl"], row["size"], row["ratio_to_reference"], row["unit"]) == (
        "nn.test_double", "reference", "bench", 1.0, "GB/s"
    )
    assert row["seconds"] > 0 and row["achieved"] > 0 and row["limit"] == out["limits"]["bandwidth_gbs"]
    assert "timing nn.test_double [bench] reference" in captured.err  # progress goes to stderr
