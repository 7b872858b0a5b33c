"""Shared input validation with messages that name the argument, the expectation and the value.

Messages follow one pattern: ``"`x` must have shape (n, 4); got (3, 5)"``.
"""

from __future__ import annotations

import numbers

import numpy as np

from ._xp import getval, to_numpy

__all__ = [
    "check_array",
    "check_finite",
    "check_in_open_interval",
    "check_int",
    "check_positive",
    "check_probability",
    "check_rng",
    "check_choice",
    "check_float_dtype",
    "float_dtype",
]


def _shape_str(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def float_dtype(x, name: str = "x"):
    """The floating dtype computation runs in for ``x``: float32 stays float32, float64 and
    integers/bools become float64; anything else is a ``TypeError``."""
    dtype = np.dtype(getattr(getval(x), "dtype", np.asarray(getval(x)).dtype))
    if dtype == np.float32:
        return np.dtype(np.float32)
    if dtype == np.float64 or dtype.kind in "iub":
        return np.dtype(np.float64)
    raise TypeError(f"`{name}` must be a real floating or integer array; got dtype {dtype}")


def check_float_dtype(dtype, name: str = "dtype") -> np.dtype:
    """A requested output dtype: float32 or float64 (as a ``numpy.dtype``), else ``TypeError``."""
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"`{name}` must be a NumPy floating dtype; got {dtype!r}") from exc
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"`{name}` must be float32 or float64; got {dt}")
    return dt


def check_array(x, name: str = "x", *, ndim=None, finite: bool = True):
    """Validate a batch array: numeric real dtype, allowed ``ndim``, finite values.

    Returns the floating dtype to compute in. ``ndim`` is an int or a collection of ints.
    """
    raw = getval(x)
    if not hasattr(raw, "shape") or not hasattr(raw, "dtype"):
        raise TypeError(f"`{name}` must be an array; got {type(raw).__name__}")
    dtype = float_dtype(x, name)
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(sorted(ndim))
        if raw.ndim not in allowed:
            want = " or ".join(f"{k}-D" for k in allowed)
            raise ValueError(
                f"`{name}` must be {want} (batch first); got shape {_shape_str(raw.shape)}"
            )
    if finite:
        check_finite(x, name)
    return dtype


def check_finite(x, name: str = "x") -> None:
    raw = to_numpy(x)
    if raw.size and not np.all(np.isfinite(raw)):
        bad = int(np.size(raw) - np.count_nonzero(np.isfinite(raw)))
        raise ValueError(f"`{name}` must be finite; got {bad} non-finite value(s) (NaN or inf)")


def check_in_open_interval(x, lo, hi, name: str = "y") -> None:
    """Domain check for inverses: every entry of ``x`` in the open interval (lo, hi)."""
    raw = to_numpy(x)
    bad = ~((raw > lo) & (raw < hi))
    if np.any(bad):
        first = float(raw[bad].ravel()[0])
        raise ValueError(
            f"`{name}` must lie in the open interval ({lo}, {hi}); got {int(bad.sum())} value(s) "
            f"outside it (e.g. {first!r})"
        )


def check_rng(rng, name: str = "rng", *, required: bool = True):
    """``rng`` must be a ``numpy.random.Generator`` (no global random state anywhere)."""
    if rng is None and not required:
        return None
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"`{name}` must be a numpy.random.Generator (e.g. numpy.random.default_rng(0)); "
            f"got {type(rng).__name__}"
        )
    return rng


def check_int(value, name: str, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an integer; got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}; got {value}")
    return int(value)


def check_positive(value, name: str, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number; got {type(value).__name__} {value!r}")
    value = float(value)
    if not np.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        want = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"`{name}` must be finite and {want}; got {value!r}")
    return value


def check_probability(value, name: str, *, open_left=True, open_right=False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number; got {type(value).__name__} {value!r}")
    value = float(value)
    ok_left = value > 0 if open_left else value >= 0
    ok_right = value < 1 if open_right else value <= 1
    if not (ok_left and ok_right):
        lo = "(" if open_left else "["
        hi = ")" if open_right else "]"
        raise ValueError(f"`{name}` must lie in {lo}0, 1{hi}; got {value!r}")
    return value


def check_choice(value, name: str, choices) -> str:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value
