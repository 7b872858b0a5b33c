"""Counters of the iterative work a computation performs (fixed-point iterations, ODE steps).

The iterative drivers (:func:`flowmath.layers.residual.solve_fixed_point` and the ODE driver
:func:`flowmath.ode.solve.integrate`) report what they did through :func:`record`; nothing is
kept unless a :func:`flowmath.testing.count_iterations` block is active in the same thread, so
the cost outside such a block is one attribute lookup per solve.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading

__all__ = ["IterationCounts", "count_iterations", "record"]

_LOCAL = threading.local()


@dataclasses.dataclass
class IterationCounts:
    """Iterative work counted inside a :func:`count_iterations` block.

    Attributes
    ----------
    fixed_point_solves, fixed_point_iterations : int
        Calls of the fixed-point solver and the evaluations of ``g`` they made.
    ode_solves, ode_steps, ode_nfe : int
        Calls of the ODE driver, the steps they attempted and their evaluations of the field.
    """

    fixed_point_solves: int = 0
    fixed_point_iterations: int = 0
    ode_solves: int = 0
    ode_steps: int = 0
    ode_nfe: int = 0

    @property
    def iterative(self) -> bool:
        """Whether anything iterative ran (a fixed-point iteration or an ODE solve)."""
        return self.fixed_point_solves > 0 or self.ode_solves > 0


def record(**counts: int) -> None:
    """Add ``counts`` (field names of :class:`IterationCounts`) to every active counter."""
    for active in getattr(_LOCAL, "stack", ()):
        for name, value in counts.items():
            setattr(active, name, getattr(active, name) + int(value))


@contextlib.contextmanager
def count_iterations():
    """Count the fixed-point iterations and ODE steps run inside the block (this thread).

    Yields
    ------
    IterationCounts
        Filled while the block runs; blocks may nest (each sees everything inside it).

    Examples
    --------
    >>> import numpy as np, flowmath as fm
    >>> rng = np.random.default_rng(0)
    >>> block = fm.IResBlock(hidden=(8,), logdet="exact")
    >>> x = rng.normal(size=(3, 2))
    >>> params = block.init(rng, x)
    >>> with fm.testing.count_iterations() as counts:
    ...     _ = block.inverse(params, x)
    >>> counts.fixed_point_solves, counts.fixed_point_iterations > 1, counts.ode_solves
    (1, True, 0)
    """
    stack = getattr(_LOCAL, "stack", None)
    if stack is None:
        stack = _LOCAL.stack = []
    counts = IterationCounts()
    stack.append(counts)
    try:
        yield counts
    finally:
        stack.remove(counts)
