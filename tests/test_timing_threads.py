"""experiments._timing.blas_threads limits the loaded BLAS (via threadpoolctl) and restores it."""

import numpy as np
from threadpoolctl import threadpool_info

from experiments._timing import blas_threads


def _blas_counts():
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


def test_blas_threads_sets_and_returns_the_previous_count():
    np.ones(2) @ np.ones(2)  # NumPy's BLAS is loaded
    before = _blas_counts()
    assert before, "no BLAS found by threadpoolctl"
    old = blas_threads(1)
    try:
        assert old == before[0]
        assert _blas_counts() == [1] * len(before)
    finally:
        assert blas_threads(old) == 1
    assert _blas_counts()[0] == before[0]
