"""The sandboxed side of ``mllm-ref grade``: grade one submission in this (child) process.

Run by :mod:`mllm_ref.oracle.grade` as a script (``python -I .../grade_worker.py``, NOT ``-m``, so that no part of
:mod:`mllm_ref` is imported before the submission) with a JSON configuration on stdin::

    {"exercise_dir": ..., "submission": ".../submission.py", "result": ".../result.json",
     "repo_root": ..., "memory_mb": 2048, "output_limit": 20000}

In order, before the submission is imported:

1. the address-space limit (``RLIMIT_AS``) and a file-size limit are set, so a memory blow-up is a
   ``MemoryError`` and endless printing to the raw file descriptors is stopped;
2. ``socket.socket`` (and friends) are replaced by a function that raises: no network;
3. ``sys.stdout``/``sys.stderr`` become capped buffers (what the submission prints is kept up to
   ``output_limit`` characters and the rest counted);
4. an import guard (``builtins.__import__``, ``importlib.import_module`` and a ``sys.meta_path`` finder) refuses
   ``mllm_ref`` and ``kernels_*`` to any import made while a frame of the submission's file is on the stack, at
   import time and when its functions are called later: the reference answers cannot be read through imports.

Then the tasks of ``exercise.json`` are graded one by one with :func:`mllm_ref.oracle.grading.grade_callable`;
the result file is rewritten after each task (and names the task that is running), so that when the parent kills
this process at the time limit, the tasks already graded keep their grades.

This is a teaching grader, not a security boundary: a determined submission can still reach the reference through
``sys.modules`` or the file system once the grader has loaded it. Every attempt through an import is recorded and
fails the whole submission.
"""

from __future__ import annotations

import builtins
import importlib
import importlib.abc
import importlib.util
import io
import json
import os
import resource
import socket
import sys

_FORBIDDEN_ATTEMPTS: list[str] = []
_SUBMISSION_FILE = ""


class ForbiddenImportError(ImportError):
    """A submission tried to import the reference package or a fast path."""


def _blocked(name: str) -> bool:
    top = (name or "").split(".", 1)[0]
    return top == "mllm_ref" or top.startswith("kernels_")


def _from_submission() -> bool:
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename == _SUBMISSION_FILE:
            return True
        frame = frame.f_back
    return False


def _refuse(name: str):
    _FORBIDDEN_ATTEMPTS.append(name)
    raise ForbiddenImportError(
        f"import of {name!r} refused: a submission may not use the mllm_ref package or its kernels "
        "(they hold the reference answers); write the function yourself with NumPy"
    )


class _Guard(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if _blocked(fullname) and _from_submission():
            _refuse(fullname)
        return None


def _install_import_guard() -> None:
    original_import = builtins.__import__
    original_import_module = importlib.import_module

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and _blocked(name) and _from_submission():
            _refuse(name)
        return original_import(name, globals, locals, fromlist, level)

    def guarded_import_module(name, package=None):
        if _blocked(name) and _from_submission():
            _refuse(name)
        return original_import_module(name, package)

    builtins.__import__ = guarded_import
    importlib.import_module = guarded_import_module
    sys.meta_path.insert(0, _Guard())


def _block_network() -> None:
    def no_network(*args, **kwargs):
        raise OSError("network access is disabled while grading")

    socket.socket = no_network
    socket.create_connection = no_network
    socket.socketpair = no_network
    socket.getaddrinfo = no_network


class CappedOutput(io.TextIOBase):
    """A text stream that keeps the first ``limit`` characters written and counts the rest."""

    def __init__(self, limit: int):
        self.limit, self.parts, self.kept, self.dropped = limit, [], 0, 0

    def writable(self) -> bool:
        return True

    def write(self, s) -> int:
        s = str(s)
        room = self.limit - self.kept
        if room > 0:
            self.parts.append(s[:room])
            self.kept += min(len(s), room)
        self.dropped += max(0, len(s) - max(room, 0))
        return len(s)

    def getvalue(self) -> str:
        text = "".join(self.parts)
        if self.dropped:
            text += f"\n[... output truncated: {self.dropped} more characters not shown]"
        return text


def _set_limits(memory_mb: int, file_mb: int = 64) -> None:
    if memory_mb and memory_mb > 0:
        limit = int(memory_mb) * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_mb * 2**20, file_mb * 2**20))


def _write_result(path: str, result: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, path)


def _not_implemented(message: str) -> bool:
    return "raised NotImplementedError" in message


def main() -> int:
    global _SUBMISSION_FILE
    config = json.loads(sys.stdin.read())
    sys.argv = sys.argv[:1]
    exercise = json.loads(open(os.path.join(config["exercise_dir"], "exercise.json")).read())
    _SUBMISSION_FILE = os.path.abspath(config["submission"])
    result_path = config["result"]
    result = {"tasks": [], "running": None, "import_error": None, "output": ""}

    _set_limits(config.get("memory_mb", 2048))
    _block_network()
    real_stdout, real_stderr = sys.stdout, sys.stderr
    captured = CappedOutput(int(config.get("output_limit", 20000)))
    sys.stdout = sys.stderr = captured
    _install_import_guard()

    # 1. The submission, before anything of mllm_ref is imported.
    module = None
    result["running"] = "(importing the submission)"
    _write_result(result_path, result)
    try:
        spec = importlib.util.spec_from_file_location("submission", _SUBMISSION_FILE)
        module = importlib.util.module_from_spec(spec)
        sys.modules["submission"] = module
        spec.loader.exec_module(module)
    except BaseException as exc:  # a syntax error, a crash, sys.exit, a refused import: a failing grade
        module = None
        result["import_error"] = f"{type(exc).__name__}: {exc}"

    # 2. The grading machinery (allowed: these imports are not made from the submission's frames).
    sys.path.insert(0, config["repo_root"])
    from mllm_ref.oracle.grading import first_failure, grade_callable

    for task in exercise["tasks"]:
        name, points = task["name"], task.get("points", 1)
        entry = {"name": name, "function": task["function"], "passed": False, "points": 0, "max_points": points}
        result["running"] = name
        result["output"] = captured.getvalue()
        _write_result(result_path, result)
        if module is None:
            entry["message"] = f"the submission could not be loaded: {result['import_error']}"
        elif not callable(getattr(module, task["function"], None)):
            entry["message"] = f"the submission has no function {task['function']!r}"
        else:
            try:
                verdict = grade_callable(task["technique_id"], getattr(module, task["function"]))
                entry["passed"] = bool(verdict.passed)
                entry["message"] = verdict.message if verdict.passed else first_failure(verdict.message)
                if _not_implemented(verdict.message):
                    entry["message"] = f"not implemented yet: {task['function']} still raises NotImplementedError"
            except BaseException as exc:  # SystemExit, KeyboardInterrupt, MemoryError in the grader itself
                entry["message"] = f"grading stopped: {type(exc).__name__}: {exc}"
        if _FORBIDDEN_ATTEMPTS:
            entry["passed"] = False
            entry["message"] = (
                f"refused: the submission tried to import {', '.join(sorted(set(_FORBIDDEN_ATTEMPTS)))}; "
                "a submission may not use mllm_ref (the reference answers) or its kernels"
            )
        elif not entry["passed"] and task.get("hint"):
            entry["message"] += f"\nhint: {task['hint']}"
        entry["points"] = points if entry["passed"] else 0
        result["tasks"].append(entry)
    result["running"] = None
    result["output"] = captured.getvalue()
    _write_result(result_path, result)
    sys.stdout, sys.stderr = real_stdout, real_stderr
    return 0


if __name__ == "__main__":
    sys.exit(main())
