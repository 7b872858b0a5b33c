"""Array namespace selection.

``array_namespace(*xs)`` returns :mod:`autograd.numpy` when any argument (or leaf of a pytree
argument) is an autograd ``Box``, :mod:`cupy` when any is a CuPy array (looked up in
``sys.modules``, never imported here), the namespace of any other array-API array
(``x.__array_namespace__()``, e.g. ``array_api_strict``), and :mod:`numpy` otherwise
(:mod:`flowmath.gpu` measures which paths really run on another namespace). Library code
written against the returned namespace runs on NumPy and under autograd; autograd
differentiates NumPy only.
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
    """The array module to compute with for the given arrays or pytrees: autograd's NumPy if
    any leaf is traced, else CuPy for a CuPy array, else the namespace of any other array that
    implements the array API standard (``__array_namespace__``), else NumPy."""
    cupy = sys.modules.get("cupy")
    found = None
    for tree in xs:
        for leaf in leaves(tree):
            if isinstance(leaf, Box):
                return anp
            if cupy is not None and isinstance(leaf, cupy.ndarray):
                found = cupy
            elif (
                found is None
                and not isinstance(leaf, (np.ndarray, np.generic))
                and hasattr(leaf, "__array_namespace__")
            ):
                found = leaf.__array_namespace__()
    return np if found is None else found


def to_numpy(x):
    """A NumPy copy of ``x`` (unboxes autograd tracers, moves CuPy arrays to the host)."""
    x = getval(x)
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(x, cupy.ndarray):
        return cupy.asnumpy(x)
    return np.asarray(x)
