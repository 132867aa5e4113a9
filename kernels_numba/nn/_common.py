"""Shared settings of the :mod:`kernels_numba.nn` kernels (private).

``FASTMATH`` is the set of LLVM fast-math flags the kernels use. It allows reassociation (so that sums and
maxima vectorise into several partial accumulators), contraction into FMAs, reciprocal division and ignoring the
sign of zero. It deliberately leaves out ``nnan`` and ``ninf``: the inputs are checked finite, but intermediate
values can still overflow (``x * x`` of a float32 above 1.8e19), and with those flags LLVM could then return
anything instead of the IEEE result; and ``afn``, which would let LLVM replace ``sqrt`` by a rough estimate.

``BLOCK`` is the length of the blocks of the two-level float32 sums: each block is summed in vectorised partial
sums, and the block sums are added in order. The rounding error then grows like BLOCK/lanes + n/BLOCK instead of
n/lanes, comparable to NumPy's pairwise summation, while every operation stays in the input precision.

``PARALLEL_MIN`` is the element count above which a kernel uses its ``parallel=True`` twin: a parallel region
costs about 2 us to start (PERF-NOTES.md section 6), worth it only for kernels of about 50 us or more.
"""

from numba import njit

FASTMATH = {"reassoc", "contract", "arcp", "nsz"}
BLOCK = 512
PARALLEL_MIN = 1 << 17


def native(a):
    """``a`` in the machine's byte order (Numba compiles only native-order arrays); ``a`` itself when it already is.

    A big-endian array (read from a file written elsewhere) is valid input to the references; without this Numba
    fails deep inside its type inference.
    """
    return a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))


@njit(fastmath=FASTMATH)
def row_max(xr):
    """Maximum of a 1-D array (length >= 1) with eight independent running maxima.

    A single ``m = v if v > m else m`` loop compiles to a serial chain of compares: LLVM vectorises float max
    reductions only with function-level no-NaN attributes, which Numba does not set. Eight independent chains over
    a contiguous slice run about 3x faster (PERF-NOTES.md, "Numba codegen traps").
    """
    n = xr.shape[0]
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = xr[0]
    j = 0
    while j + 8 <= n:
        xs = xr[j : j + 8]
        m0 = xs[0] if xs[0] > m0 else m0
        m1 = xs[1] if xs[1] > m1 else m1
        m2 = xs[2] if xs[2] > m2 else m2
        m3 = xs[3] if xs[3] > m3 else m3
        m4 = xs[4] if xs[4] > m4 else m4
        m5 = xs[5] if xs[5] > m5 else m5
        m6 = xs[6] if xs[6] > m6 else m6
        m7 = xs[7] if xs[7] > m7 else m7
        j += 8
    m = max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))
    for jj in range(j, n):
        v = xr[jj]
        m = v if v > m else m
    return m


@njit(fastmath=FASTMATH)
def blocked_sum(xr):
    """Sum of a 1-D array in the array's precision, two-level (see ``BLOCK`` above)."""
    total = xr.dtype.type(0.0)
    for j0 in range(0, xr.shape[0], BLOCK):
        xs = xr[j0 : j0 + BLOCK]  # index loops over slices vectorise; "for v in slice" does not
        part = xr.dtype.type(0.0)
        for j in range(xs.shape[0]):
            part += xs[j]
        total += part
    return total
