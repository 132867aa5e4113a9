"""The technique registry: every technique of the project is listed here once.

A technique module registers itself at import time::

    from mllm_ref.oracle.registry import Technique, register

    def _case(size: str, rng: np.random.Generator) -> dict:
        n = {"tiny": 3, "small": 17, "bench": 4096}[size]
        return {"x": rng.standard_normal((4, n)).astype(np.float32), "axis": -1}

    register(Technique(
        id="nn.softmax",
        reference=softmax,
        make_case=_case,
        test_sizes=("tiny", "small"),
        bench_sizes=("bench",),
        paper="...",
        compare="tolerance",
    ))

The registry knows each family's subpackage (:data:`FAMILIES`) and imports them on first use, so tests, the
command line, the benchmarks and the book see every technique without a second list to keep in step.

Fast paths are found by the mirrored module path: the reference ``mllm_ref.nn.softmax:softmax`` has the Numba
fast path ``kernels_numba.nn.softmax:softmax`` and the torch one ``kernels_torch.nn.softmax:softmax``, with the
same signature (NumPy arrays in, NumPy arrays out).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

#: Family subpackages of :mod:`mllm_ref`, in the surveys' order. A family listed here that does not exist yet is
#: skipped; a family that fails to import is an error.
FAMILIES: tuple[str, ...] = (
    "nn",
    "tokens",
    "attention",
    "connectors",
    "moe",
    "ssm",
    "adapt",
    "quant",
    "prune",
    "distill",
    "kvcache",
    "decoding",
    "dynamic",
    "system",
)

#: Backends a fast path may live in, with the package that mirrors :mod:`mllm_ref`.
BACKENDS: Mapping[str, str] = {"numba": "kernels_numba", "torch": "kernels_torch"}


class OracleError(ValueError):
    """A mistake in what the oracle was asked to do (an unknown id, an implementation that cannot be found, a
    technique with nothing to write); the command line prints its message without a traceback."""


class UnknownTechniqueError(OracleError, KeyError):
    """No technique is registered under the id; the message lists the known ids."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


#: How outputs are compared. "tolerance": continuous outputs under the tolerance policy
#: (:mod:`mllm_ref.oracle.tolerance`); "exact": bit-exact (discrete outputs: indices, codes, routes).
COMPARE_MODES = ("tolerance", "exact")


