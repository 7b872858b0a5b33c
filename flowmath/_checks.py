"""Shared input validation with messages that name the argument, the expectation and the value.

Messages follow one pattern: ``"`x` must have shape (n, 4); got (3, 5)"``.
"""

from __future__ import annotations

import numbers

import numpy as np

from ._xp import getval, to_numpy
from .kernels.finite import count_nonfinite

__all__ = [
    "ANY_TREE",
    "Leaf",
    "check_array",
    "check_bool",
    "check_choice",
    "check_finite",
    "check_float_dtype",
    "check_hidden",
    "check_in_open_interval",
    "check_int",
    "check_permutation",
    "check_positive",
    "check_probability",
    "check_pytree",
    "check_rng",
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
    """``ValueError`` naming ``name`` when ``x`` holds a NaN or an infinity (one fused pass over
    the bits, :func:`flowmath.kernels.finite.count_nonfinite`)."""
    bad = count_nonfinite(to_numpy(x))
    if bad:
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


def check_bool(value, name: str) -> bool:
    """A flag: ``True``/``False`` or NumPy's ``bool_`` only (``"False"`` or ``0`` would be
    misread), returned as a Python ``bool``; anything else is a ``TypeError``."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be True or False; got {type(value).__name__} {value!r}")
    return bool(value)


def check_permutation(value, name: str, choices=()) -> np.ndarray:
    """A permutation of ``0..d-1`` as a read-only int64 array (any integer sequence), else a
    ``ValueError`` that names the string ``choices`` the argument also accepts."""
    arr = np.asarray(value)
    if (
        arr.ndim != 1
        or arr.dtype.kind not in "iu"
        or not np.array_equal(np.sort(arr), np.arange(arr.size))
    ):
        alts = f" or one of {', '.join(map(repr, choices))}" if choices else ""
        raise ValueError(
            f"`{name}` must be a permutation of 0..d-1 (a sequence of ints){alts}; got {value!r}"
        )
    arr = arr.astype(np.int64)
    arr.setflags(write=False)
    return arr


def check_hidden(hidden, name: str = "hidden") -> tuple:
    """Hidden widths: a tuple (or list) of positive integers, returned as a tuple of ``int``.

    A string (``"64"`` would read as ``(6, 4)``), a float width (``2.7`` would truncate to 2), a
    bool or a bare int is a ``TypeError``; a width below 1 a ``ValueError``."""
    if not isinstance(hidden, (tuple, list)):
        raise TypeError(
            f"`{name}` must be a tuple of positive ints, e.g. (64, 64); got "
            f"{type(hidden).__name__} {hidden!r}"
        )
    for i, h in enumerate(hidden):
        if isinstance(h, (bool, np.bool_)) or not isinstance(h, numbers.Integral):
            raise TypeError(
                f"`{name}` must be a tuple of positive ints; got {hidden!r} "
                f"(`{name}[{i}]` is {type(h).__name__} {h!r})"
            )
        if h < 1:
            raise ValueError(
                f"`{name}` must be a tuple of positive ints; got {hidden!r} (`{name}[{i}]` = {h})"
            )
    return tuple(int(h) for h in hidden)


# -- parameter pytrees ----------------------------------------------------------------------------


class Leaf:
    """Declaration of one array leaf of a parameter pytree (see :func:`check_pytree`).

    Parameters
    ----------
    shape : tuple
        Expected shape; an entry ``None`` accepts any size on that axis.
    log : bool
        The leaf is exponentiated by the layer: every value must lie strictly inside
        ``(log tiny, log max)`` of the working dtype, so that ``exp`` of it (and of minus it)
        is finite and non-zero.
    values : callable, optional
        ``values(raw) -> str | None``: a further check of the values (a NumPy array); a string
        is the reason they are wrong (it follows "must ..." in the message).
    """

    __slots__ = ("shape", "log", "values")

    def __init__(self, shape, *, log: bool = False, values=None):
        self.shape = tuple(shape)
        self.log = log
        self.values = values

    def __repr__(self) -> str:
        return f"Leaf({self.shape!r}, log={self.log!r})"


#: Placeholder in a spec: anything is accepted at this position (a sub-layer that declares
#: nothing).
ANY_TREE = object()


def _shape_pattern(shape) -> str:
    return _shape_str(tuple("*" if s is None else s for s in shape))


def _key_str(key) -> str:
    return f"[{key!r}]".replace("'", '"')


def check_pytree(tree, spec, name: str = "params", dtype=None) -> None:
    """Check a parameter pytree against a declared ``spec`` (nested dict / list / tuple of
    :class:`Leaf`, or :data:`ANY_TREE`).

    Dicts must hold exactly the declared keys, sequences the declared length; every leaf must be
    a real floating array of the declared shape with finite values (and, for ``Leaf(log=True)``,
    values whose exponential is representable in ``dtype``, default the leaf's own). Messages
    name the path, e.g. ``params[1]["net"][0]["b"]``, the expectation and what was received.
    Autograd boxes are looked through (the check reads values, it does not trace them).
    """
    if spec is ANY_TREE:
        return
    node = getval(tree)
    if isinstance(spec, dict):
        if not isinstance(node, dict):
            raise TypeError(
                f"`{name}` must be a dict with keys {sorted(spec)}; got {type(node).__name__}"
            )
        if node.keys() != spec.keys():
            missing = sorted(set(spec) - set(node))
            extra = sorted(set(node) - set(spec), key=str)
            what = "; ".join(
                part
                for part in (
                    f"missing {missing}" if missing else "",
                    f"unexpected {extra}" if extra else "",
                )
                if part
            )
            raise ValueError(f"`{name}` must be a dict with keys {sorted(spec)}; got {what}")
        for key, sub in spec.items():
            check_pytree(node[key], sub, name + _key_str(key), dtype)
        return
    if isinstance(spec, (list, tuple)):
        if not isinstance(node, (list, tuple)):
            raise TypeError(
                f"`{name}` must be a list of {len(spec)} entries; got {type(node).__name__}"
            )
        if len(node) != len(spec):
            raise ValueError(f"`{name}` must be a list of {len(spec)} entries; got {len(node)}")
        for i, sub in enumerate(spec):
            check_pytree(node[i], sub, f"{name}[{i}]", dtype)
        return
    _check_leaf(node, spec, name, dtype)


def _check_leaf(raw, leaf: Leaf, name: str, dtype) -> None:
    raw = getval(raw)
    if not hasattr(raw, "shape") or not hasattr(raw, "dtype"):
        raise TypeError(
            f"`{name}` must be an array of shape {_shape_pattern(leaf.shape)}; got "
            f"{type(raw).__name__}"
        )
    if raw.dtype.kind != "f":
        raise TypeError(
            f"`{name}` must be a real floating array (float32 or float64); got dtype {raw.dtype}"
        )
    shape = raw.shape
    if len(shape) != len(leaf.shape) or any(
        e is not None and e != s for e, s in zip(leaf.shape, shape, strict=False)
    ):
        raise ValueError(
            f"`{name}` must have shape {_shape_pattern(leaf.shape)}; got {_shape_str(shape)}"
        )
    if not raw.size:
        return
    values = to_numpy(raw)
    lo, hi = values.min(), values.max()  # NaN propagates through both
    if not (np.isfinite(lo) and np.isfinite(hi)):
        bad = int(values.size - np.count_nonzero(np.isfinite(values)))
        raise ValueError(f"`{name}` must be finite; got {bad} non-finite value(s) (NaN or inf)")
    if leaf.log:
        info = np.finfo(np.dtype(dtype) if dtype is not None else values.dtype)
        low, high = float(np.log(info.tiny)), float(np.log(info.max))
        if not (lo > low and hi < high):
            raise ValueError(
                f"`{name}` must lie in ({low:.4g}, {high:.4g}) so that its exp is finite and "
                f"non-zero in {info.dtype}; got values in [{float(lo):.4g}, {float(hi):.4g}]"
            )
    if leaf.values is not None:
        reason = leaf.values(values)
        if reason:
            raise ValueError(f"`{name}` must {reason}")
