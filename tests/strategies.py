"""Hypothesis strategies shared by the tests.

Shapes favour the sizes that break kernels: 1, odd and prime lengths. Float arrays are finite and bounded; their
magnitude is drawn as a power of two over a wide range, so a rule that only works near 1 is caught.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

#: Lengths that break blocked kernels: 1, small odd and prime numbers, and one either side of a power of two.
AWKWARD_SIDES = (1, 2, 3, 5, 7, 13, 17, 31, 33, 63, 65)


def shapes(min_dims: int = 1, max_dims: int = 3) -> st.SearchStrategy[tuple[int, ...]]:
    """Array shapes whose sides come from :data:`AWKWARD_SIDES` (at most 3 dimensions keep arrays small)."""
    return st.lists(st.sampled_from(AWKWARD_SIDES), min_size=min_dims, max_size=max_dims).map(tuple)


def float_arrays(
    dtype=np.float64, shape=None, *, min_exponent: int = -20, max_exponent: int = 20, nonzero: bool = False
) -> st.SearchStrategy[np.ndarray]:
    """Finite arrays of ``dtype``: values 0 or of magnitude in [2**-12, 1], times ``2**e`` with ``e`` drawn once
    per array in ``[min_exponent, max_exponent]`` (a dynamic range of 2**12 within an array, a wide one between
    arrays). ``shape`` is a tuple, a strategy, or ``None`` for :func:`shapes`. ``nonzero``: an all-zero draw gets
    a 1 in its first element."""
    shape = shapes() if shape is None else shape
    width = 8 * np.dtype(dtype).itemsize
    values = st.one_of(st.just(0.0), st.floats(2**-12, 1, width=width), st.floats(-1, -(2**-12), width=width))

    def scaled(unit_and_exponent):
        unit, exponent = unit_and_exponent
        if nonzero and not unit.any():
            unit.flat[0] = 1
        return (unit * 2.0**exponent).astype(dtype)

    return st.tuples(hnp.arrays(dtype, shape, elements=values), st.integers(min_exponent, max_exponent)).map(scaled)


def nested(leaves: st.SearchStrategy) -> st.SearchStrategy:
    """An output as a technique may return it: a leaf, a tuple of leaves, or a dict of leaves."""
    return st.one_of(
        leaves,
        st.tuples(leaves, leaves),
        st.dictionaries(st.sampled_from(["keys", "values", "scores"]), leaves, min_size=1, max_size=3),
    )
