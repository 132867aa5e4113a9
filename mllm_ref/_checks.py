"""Input validation shared by every reference.

Every public function of :mod:`mllm_ref` checks its inputs at the entry with these helpers, so that bad input
gets a ``TypeError`` or ``ValueError`` that names the argument and says what was expected, instead of a silent
broadcast, a NaN, or an error deep inside NumPy.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import numpy as np

FLOAT_DTYPES = (np.float16, np.float32, np.float64)


def _describe(x) -> str:
    if isinstance(x, np.ndarray):
        return f"array of shape {x.shape} and dtype {x.dtype}"
    return f"{type(x).__name__}"


def float_array(
    x,
    name: str,
    *,
    ndim: int | Sequence[int] | None = None,
    min_ndim: int | None = None,
    allow_nonfinite: bool = False,
    allow_empty: bool = False,
) -> np.ndarray:
    """Return ``x`` as a floating-point ndarray after checking it.

    Accepts float16/32/64 arrays (returned as they are, no copy) and Python/NumPy sequences of numbers (converted
    to float64). Rejects integer, boolean, complex and object arrays with a ``TypeError``; a wrong rank, an empty
    array or NaN/inf values (unless ``allow_nonfinite``) with a ``ValueError``.
    """
    if isinstance(x, np.ndarray):
        arr = x
    elif isinstance(x, (list, tuple)) or np.isscalar(x):
        try:
            arr = np.asarray(x, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} must be a float array, got {_describe(x)} that is not numeric") from exc
    else:
        raise TypeError(f"{name} must be a NumPy float array, got {_describe(x)}")
    if arr.dtype.type not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float16, float32 or float64, got {arr.dtype}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if arr.ndim not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got shape {arr.shape}")
    if min_ndim is not None and arr.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions, got shape {arr.shape}")
    if not allow_empty and arr.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {arr.shape}")
    if not allow_nonfinite and not all_finite(arr):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def all_finite(arr: np.ndarray) -> bool:
    """Whether a float array holds no NaN or infinity.

    One float64 sum reads the array once without allocating a mask: a NaN or infinity makes it non-finite. Only
    when the sum is not finite (a bad value, or a float64 overflow of huge finite values) is the element-wise test
    run to tell the two apart.
    """
    if np.isfinite(arr.sum(dtype=np.float64)):
        return True
    return bool(np.isfinite(arr).all())


def int_array(x, name: str, *, ndim: int | Sequence[int] | None = None, low=None, high=None) -> np.ndarray:
    """Return ``x`` as an integer ndarray, checking rank and the closed range ``[low, high]``."""
    if not isinstance(x, (np.ndarray, list, tuple)):
        raise TypeError(f"{name} must be an integer array, got {_describe(x)}")
    arr = np.asarray(x)
    if arr.size == 0 and arr.dtype == np.float64:  # an empty list
        arr = arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
        raise TypeError(f"{name} must have an integer dtype, got {arr.dtype}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if arr.ndim not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got shape {arr.shape}")
    if arr.size:
        if low is not None and arr.min() < low:
            raise ValueError(f"{name} must be >= {low}, got a minimum of {arr.min()}")
        if high is not None and arr.max() > high:
            raise ValueError(f"{name} must be <= {high}, got a maximum of {arr.max()}")
    return arr


def bool_array(x, name: str, *, shape: tuple | None = None) -> np.ndarray:
    """Return ``x`` as a boolean ndarray of the given ``shape`` (``None`` entries match any length)."""
    if not isinstance(x, np.ndarray) or x.dtype != np.bool_:
        raise TypeError(f"{name} must be a boolean NumPy array, got {_describe(x)}")
    if shape is not None:
        if x.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, x.shape)):
            want = tuple("*" if s is None else s for s in shape)
            raise ValueError(f"{name} must have shape {want}, got {x.shape}")
    return x


def integer(x, name: str, *, low: int | None = None, high: int | None = None) -> int:
    """Check a Python/NumPy integer scalar in ``[low, high]`` and return it as ``int``."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(x).__name__}")
    x = int(x)
    if low is not None and x < low:
        raise ValueError(f"{name} must be >= {low}, got {x}")
    if high is not None and x > high:
        raise ValueError(f"{name} must be <= {high}, got {x}")
    return x


def real(
    x,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Check a finite real scalar in the interval given by ``low``/``high`` (closed unless ``*_open``)."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    x = float(x)
    if not np.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    if low is not None and (x < low or (low_open and x == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {x}")
    if high is not None and (x > high or (high_open and x == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {x}")
    return x


def choice(x, name: str, options: Sequence) -> object:
    """Check that ``x`` is one of ``options``."""
    if x not in options:
        raise ValueError(f"{name} must be one of {list(options)}, got {x!r}")
    return x


def same_dtype(name_a: str, a: np.ndarray, name_b: str, b: np.ndarray) -> None:
    """Require two float arrays to share a dtype (references never mix precisions silently)."""
    if a.dtype != b.dtype:
        raise TypeError(f"{name_b} must have the same dtype as {name_a} ({a.dtype}), got {b.dtype}")


def dim(name: str, arr: np.ndarray, axis: int, expected: int, what: str) -> None:
    """Require ``arr.shape[axis] == expected``; ``what`` says where ``expected`` comes from."""
    if arr.shape[axis] != expected:
        raise ValueError(
            f"{name} must have size {expected} on axis {axis} ({what}), got shape {arr.shape}"
        )


def generator(rng, name: str = "rng") -> np.random.Generator:
    """Require an explicit ``numpy.random.Generator`` (no hidden global random state)."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"{name} must be a numpy.random.Generator, got {type(rng).__name__}")
    return rng