@dataclass(frozen=True)
class Technique:
    """One registered technique.

    Attributes:
        id: ``family.name``, e.g. ``"nn.softmax"``; the reference lives in ``mllm_ref/<family>/<name>.py``.
        reference: the NumPy reference function. Called with keyword arguments from ``make_case``.
        make_case: ``make_case(size, rng) -> dict`` of keyword arguments for ``reference``. ``size`` is one of
            ``test_sizes`` or ``bench_sizes``; all randomness comes from ``rng``.
        paper: citation, "Authors, Title, Venue Year (arXiv id)".
        test_sizes: names of small cases used by tests, ``check`` and golden vectors.
        bench_sizes: names of realistic cases used by ``bench``.
        compare: ``"tolerance"``, ``"exact"``, or a callable ``compare(reference_out, got, inputs) -> (passed,
            message)`` for outputs judged by invariants (``reference_out``: the reference on ``inputs`` as given).
        float_args: names of keyword arguments that are float arrays and follow the precision under test (cast
            to float64 for the gold and moved by one ulp for the perturbed run of the tolerance policy; the naive
            baseline takes them as given). ``None``: every float ndarray argument.
        strategy: zero-argument callable returning a Hypothesis strategy of keyword-argument dicts (imported
            lazily, so the registry itself needs NumPy only). ``None``: the generic test draws seeds and sizes.
        cost: ``cost(kwargs) -> {"flops": float, "bytes": float}`` for one call, used by ``bench`` to report
            achieved GFLOP/s or GB/s. ``None``: bench reports times only.
        chapter: path of the book chapter that teaches it (relative to the repository root), or ``None``.
        exercise: path of the exercise folder, or ``None``.
        model_level: ``True`` when the technique plugs into the tiny VLM and appears in ``mllm-ref tour``.
        notes: one line shown by ``list --json`` (e.g. a deviation from the paper).
        extra: per-technique settings read by the generic tests, e.g. ``{"allow_nonfinite": ("mask",)}`` for a
            float argument that legitimately holds -inf (see ``tests/test_bad_input.py``).
    """

    id: str
    reference: Callable[..., Any]
    make_case: Callable[[str, np.random.Generator], dict]
    paper: str
    test_sizes: Sequence[str] = ("small",)
    bench_sizes: Sequence[str] = ()
    compare: str | Callable[..., tuple[bool, str]] = "tolerance"
    float_args: Sequence[str] | None = None
    strategy: Callable[[], Any] | None = None
    cost: Callable[[dict], dict] | None = None
    chapter: str | None = None
    exercise: str | None = None
    model_level: bool = False
    notes: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.id.split(".", 1)[0]

    @property
    def name(self) -> str:
        return self.id.split(".", 1)[1]

    @property
    def reference_path(self) -> str:
        """``module:function`` of the reference."""
        return f"{self.reference.__module__}:{self.reference.__name__}"

    def fast_path_path(self, backend: str) -> str | None:
        """``module:function`` where the ``backend`` fast path must live (it may not exist); ``None`` when the
        reference itself lives outside :mod:`mllm_ref` (a technique registered by a test), which has no mirror."""
        if backend not in BACKENDS:
            raise OracleError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
        module = self.reference.__module__
        if not module.startswith("mllm_ref."):
            return None
        return f"{BACKENDS[backend]}.{module[len('mllm_ref.'):]}:{self.reference.__name__}"

    def fast_path(self, backend: str) -> Callable[..., Any] | None:
        """The ``backend`` fast path, or ``None`` if its module or function does not exist.

        A fast-path module that exists but fails to import for another reason than a missing backend package
        raises, so a broken kernel is never mistaken for a missing one.
        """
        path = self.fast_path_path(backend)
        if path is None:
            return None
        module_name, func_name = path.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            missing = exc.name or ""
            if module_name == missing or module_name.startswith(missing + ".") or missing in ("numba", "torch"):
                return None
            raise
        return getattr(module, func_name, None)

    def cases(self, kind: str = "test", seed: int = 0) -> list[tuple[str, dict]]:
        """Seeded cases: a list of ``(size, kwargs)``; ``kind`` is ``"test"`` or ``"bench"``."""
        if kind not in ("test", "bench"):
            raise OracleError(f"kind must be 'test' or 'bench', got {kind!r}")
        sizes = self.test_sizes if kind == "test" else self.bench_sizes
        out = []
        for i, size in enumerate(sizes):
            rng = np.random.default_rng([seed, i, _stable_hash(self.id)])
            out.append((size, self.make_case(size, rng)))
        return out


def _stable_hash(text: str) -> int:
    """A hash of ``text`` that does not change between processes (unlike ``hash``)."""
    h = 2166136261
    for byte in text.encode():
        h = ((h ^ byte) * 16777619) & 0xFFFFFFFF
    return h


_REGISTRY: dict[str, Technique] = {}
_LOADED = False


def register(technique: Technique) -> Technique:
    """Add ``technique`` to the registry; registering the same id twice is an error."""
    if not isinstance(technique, Technique):
        raise TypeError(f"technique must be a Technique, got {type(technique).__name__}")
    family, _, name = technique.id.partition(".")
    if not name or family not in FAMILIES:
        raise ValueError(f"technique id must be 'family.name' with family in {FAMILIES}, got {technique.id!r}")
    if not (isinstance(technique.compare, str) and technique.compare in COMPARE_MODES) and not callable(
        technique.compare
    ):
        raise ValueError(f"compare of {technique.id} must be one of {COMPARE_MODES} or a callable")
    old = _REGISTRY.get(technique.id)
    if old is not None and old.reference_path != technique.reference_path:
        raise ValueError(f"technique {technique.id} is registered twice ({old.reference_path})")
    _REGISTRY[technique.id] = technique
    return technique


def load_all() -> None:
    """Import every family subpackage so that its techniques register themselves."""
    global _LOADED
    if _LOADED:
        return
    for family in FAMILIES:
        try:
            importlib.import_module(f"mllm_ref.{family}")
        except ModuleNotFoundError as exc:
            if exc.name == f"mllm_ref.{family}":
                continue
            raise
    _LOADED = True


def get(technique_id: str) -> Technique:
    """The technique registered as ``technique_id``; an :class:`UnknownTechniqueError` (a ``KeyError``) lists the
    known ids."""
    load_all()
    try:
        return _REGISTRY[technique_id]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise UnknownTechniqueError(f"no technique {technique_id!r}; known: {known}") from None


def all_techniques(family: str | None = None) -> list[Technique]:
    """Every registered technique (optionally of one family), sorted by id."""
    load_all()
    items = sorted(_REGISTRY.values(), key=lambda t: t.id)
    if family is not None:
        items = [t for t in items if t.family == family]
    return items
