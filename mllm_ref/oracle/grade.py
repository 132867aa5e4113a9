"""``mllm-ref grade``: grade a student's submission to an exercise, in a sandboxed subprocess.

An exercise is a folder ``exercises/<NN>-<name>/`` with ``statement.md`` (what to implement), ``student.py`` (the
stubs), ``exercise.json`` (the tasks: ``{name, function, technique_id, points, hint}``) and ``wrong/`` (known-wrong
submissions that the test suite checks are failed). The solution is the :mod:`mllm_ref` reference itself.

    grade("01-softmax-attention", "my_answer.py")           # or a .ipynb: its code cells, minus %magics and !shell
    grade_folder("01", "submissions/", csv_path="scores.csv")

The submission runs in a child process (:mod:`mllm_ref.oracle.grade_worker`) with a wall-clock time limit, an
address-space limit, no network, its output captured and truncated, and the ``mllm_ref`` package out of its reach.
Whatever it does (crash, loop forever, exhaust memory, print megabytes, raise ``NotImplementedError``) becomes a
failing grade with a readable message, never a crash of the grader.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from mllm_ref.oracle.registry import OracleError

__all__ = [
    "exercises_root",
    "find_exercise",
    "load_exercise",
    "list_exercises",
    "submission_source",
    "grade",
    "grade_folder",
    "format_result",
    "write_handout",
]

DEFAULT_TIMEOUT_S = 60.0
DEFAULT_MEMORY_MB = 2048
#: Characters of the submission's own output (and of the worker's stderr) kept in a grade.
OUTPUT_LIMIT = 20_000

_REPO_ROOT = Path(__file__).resolve().parents[2]
_WORKER = Path(__file__).resolve().with_name("grade_worker.py")


def exercises_root() -> Path:
    """The ``exercises/`` folder of the repository."""
    return _REPO_ROOT / "exercises"


def list_exercises() -> list[Path]:
    """Every exercise folder (one holding an ``exercise.json``), in order."""
    root = exercises_root()
    return sorted(p for p in root.iterdir() if (p / "exercise.json").is_file()) if root.is_dir() else []


def find_exercise(exercise: str | os.PathLike) -> Path:
    """The folder of ``exercise``: a path, a folder name under ``exercises/``, or its unique prefix (``"01"``)."""
    path = Path(exercise)
    if (path / "exercise.json").is_file():
        return path.resolve()
    candidates = [p for p in list_exercises() if p.name == str(exercise)]
    candidates = candidates or [p for p in list_exercises() if p.name.startswith(str(exercise))]
    if len(candidates) == 1:
        return candidates[0]
    known = ", ".join(p.name for p in list_exercises()) or "none"
    what = "is ambiguous" if candidates else "is not an exercise"
    raise OracleError(f"{str(exercise)!r} {what}; exercises: {known}")


def load_exercise(exercise: str | os.PathLike) -> dict:
    """``exercise.json`` of the exercise, with ``dir`` (its folder) and ``max_score`` added."""
    folder = find_exercise(exercise)
    spec = json.loads((folder / "exercise.json").read_text())
    spec["dir"] = str(folder)
    spec["max_score"] = sum(t.get("points", 1) for t in spec["tasks"])
    return spec


def submission_source(path: str | os.PathLike) -> str:
    """The Python source of a submission: a ``.py`` file as is; for a ``.ipynb``, its code cells joined, without
    the lines starting with ``%`` or ``!`` (IPython magics and shell commands)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"submission {path} does not exist")
    if path.suffix == ".ipynb":
        try:
            notebook = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise OracleError(f"{path} is not a valid notebook: {exc}") from exc
        cells = []
        for cell in notebook.get("cells", []):
            if cell.get("cell_type") != "code":
                continue
            source = cell.get("source", "")
            source = "".join(source) if isinstance(source, list) else source
            lines = [ln for ln in source.splitlines() if not ln.lstrip().startswith(("%", "!"))]
            cells.append("\n".join(lines))
        return "\n\n".join(cells) + "\n"
    if path.suffix != ".py":
        raise OracleError(f"a submission must be a .py or .ipynb file, got {path.name}")
    return path.read_text()


def _read_capped(path: Path, limit: int = OUTPUT_LIMIT) -> str:
    if not path.is_file():
        return ""
    size = path.stat().st_size
    with open(path, "rb") as f:
        text = f.read(limit).decode("utf-8", "replace")
    if size > limit:
        text += f"\n[... truncated: {size - limit} more bytes not shown]"
    return text


