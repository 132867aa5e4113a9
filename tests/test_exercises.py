"""The exercises and their autograder (``mllm-ref grade``, ``mllm-ref exercise``).

Self-check of every exercise folder: the references themselves get full marks through the same grading functions
(in-process: the solution is the reference, no second copy), and every known-wrong submission of ``wrong/`` fails
through the real sandboxed subprocess with a helpful message. Then the sandbox: infinite loops, floods of output,
imports of mllm_ref, crashes, memory blow-ups, the blank stub and notebooks.
"""

from __future__ import annotations

import csv
import json
import textwrap
from pathlib import Path

import pytest

from mllm_ref import cli
from mllm_ref.oracle import grade as grade_mod
from mllm_ref.oracle.grade import find_exercise, grade, list_exercises, load_exercise, submission_source
from mllm_ref.oracle.grading import GRADING_TECHNIQUES, grade_callable, technique_for
from mllm_ref.oracle.registry import OracleError

EXERCISES = list_exercises()
WRONG = [(ex, w) for ex in EXERCISES for w in sorted((ex / "wrong").glob("*.py"))]
TIMEOUT = 20  # generous for a loaded machine; the tests of the time limit itself use a short one


def _write(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def test_there_are_exercises_and_each_folder_is_complete():
    assert [p.name for p in EXERCISES][:2] == ["01-softmax-attention", "02-kv-cache-decoding"]
    for ex in EXERCISES:
        for name in ("statement.md", "student.py", "exercise.json"):
            assert (ex / name).is_file(), f"{ex.name} lacks {name}"
        assert len(list((ex / "wrong").glob("*.py"))) >= 2, f"{ex.name} needs at least two wrong/ fixtures"
        spec = load_exercise(ex)
        student = (ex / "student.py").read_text()
        for task in spec["tasks"]:
            assert {"name", "function", "technique_id", "points"} <= set(task)
            assert f"def {task['function']}(" in student
            technique_for(task["technique_id"])  # a known id
        assert "# TODO" in student and "NotImplementedError" in student
        assert "mllm_ref" not in "".join(ln for ln in student.splitlines() if ln.startswith(("import", "from")))


@pytest.mark.parametrize("exercise", EXERCISES, ids=lambda p: p.name)
def test_the_reference_gets_full_marks(exercise):
    """The solution is the reference: graded in-process through the same task logic (the oracle's self-check)."""
    for task in load_exercise(exercise)["tasks"]:
        tid = task["technique_id"]
        reference = technique_for(tid).reference
        verdict = grade_callable(tid, reference)
        assert verdict.passed, verdict.message


def test_the_student_signatures_match_the_references():
    import importlib.util
    import inspect

    for ex in EXERCISES:
        spec = importlib.util.spec_from_file_location(f"_stub_{ex.name[:2]}", ex / "student.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for task in load_exercise(ex)["tasks"]:
            ref = technique_for(task["technique_id"]).reference
            stub = getattr(module, task["function"])
            assert list(inspect.signature(stub).parameters) == list(inspect.signature(ref).parameters)


@pytest.mark.parametrize("exercise,wrong", WRONG, ids=lambda p: p.name)
def test_known_wrong_submissions_fail_with_a_helpful_message(exercise, wrong):
    result = grade(exercise, wrong, timeout=TIMEOUT)
    assert result["score"] < result["max_score"]
    failed = [t for t in result["tasks"] if not t["passed"]]
    # at least one task fails on the comparison itself (not only on a stub), with the case and a hint
    compared = [t for t in failed if "FAILED on" in t["message"]]
    assert compared, result
    for t in compared:
        assert "case '" in t["message"] and "hint:" in t["message"]
        assert "expected" in t["message"] or "shape" in t["message"]


def test_specific_mistakes_are_named():
    ex1, ex2 = find_exercise("01"), find_exercise("02")
    unstable = grade(ex1, ex1 / "wrong" / "unstable_softmax.py", timeout=TIMEOUT)
    assert "got nan" in unstable["tasks"][0]["message"]
    forgets = grade(ex2, ex2 / "wrong" / "forgets_to_append.py", timeout=TIMEOUT)
    assert "shape (1, 2, 0, 4), expected (1, 2, 1, 4)" in forgets["tasks"][0]["message"]


def test_the_blank_stub_gets_zero_with_not_implemented_messages():
    for ex in EXERCISES:
        result = grade(ex, ex / "student.py", timeout=TIMEOUT)
        assert result["score"] == 0
        assert all("not implemented yet" in t["message"] for t in result["tasks"]), result


def test_an_infinite_loop_is_stopped_by_the_time_limit(tmp_path):
    sub = _write(tmp_path, "loop.py", """
        def softmax(x, axis=-1):
            while True:
                pass

        def attention(q, k, v, **kw):
            raise NotImplementedError
    """)
    result = grade("01", sub, timeout=4)
    assert result["score"] == 0
    msg = result["tasks"][0]["message"]
    assert "time limit of 4 s exceeded" in msg and "'softmax'" in msg
    assert "time limit" in result["tasks"][1]["message"]


def test_a_loop_at_import_time_is_stopped_too(tmp_path):
    sub = _write(tmp_path, "loop.py", "while True:\n    pass\n")
    result = grade("02", sub, timeout=3)
    assert result["score"] == 0 and "importing the submission" in result["tasks"][0]["message"]


def test_megabytes_of_output_are_truncated(tmp_path):
    sub = _write(tmp_path, "loud.py", """
        import sys
        print("x" * 10_000_000)
        sys.stderr.write("y" * 1_000_000)

        def softmax(x, axis=-1):
            raise NotImplementedError
    """)
    result = grade("01", sub, timeout=TIMEOUT)
    assert len(result["output"]) < 2 * grade_mod.OUTPUT_LIMIT
    assert "output truncated" in result["output"]
    assert "no function 'attention'" in result["tasks"][1]["message"]


@pytest.mark.parametrize(
    "source",
    [
        "from mllm_ref.nn.softmax import softmax\n",
        "import importlib\nsoftmax = importlib.import_module('mllm_ref.nn.softmax').softmax\n",
        # at call time, when the grader has already imported mllm_ref (sys.modules holds it)
        "def softmax(x, axis=-1):\n    from mllm_ref.nn.softmax import softmax as s\n    return s(x, axis)\n",
        "try:\n    import kernels_numba\nexcept ImportError:\n    pass\ndef softmax(x, axis=-1):\n    return x\n",
    ],
    ids=["top-level", "import_module", "inside-function", "kernels-caught"],
)
def test_importing_the_reference_is_refused(tmp_path, source):
    sub = _write(tmp_path, "cheat.py", source)
    result = grade("01", sub, timeout=TIMEOUT)
    assert result["score"] == 0
    msg = result["tasks"][0]["message"]
    assert "refused" in msg and ("mllm_ref" in msg or "kernels" in msg), msg


def test_crashes_exits_memory_and_network_are_failing_grades(tmp_path):
    syntax = _write(tmp_path, "syntax.py", "def softmax(x:\n")
    r = grade("01", syntax, timeout=TIMEOUT)
    assert r["score"] == 0 and "SyntaxError" in r["tasks"][0]["message"]

    exits = _write(tmp_path, "exits.py", "def softmax(x, axis=-1):\n    raise SystemExit(3)\n")
    r = grade("01", exits, timeout=TIMEOUT)
    assert "SystemExit" in r["tasks"][0]["message"] and len(r["tasks"]) == 2

    dies = _write(tmp_path, "dies.py", "import os\ndef softmax(x, axis=-1):\n    os._exit(7)\n")
    r = grade("01", dies, timeout=TIMEOUT)
    assert "ended unexpectedly (exit code 7)" in r["tasks"][0]["message"]

    hog = _write(tmp_path, "hog.py", "import numpy as np\ndef softmax(x, axis=-1):\n    return np.ones(10**10)\n")
    r = grade("01", hog, timeout=TIMEOUT, memory_mb=1024)
    assert "MemoryError" in r["tasks"][0]["message"]

    net = _write(tmp_path, "net.py", "import socket\ndef softmax(x, axis=-1):\n    socket.socket()\n")
    r = grade("01", net, timeout=TIMEOUT)
    assert "network access is disabled" in r["tasks"][0]["message"]


def test_a_notebook_is_graded_from_its_code_cells(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("# my answer"),
        nbformat.v4.new_code_cell("%matplotlib inline\n!pip install nothing\nimport numpy as np"),
        nbformat.v4.new_code_cell("def softmax(x, axis=-1):\n    return np.exp(x) / np.exp(x).sum(axis, keepdims=True)"),
    ]
    path = tmp_path / "answer.ipynb"
    nbformat.write(nb, path)
    source = submission_source(path)
    assert "%matplotlib" not in source and "!pip" not in source and "def softmax" in source
    result = grade("01", path, timeout=TIMEOUT)
    assert "got nan" in result["tasks"][0]["message"]  # the naive softmax, found and graded


def _toy_exercise(tmp_path: Path) -> Path:
    """A one-task exercise, to see full marks through the subprocess without keeping a solution anywhere."""
    ex = tmp_path / "99-toy"
    (ex / "wrong").mkdir(parents=True)
    (ex / "exercise.json").write_text(json.dumps({"tasks": [
        {"name": "softmax", "function": "softmax", "technique_id": "nn.softmax", "points": 1, "hint": "h"}]}))
    (ex / "statement.md").write_text("toy\n")
    (ex / "student.py").write_text("def softmax(x, axis=-1):\n    # TODO\n    raise NotImplementedError\n")
    _write(tmp_path, "good.py", """
        import numpy as np
        def softmax(x, axis=-1):
            e = np.exp(x - x.max(axis=axis, keepdims=True))
            return e / e.sum(axis=axis, keepdims=True)
    """)
    return ex


def test_cli_grade_json_exit_codes_and_csv(tmp_path, capsys):
    ex = _toy_exercise(tmp_path)
    assert cli.main(["grade", str(ex), str(tmp_path / "good.py"), "--json", "--timeout", str(TIMEOUT)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["score"] == out["max_score"] == 1 and out["exercise"] == "99-toy"
    assert set(out["tasks"][0]) >= {"name", "passed", "message"}

    assert cli.main(["grade", str(ex), str(ex / "student.py"), "--timeout", str(TIMEOUT)]) == 1
    assert "FAIL softmax" in capsys.readouterr().out

    folder = tmp_path / "subs"
    folder.mkdir()
    (folder / "a.py").write_text((tmp_path / "good.py").read_text())
    (folder / "b.py").write_text((ex / "student.py").read_text())
    (folder / "notes.txt").write_text("not a submission")
    scores = tmp_path / "scores.csv"
    assert cli.main(["grade", str(ex), str(folder), "--csv", str(scores), "--timeout", str(TIMEOUT)]) == 0
    rows = list(csv.reader(scores.open()))
    assert rows == [["file", "score", "max_score"], ["a.py", "1", "1"], ["b.py", "0", "1"]]


def test_cli_errors_are_messages_not_tracebacks(tmp_path, capsys):
    assert cli.main(["grade", "no-such-exercise", "x.py"]) == 2
    assert "is not an exercise" in capsys.readouterr().err
    assert cli.main(["grade", "01", str(tmp_path / "missing.py")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(OracleError):
        submission_source(_write(tmp_path, "answer.txt", "x"))


def test_cli_exercise_writes_the_handout_without_wrong(tmp_path, capsys):
    out = tmp_path / "handout"
    assert cli.main(["exercise", "01-softmax-attention", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["statement.md", "student.py"]
    blank = tmp_path / "blank"
    assert cli.main(["exercise", "02", "--out", str(blank), "--blank"]) == 0
    assert [p.name for p in blank.iterdir()] == ["student.py"]
    assert (blank / "student.py").read_text() == (find_exercise("02") / "student.py").read_text()


def test_grading_techniques_are_not_registered():
    from mllm_ref.oracle import registry

    known = {t.id for t in registry.all_techniques()}
    assert not known & set(GRADING_TECHNIQUES)
