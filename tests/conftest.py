"""Test configuration: Hypothesis profiles, a single BLAS thread, and a scratch registry for test techniques.

``HYPOTHESIS_PROFILE`` picks the profile: ``ci`` (the default when the ``CI`` variable is set, and what
``make test`` uses) is derandomized with 15 examples per property and prints the blob that reproduces a failure;
``dev`` (the default otherwise) draws 200. Neither has a deadline: the first call of a Numba kernel compiles it.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # small matrices; two test workers share two cores

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from mllm_ref.oracle import registry  # noqa: E402

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


@pytest.fixture
def scratch_registry(monkeypatch):
    """``register`` for the duration of one test: the techniques it adds are gone afterwards.

    The real techniques are loaded first, so the test sees them too and nothing is left half-loaded.
    """
    registry.load_all()
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    return registry.register


@pytest.fixture(scope="session")
def model():
    """The bundled tiny VLM, loaded once per test process."""
    from mllm_ref.tinyvlm.model import load

    return load()


@pytest.fixture(scope="session")
def site_is_built() -> bool:
    """Whether ``tests/test_book_site.py`` builds the book's site here (Chromium and Jupyter Book are present),
    executing every chapter: ``tests/test_book.py`` then leaves the chapters' execution to it."""
    import shutil
    import sys
    from pathlib import Path

    has_book = Path(sys.executable).with_name("jupyter-book").exists() or shutil.which("jupyter-book") is not None
    return shutil.which("chromium") is not None and has_book
