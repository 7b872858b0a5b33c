"""The registry of every layer: one ``Case`` per constructor and input shape.

Each module ``tests/cases/*.py`` defines ``CASES``, a list of :class:`Case`; the contract tests
(``tests/test_contract.py``) run every case through ``check_bijection`` in float64 and float32,
gradient checks of a flow's log-likelihood, and the bad-input checks. A new layer is checked the
moment it is registered.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable
from pathlib import Path

import numpy as np


def normal_data(rng, shape):
    return rng.normal(size=shape)


def unit_interval_data(rng, shape):
    return rng.uniform(0.02, 0.98, size=shape)


@dataclasses.dataclass(frozen=True)
class Case:
    """A layer to check.

    make : builds the layer (called afresh for each example).
    shape : the event shape to check at (keep it tiny: the dense Jacobian is brute force).
    data : draws inputs in the layer's forward domain.
    tol64 / tol32 : relative tolerance of ``check_bijection`` in float64 / float32. The float64
        default 1e-12 is set from the measured errors: every exact layer measures <= 4e-15
        (12 draws per case, the worst IResBlock-exact-linear's round trip), a margin of 250; a
        layer whose figures are limited by a solver tolerance states its own (CNF: 1e-9).
    needs_rng : pass an ``rng`` (stochastic layers).
    grads : run ``check_grads`` on the flow's mean log-likelihood w.r.t. the parameters.
    float32 : also check float32 inputs.
    """

    id: str
    make: Callable
    shape: tuple
    data: Callable = normal_data
    tol64: float = 1e-12
    tol32: float = 2e-3
    needs_rng: bool = False
    grads: bool = True
    float32: bool = True


def all_cases() -> list[Case]:
    cases = []
    folder = Path(__file__).parent / "cases"
    for info in sorted(pkgutil.iter_modules([str(folder)]), key=lambda i: i.name):
        module = importlib.import_module(f"cases.{info.name}")
        cases.extend(module.CASES)
    ids = [c.id for c in cases]
    dupes = {i for i in ids if ids.count(i) > 1}
    assert not dupes, f"duplicate case ids: {dupes}"
    return cases


__all__ = ["Case", "all_cases", "normal_data", "unit_interval_data", "np"]
