"""Fused tanh and its derivatives for the built-in ODE dynamics (numba kernel, autograd primitive,
NumPy reference twin), and the per-machine choice between the kernel and ``numpy.tanh``.

The MLP fields of :mod:`flowmath.ode.dynamics` spend most of their time in ``tanh``, and they
need ``1 - tanh^2`` and ``-2 tanh (1 - tanh^2)`` besides. The kernel computes all of them in one
pass from one ``exp``:

.. math:: \\tanh x = \\operatorname{sign}(x)\\, \\frac{1 - e^{-2|x|}}{1 + e^{-2|x|}}, \\qquad
    \\tanh' = 1 - \\tanh^2, \\qquad \\tanh'' = -2 \\tanh \\cdot \\tanh'.

Its absolute error is below ``2.3e-16`` (one ulp of 1); the relative error near 0 is larger
(``|x| * eps`` absolute, e.g. 4e-13 relative at ``x = 1e-3``), which is harmless where the value
enters sums with O(1) terms, as in every MLP layer.

**Which one runs.** NumPy (1.22 and later) has a SIMD ``tanh`` (a port of Intel's SVML) that it
dispatches to only on CPUs with fused multiply-add in one of its targets: x86-64 with AVX2 + FMA3
(``X86_V3``) or AVX-512 (``X86_V4``, ``AVX512_SKX``), AArch64 (``ASIMD``), POWER (``VSX2`` and
later), IBM Z (``VX``). There ``numpy.tanh`` beats the kernel (AMD EPYC, AVX-512, 1024 x 64
float64: 114-140 us against 330-546 us; the kernel's scalar ``exp`` is not vectorised); without
it (``X86_V2`` baseline, scalar libm at 50-100 ns per value) the kernel is about 3x faster than
``numpy.tanh`` plus the derivatives. :data:`USE_KERNEL` is decided once at import from NumPy's
own dispatch record (:func:`numpy_has_simd_tanh`), never from a timing, so results are the same
on every run of a machine; the two paths agree to the kernel's error above. Tests flip the flag
to exercise both.

- :func:`tanh` is an autograd primitive (VJP ``g * (1 - ans^2)``, written in ``autograd.numpy``,
  so higher derivatives work).
- :func:`tanh_derivs` returns ``(tanh, tanh', tanh'')`` (or the first two) for the fused VJPs.
- :func:`tanh_reference` / :func:`tanh_derivs_reference` are the plain NumPy twins (and the path
  for CuPy arrays).
"""

from __future__ import annotations

import math

import numba
import numpy as np
from autograd.extend import defvjp, primitive

__all__ = [
    "USE_KERNEL",
    "numpy_has_simd_tanh",
    "tanh",
    "tanh_derivs",
    "tanh_derivs_reference",
    "tanh_reference",
]

# NumPy dispatch targets with fused multiply-add: where its SIMD tanh is compiled in
_FMA_TARGETS = frozenset(
    {"FMA3", "X86_V3", "X86_V4", "AVX512F", "AVX512_SKX", "AVX512_CLX", "AVX512_CNL"}
    | {"AVX512_ICL", "AVX512_SPR", "ASIMD", "NEON_VFPV4", "VSX2", "VSX3", "VSX4", "VX", "VXE"}
    | {"VXE2"}
)


def numpy_has_simd_tanh() -> bool:
    """Whether NumPy's float64 ``tanh`` loop runs its SIMD implementation on this machine.

    Read from NumPy's record of the loop it dispatched to (``numpy.lib.introspect.opt_func_info``,
    NumPy >= 2.1; before that, the CPU features of its build): true where that target has fused
    multiply-add (module docstring), the condition under which NumPy compiles its SIMD ``tanh``.
    """
    try:
        from numpy.lib.introspect import opt_func_info

        loops = opt_func_info(func_name="^tanh$", signature="^float64$").get("tanh", {})
        current = next(iter(loops.values()))["current"]
    except (ImportError, AttributeError, KeyError, StopIteration, TypeError):  # NumPy < 2.1
        try:
            from numpy._core import _multiarray_umath as umath
        except ImportError:  # pragma: no cover - NumPy 1.x
            from numpy.core import _multiarray_umath as umath
        features = umath.__cpu_features__
        active = set(umath.__cpu_baseline__)
        active |= {t for t in umath.__cpu_dispatch__ if features.get(t)}
        return bool(active & _FMA_TARGETS)
    if current.startswith("baseline"):
        from numpy._core import _multiarray_umath as umath

        return bool(set(umath.__cpu_baseline__) & _FMA_TARGETS)
    return current in _FMA_TARGETS


#: ``True``: :func:`tanh` and :func:`tanh_derivs` run the numba kernel; ``False``: NumPy's SIMD
#: ``tanh`` (the reference twins). Set at import by :func:`numpy_has_simd_tanh`.
USE_KERNEL: bool = not numpy_has_simd_tanh()


@numba.njit(cache=True)
def _tanh_kernel(x, h, d1, d2, order):
    xf = x.ravel()
    hf = h.ravel()
    d1f = d1.ravel()
    d2f = d2.ravel()
    for i in range(xf.size):
        v = xf[i]
        e = math.exp(-2.0 * abs(v))
        r = (1.0 - e) / (1.0 + e)
        if v < 0.0:
            r = -r
        hf[i] = r
        if order >= 1:
            s = 1.0 - r * r
            d1f[i] = s
            if order >= 2:
                d2f[i] = -2.0 * r * s


def _real(x):
    """``x`` as a float64 / float32 array (other real dtypes become float64, as in the kernel)."""
    x = np.asarray(x)
    if x.dtype.kind not in "fiub":  # a complex x would lose its imaginary part
        raise TypeError(f"`x` must be a real array; got dtype {x.dtype}")
    if x.dtype != np.float64 and x.dtype != np.float32:
        x = x.astype(np.float64)
    return x


def _run(x, order):
    x = np.ascontiguousarray(_real(x))
    if not USE_KERNEL:
        h = np.tanh(x)
        if order == 0:
            return h, h, h
        d1 = 1.0 - h * h
        return h, d1, (-2.0 * h * d1 if order >= 2 else h)
    h = np.empty_like(x)
    d1 = np.empty_like(x) if order >= 1 else h
    d2 = np.empty_like(x) if order >= 2 else h
    _tanh_kernel(x, h, d1, d2, order)
    return h, d1, d2


@primitive
def tanh(x):
    """``tanh(x)`` by the fused kernel or NumPy's SIMD ``tanh`` (:data:`USE_KERNEL`); NumPy
    arrays, differentiable by autograd."""
    return _run(x, 0)[0]


defvjp(tanh, lambda ans, x: lambda g: g * (1.0 - ans * ans))


def tanh_derivs(x, order: int = 2):
    """``(tanh x, tanh' x)`` for ``order=1``, ``(tanh x, tanh' x, tanh'' x)`` for ``order=2``
    (NumPy arrays, not differentiable)."""
    h, d1, d2 = _run(x, order)
    return (h, d1) if order == 1 else (h, d1, d2)


def tanh_reference(x):
    """NumPy twin of :func:`tanh`."""
    return np.tanh(x)


def tanh_derivs_reference(x, order: int = 2):
    """NumPy twin of :func:`tanh_derivs`."""
    h = np.tanh(x)
    d1 = 1.0 - h * h
    return (h, d1) if order == 1 else (h, d1, -2.0 * h * d1)
