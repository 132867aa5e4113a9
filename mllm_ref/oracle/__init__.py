"""The registry of techniques and the oracle built on it.

- :mod:`~mllm_ref.oracle.registry`: every technique once (reference, cases, comparison, paper, fast paths);
- :mod:`~mllm_ref.oracle.tolerance`: the tolerance policy, written once;
- :mod:`~mllm_ref.oracle.check`: judge any implementation against the reference;
- :mod:`~mllm_ref.oracle.vectors`: golden test vectors for runtimes in other languages;
- :mod:`~mllm_ref.oracle.bench`: timings of reference and fast paths against this machine's limits.
"""
