"""Array namespace selection.

``array_namespace(*xs)`` returns :mod:`autograd.numpy` when any argument (or leaf of a pytree
argument) is an autograd ``Box``, :mod:`cupy` when any is a CuPy array (looked up in
``sys.modules``, never imported here), and :mod:`numpy` otherwise.  Library code written against
the returned namespace therefore runs on NumPy, under autograd, and on CuPy for the forward and
inference paths (autograd differentiates NumPy only).
"""

from __future__ import annotations

import sys

import autograd.numpy as anp
import numpy as np
from autograd.tracer import Box, getval

from ._pytree import leaves

__all__ = ["array_namespace", "getval", "is_box", "leaves", "to_numpy"]


def is_box(x) -> bool:
    """True when ``x`` is an autograd tracer."""
    return isinstance(x, Box)


def array_namespace(*xs):
    """The array module to compute with for the given arrays or pytrees."""
    cupy = sys.modules.get("cupy")
    found_cupy = False
    for tree in xs:
        for leaf in leaves(tree):
            if isinstance(leaf, Box):
                return anp
            if cupy is not None and isinstance(leaf, cupy.ndarray):
                found_cupy = True
    if found_cupy:
        return cupy
    return np


def to_numpy(x):
    """A NumPy copy of ``x`` (unboxes autograd tracers, moves CuPy arrays to the host)."""
    x = getval(x)
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(x, cupy.ndarray):
        return cupy.asnumpy(x)
    return np.asarray(x)
