"""Test configuration: Hypothesis profiles and a single BLAS thread.

``HYPOTHESIS_PROFILE=ci`` (the default when the ``CI`` variable is set, and what ``make test`` uses) is
derandomized with a bounded number of examples; ``dev`` (the default otherwise) draws more.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # small matrices; two test workers share two cores

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=15,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