def grade(
    exercise: str | os.PathLike,
    submission: str | os.PathLike,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    memory_mb: int = DEFAULT_MEMORY_MB,
) -> dict:
    """Grade ``submission`` (a ``.py`` or ``.ipynb``) on ``exercise`` in a sandboxed child process.

    Returns ``{exercise, submission, score, max_score, tasks: [{name, function, passed, points, max_points,
    message}], output}``. ``output`` is what the submission printed (truncated).
    """
    spec = load_exercise(exercise)
    source = submission_source(submission)
    with tempfile.TemporaryDirectory(prefix="mllm_ref_grade_") as tmp:
        tmp = Path(tmp)
        sub_file = tmp / "submission.py"
        sub_file.write_text(source)
        result_file, out_file, err_file = tmp / "result.json", tmp / "stdout.txt", tmp / "stderr.txt"
        config = {
            "exercise_dir": spec["dir"],
            "submission": str(sub_file),
            "result": str(result_file),
            "repo_root": str(_REPO_ROOT),
            "memory_mb": memory_mb,
            "output_limit": OUTPUT_LIMIT,
        }
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        env.update({"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
        timed_out, returncode = False, None
        with open(out_file, "wb") as out, open(err_file, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", str(_WORKER)],
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=err,
                cwd=tmp,
                env=env,
                start_new_session=True,
            )
            try:
                proc.communicate(json.dumps(config).encode(), timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill(proc)
            returncode = proc.returncode
        try:
            partial = json.loads(result_file.read_text())
        except (OSError, json.JSONDecodeError):
            partial = {"tasks": [], "running": None, "import_error": None, "output": ""}
        stderr = _read_capped(err_file)
        printed = partial.get("output", "") or _read_capped(out_file)
    done = {t["name"]: t for t in partial["tasks"]}
    tasks = []
    for task in spec["tasks"]:
        entry = done.get(task["name"])
        if entry is None:
            running = partial.get("running")
            if timed_out:
                why = f"time limit of {timeout:g} s exceeded"
                where = f" while grading {running!r}" if running else ""
                hint = " (an infinite loop? a loop over far too many elements?)"
                message = f"{why}{where}{hint}; this task was not graded"
            else:
                last = stderr.strip().splitlines()[-1:] or [""]
                memory = " (out of memory?)" if "MemoryError" in stderr or returncode in (-9, 137) else ""
                message = (
                    f"the grading process ended unexpectedly (exit code {returncode}){memory}"
                    + (f" while grading {running!r}" if running else "")
                    + (f": {last[0]}" if last[0] else "")
                )
            entry = {"name": task["name"], "function": task["function"], "passed": False, "points": 0,
                     "max_points": task.get("points", 1), "message": message}
        tasks.append(entry)
    return {
        "exercise": Path(spec["dir"]).name,
        "submission": str(submission),
        "score": sum(t["points"] for t in tasks),
        "max_score": spec["max_score"],
        "tasks": tasks,
        "output": printed,
    }


def _kill(proc: subprocess.Popen) -> None:
    """Kill the worker and anything it started (its own session)."""
    try:
        os.killpg(proc.pid, 9)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait()


def format_result(result: dict) -> str:
    """The readable report of a grade."""
    lines = [f"{result['exercise']}: {result['submission']}: {result['score']}/{result['max_score']} points"]
    for t in result["tasks"]:
        mark = "PASS" if t["passed"] else "FAIL"
        lines.append(f"  {mark} {t['name']} ({t['points']}/{t['max_points']})")
        if not t["passed"]:
            lines += ["      " + ln for ln in t["message"].splitlines()]
    if result.get("output"):
        shown = result["output"] if len(result["output"]) <= 2000 else result["output"][:2000] + "\n[...]"
        lines += ["  the submission printed:"] + ["    " + ln for ln in shown.splitlines()]
    return "\n".join(lines)


def grade_folder(
    exercise: str | os.PathLike,
    folder: str | os.PathLike,
    *,
    csv_path: str | os.PathLike | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    memory_mb: int = DEFAULT_MEMORY_MB,
) -> list[dict]:
    """Grade every ``.py`` and ``.ipynb`` in ``folder``; optionally write ``file,score,max_score`` rows to a CSV."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix in (".py", ".ipynb") and p.is_file())
    results = [grade(exercise, f, timeout=timeout, memory_mb=memory_mb) for f in files]
    if csv_path is not None:
        with open(csv_path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "score", "max_score"])
            for path, r in zip(files, results):
                writer.writerow([path.name, r["score"], r["max_score"]])
    return results


def write_handout(exercise: str | os.PathLike, out: str | os.PathLike, *, blank: bool = False) -> list[Path]:
    """Copy the student-facing files (``statement.md``, ``student.py``; never ``wrong/``) into ``out``.

    With ``blank``, write only the blank submission ``student.py`` (the stubs as they are).
    """
    folder = find_exercise(exercise)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = ["student.py"] if blank else ["statement.md", "student.py"]
    written = []
    for name in names:
        shutil.copyfile(folder / name, out / name)
        written.append(out / name)
    return written
