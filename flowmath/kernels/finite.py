"""Count the non-finite entries of an array in one pass (numba kernel, NumPy reference twin).

``numpy.all(numpy.isfinite(x))`` makes two passes and writes a boolean temporary of ``x``'s
size; on a 256 x 48 x 16 x 16 float32 batch it costs 0.8-1.1 ms here, half of the 1x1
convolution it guards. The kernel reads the IEEE-754 bit pattern instead: an entry is NaN or
infinite exactly when all of its exponent bits are set,

.. math:: \\text{non-finite}(x) \\iff (\\mathrm{bits}(x) \\,\\&\\, E) = E, \\qquad
    E = \\texttt{0x7F800000} \\ (\\text{float32}), \\ \\texttt{0x7FF0000000000000}
    \\ (\\text{float64}),

an integer test whose count LLVM vectorises (0.2 ms on the same batch). Non-contiguous or
non-float inputs, and CuPy arrays, take the reference twin.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["count_nonfinite", "count_nonfinite_reference"]

#: The exponent bits of float32 / float64: all set means inf or NaN.
_EXP = {
    np.dtype(np.float32): np.uint32(0x7F800000),
    np.dtype(np.float64): np.uint64(0x7FF0000000000000),
}
_UINT = {np.dtype(np.float32): np.uint32, np.dtype(np.float64): np.uint64}


@numba.njit(cache=True, nogil=True)
def _count(bits, exp):
    """Entries of ``bits`` (the floats viewed as unsigned integers) whose exponent is ``exp``."""
    count = 0
    for i in range(bits.size):
        count += (bits[i] & exp) == exp
    return count


def count_nonfinite_reference(x) -> int:
    """Plain-array twin: ``x.size - count_nonzero(isfinite(x))``."""
    return int(x.size - np.count_nonzero(np.isfinite(x)))


def count_nonfinite(x) -> int:
    """Number of NaN or infinite entries of the array ``x`` (0 for integer arrays)."""
    if isinstance(x, np.ndarray) and x.flags.c_contiguous and x.size:
        exp = _EXP.get(x.dtype)
        if exp is not None:
            return int(_count(x.reshape(-1).view(_UINT[x.dtype]), exp))
    return count_nonfinite_reference(x)
