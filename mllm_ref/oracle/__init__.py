"""The registry of techniques and the oracle built on it.

- :mod:`~mllm_ref.oracle.registry`: every technique once (reference, cases, comparison, paper, fast paths);
- :mod:`~mllm_ref.oracle.tolerance`: the tolerance policy, written once, and the :class:`Verdict`;
- :mod:`~mllm_ref.oracle.check`: judge any implementation against the reference (``check``);
- :mod:`~mllm_ref.oracle.vectors`: golden test vectors for runtimes in other languages;
- :mod:`~mllm_ref.oracle.machine`: this machine's measured memory bandwidth and matmul speed;
- :mod:`~mllm_ref.oracle.bench`: timings of the reference and the fast paths against those limits.

Everything here needs NumPy only; Numba and torch are imported by the fast paths themselves, when asked for.
"""
