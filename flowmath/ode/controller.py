"""Step-size control of the adaptive drivers: the error norm, the step factor, the first step.

The local error estimate of a step is measured in the scaled root-mean-square norm over the
first ``m`` entries of the (flat) state,

.. math::

    \\|err\\| = \\Big(\\frac{1}{m} \\sum_{j=1}^{m}
        \\Big(\\frac{err_j}{atol_j + rtol_j \\max(|y_{n,j}|, |y_{n+1,j}|)}\\Big)^2\\Big)^{1/2},

(``rtol`` and ``atol`` scalars or per-component arrays), and the step is accepted when
``||err|| <= 1``.  The next step is ``h * factor`` with

.. math:: \\text{factor} = \\text{safety}\\; \\|err_n\\|^{-1/(q+1) + 0.75 \\beta}\\,
    \\|err_{n-1}\\|^{\\beta}

clipped to ``[min_factor, max_factor]`` (``q`` the lower order of the pair; no growth right
after a rejection).  ``beta = 0`` (the default) is the elementary controller of scipy's RK45;
``beta > 0`` is the PI controller of Hairer-Norsett-Wanner's DOPRI5 code (they use 0.04).

References
----------
Hairer, Norsett, Wanner (1993), *Solving Ordinary Differential Equations I*, Sec. II.4.
Gustafsson (1991), "Control theoretic techniques for stepsize selection in explicit
Runge-Kutta methods", ACM TOMS 17(4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from .._checks import check_positive

__all__ = ["MAX_FACTOR", "MIN_FACTOR", "SAFETY", "Controller", "rms", "select_initial_step"]

#: Safety factor of the step-size controller (the new step aims at SAFETY * the optimal one).
SAFETY = 0.9
#: Smallest ratio new step / old step the controller takes (after a rejection).
MIN_FACTOR = 0.2
#: Largest ratio new step / old step the controller takes.
MAX_FACTOR = 10.0


def _check_tolerance(value, name):
    """A tolerance: a real number or a real array (per component), finite; ``rtol > 0``."""
    if isinstance(value, np.ndarray) or isinstance(value, (list, tuple)):
        arr = np.asarray(value, dtype=np.float64) if np.size(value) else np.zeros(0)
        if arr.dtype.kind not in "iuf" or not np.all(np.isfinite(arr)):
            raise ValueError(f"`{name}` must be finite; got {value!r}")
        if arr.ndim == 0:
            return _check_tolerance(float(arr), name)
        if name == "rtol" and np.any(arr <= 0) or np.any(arr < 0):
            want = "> 0" if name == "rtol" else ">= 0"
            raise ValueError(f"`{name}` must be finite and {want} in every component; got {arr}")
        _check_floor(arr, name)
        arr = arr.copy()
        arr.setflags(write=False)
        return arr
    value = check_positive(value, name, allow_zero=name != "rtol")
    _check_floor(value, name)
    return value


_RTOL_FLOOR = 100 * float(np.finfo(np.float64).eps)


def _check_floor(rtol, name):
    if name != "rtol":
        return
    floor = _RTOL_FLOOR
    if isinstance(rtol, float) and floor <= rtol < 1:
        return
    if np.any(np.asarray(rtol) < floor):
        raise ValueError(
            f"`rtol` must be >= 100 * float64 eps = {floor:.3g} (smaller targets are below "
            f"rounding error); got {rtol!r}"
        )
    if np.any(np.asarray(rtol) >= 1):
        raise ValueError(f"`rtol` must be < 1; got {rtol!r}")


def rms(x):
    """Root mean square, scaled so that it does not overflow for entries up to float max."""
    if not x.size:
        return 0.0
    big = float(np.max(np.abs(x)))
    if big == 0.0 or not math.isfinite(big):
        return big
    y = x / big
    return big * math.sqrt(float(np.dot(y, y)) / x.size)


@dataclass(frozen=True)
class Controller:
    """Error control and step-size selection of the adaptive drivers (see the module docstring).

    Parameters
    ----------
    rtol, atol : float or array
        Relative and absolute tolerances; arrays are per component, broadcast to the state's
        shape.  ``rtol`` in ``[100 eps, 1)``, ``atol >= 0``.
    safety, min_factor, max_factor : float
        The controller's constants (defaults :data:`SAFETY`, :data:`MIN_FACTOR`,
        :data:`MAX_FACTOR`, as scipy's RK45).
    beta : float
        PI coefficient (0: elementary controller).

    Examples
    --------
    >>> from flowmath.ode import Controller
    >>> Controller(rtol=1e-6, atol=1e-9, beta=0.04).beta
    0.04
    >>> Controller(rtol=-1.0)
    Traceback (most recent call last):
    ...
    ValueError: `rtol` must be finite and > 0; got -1.0
    """

    rtol: float | np.ndarray = 1e-7
    atol: float | np.ndarray = 1e-9
    safety: float = SAFETY
    min_factor: float = MIN_FACTOR
    max_factor: float = MAX_FACTOR
    beta: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "rtol", _check_tolerance(self.rtol, "rtol"))
        object.__setattr__(self, "atol", _check_tolerance(self.atol, "atol"))
        safety = check_positive(self.safety, "safety")
        if safety > 1:
            raise ValueError(f"`safety` must be in (0, 1]; got {safety!r}")
        lo = check_positive(self.min_factor, "min_factor")
        hi = check_positive(self.max_factor, "max_factor")
        if not lo < 1 < hi:
            raise ValueError(f"`min_factor` < 1 < `max_factor` is required; got {lo!r} and {hi!r}")
        beta = check_positive(self.beta, "beta", allow_zero=True)
        if beta >= 0.2:
            raise ValueError(f"`beta` must be in [0, 0.2); got {beta!r}")
        for key, val in (("safety", safety), ("min_factor", lo), ("max_factor", hi)):
            object.__setattr__(self, key, val)
        object.__setattr__(self, "beta", beta)

    @property
    def per_component(self) -> bool:
        return isinstance(self.rtol, np.ndarray) or isinstance(self.atol, np.ndarray)

    def with_tolerances(self, rtol, atol) -> Controller:
        """The same controller with other tolerances (validated)."""
        return replace(self, rtol=rtol, atol=atol)

    def bind(self, shape, size: int, name: str = "y0"):
        """``(rtol, atol)`` for a flat state of ``size`` entries: scalars stay scalars, arrays
        are broadcast to ``shape`` (the state's) and raveled; a pytree state (``shape`` None)
        takes flat arrays of ``size`` entries."""
        out = []
        for key in ("rtol", "atol"):
            val = getattr(self, key)
            if isinstance(val, np.ndarray):
                try:
                    if shape is None:
                        val = np.broadcast_to(val, (size,))
                    else:
                        val = np.broadcast_to(val, shape).reshape(size)
                except ValueError:
                    raise ValueError(
                        f"`{key}` per component must broadcast to the shape of `{name}` "
                        f"{shape if shape is not None else (size,)}; got shape {val.shape}"
                    ) from None
                val = np.ascontiguousarray(val, dtype=np.float64)
            out.append(val)
        return tuple(out)


def select_initial_step(fun, t0, y0, f0, direction, interval, order, rtol, atol, m):
    """Hairer-Norsett-Wanner II.4 starting step (as in scipy); costs one evaluation of ``fun``."""
    rt = rtol if np.ndim(rtol) == 0 else rtol[:m]
    at = atol if np.ndim(atol) == 0 else atol[:m]
    scale = at + np.abs(y0[:m]) * rt
    d0 = rms(y0[:m] / scale)
    d1 = rms(f0[:m] / scale)
    h0 = 1e-6 if (d0 < 1e-5 or d1 < 1e-5) else 0.01 * d0 / d1
    h0 = min(h0, interval)
    if not h0 > 0:  # d1 so large that 0.01 d0 / d1 underflows (issue 9: was ZeroDivisionError)
        raise ValueError(
            f"`f` is too large at t0 = {t0!r} for any representable first step: "
            f"RMS of f(t0, y0) / (atol + rtol |y0|) = {d1:.3g}"
        )
    f1 = fun(t0 + direction * h0, y0 + (direction * h0) * f0)
    d2 = rms((f1[:m] - f0[:m]) / scale) / h0
    if d1 <= 1e-15 and d2 <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / max(d1, d2)) ** (1.0 / (order + 1))
    return min(100 * h0, h1, interval)
