"""Numba fast paths of the :mod:`mllm_ref` references.

Mirroring. Every fast path lives at the module path of its reference with ``mllm_ref`` replaced by
``kernels_numba``, under the same function name and with the same signature: the reference
``mllm_ref.nn.softmax:softmax`` has the fast path ``kernels_numba.nn.softmax:softmax``. The oracle finds fast paths
by this rule alone (:meth:`mllm_ref.oracle.registry.Technique.fast_path`), so there is no second table to keep in
step.

Contract. A fast path takes and returns NumPy arrays, validates its input with the reference's own checks (the
``_validate`` helper of the reference module, built on :mod:`mllm_ref._checks`), so bad input raises the same
``TypeError``/``ValueError``; it computes in the input precision (float32 in, float32 arithmetic and float32 out)
and must agree with the reference under the oracle's tolerance policy. One exception: Numba has no float16
arithmetic on the CPU, so float16 input is computed in float32 and the result rounded once to float16.

Kernels are ``@njit(cache=True)``. Modules whose names start with an underscore hold shared helpers (a
vectorisable ``exp``, reductions, settings), not fast paths. Numba's cache is keyed on each kernel's own source
file: after editing a helper module, delete the ``__pycache__`` folders of :mod:`kernels_numba` (or touch the
kernel files) so that the kernels that inline it are recompiled.

Importing this package imports nothing else: each kernel module is compiled (or loaded from the cache) when it is
first imported and called.
"""
