import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# Deterministic by default (CI); HYPOTHESIS_PROFILE=explore for a randomised, longer search.
settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=10,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("explore", deadline=None, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def rng():
    return np.random.default_rng(20261129)


def pytest_terminal_summary(terminalreporter):
    """The fuzz's counts (tests/test_fuzz.py): cases tried, by outcome."""
    import sys

    fuzz = sys.modules.get("test_fuzz")
    counts = getattr(fuzz, "OUTCOMES", None)
    if counts:
        total = sum(counts.values())
        parts = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
        terminalreporter.write_line(f"fuzz: {total} cases tried ({parts})")
