"""Public verification tools for bijections — flowmath's and your own.

:func:`check_bijection` compares a layer's claimed inverse and log-determinants against brute
force: the dense Jacobian of ``forward`` built with autograd and its ``slogdet``, round trips in
both directions, the inverse log-det against minus the forward one (and against the dense
Jacobian of ``inverse``), and batch independence. It raises nothing: it returns a
:class:`BijectionReport`, whose :meth:`~BijectionReport.assert_ok` raises with the figures.

Every error is *relative*: ``max|a - b| / max(1, max|b|)``, so that a tolerance near 1e-10 means
the same for a log-det of 0.3 and of 300.

:func:`count_iterations` counts the fixed-point iterations and ODE steps a computation runs, so
that a claim such as "this inverse is analytic" is a measurement (zero of both) and not a label.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import autograd
import numpy as np
from autograd.core import make_jvp, make_vjp, vspace
from autograd.misc import flatten
from autograd.wrap_util import unary_to_nary

from ._checks import check_rng
from ._counters import IterationCounts, count_iterations
from ._xp import to_numpy
from .layers.base import Bijection

__all__ = [
    "BijectionReport",
    "IterationCounts",
    "check_bijection",
    "check_grads",
    "count_iterations",
    "dense_jacobian",
    "relative_error",
]


def relative_error(a, b) -> float:
    """``max|a - b| / max(1, max|b|)`` (0 for empty arrays); NaN/inf anywhere gives inf."""
    a = np.asarray(to_numpy(a), dtype=np.float64)
    b = np.asarray(to_numpy(b), dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if a.size == 0:
        return 0.0
    diff = np.abs(a - b)
    if not np.all(np.isfinite(diff)):
        return math.inf
    return float(diff.max() / max(1.0, float(np.abs(b).max())))


def _fresh(rng):
    return None if rng is None else copy.deepcopy(rng)


def dense_jacobian(fn, x):
    """Per-sample dense Jacobians of a batch map ``fn`` (shape ``(n, ...) -> (n, ...)``) built with
    autograd, one reverse pass per output entry: returns ``(n, D_out, D_in)``.

    ``fn`` is called on one sample at a time (batch of one), so the result is the Jacobian of the
    per-sample map the layer claims to implement.
    """
    x = np.asarray(x)
    out = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1]

        def flat(v, xi=xi):
            return fn(v.reshape(xi.shape)).reshape(-1)

        out.append(autograd.jacobian(flat)(xi.reshape(-1)))
    return np.stack(out)


@dataclasses.dataclass
class BijectionReport:
    """Figures from :func:`check_bijection` (relative errors; see the module docstring).

    Attributes
    ----------
    forward_roundtrip : ``f^-1(f(x))`` against ``x``.
    inverse_roundtrip : ``f(f^-1(y))`` against ``y = f(x)``.
    logdet_error : ``forward`` log-det against ``slogdet`` of the autograd Jacobian of ``forward``.
    inverse_logdet_error : ``inverse`` log-det at ``y`` against minus the ``forward`` one at ``x``.
    inverse_jacobian_error : ``inverse`` log-det against ``slogdet`` of the Jacobian of ``inverse``.
    batch_error : batched ``forward`` (``y`` and log-det) against one sample at a time.
    dtype_ok : outputs keep the input dtype and log-dets have shape ``(n,)``.
    singular : some dense Jacobian has determinant 0 (the map is not invertible there).
    errors : exceptions raised by the layer while checking, as text.
    """

    forward_roundtrip: float = math.nan
    inverse_roundtrip: float = math.nan
    logdet_error: float = math.nan
    inverse_logdet_error: float = math.nan
    inverse_jacobian_error: float = math.nan
    batch_error: float = math.nan
    dtype_ok: bool = False
    singular: bool = False
    errors: list[str] = dataclasses.field(default_factory=list)
    dtype: str = "float64"

    FIELDS = (
        "forward_roundtrip",
        "inverse_roundtrip",
        "logdet_error",
        "inverse_logdet_error",
        "inverse_jacobian_error",
        "batch_error",
    )

    @property
    def max_error(self) -> float:
        return max(getattr(self, f) for f in self.FIELDS)

    def ok(self, tol: float | None = None) -> bool:
        tol = self.default_tol() if tol is None else tol
        return (
            not self.errors
            and self.dtype_ok
            and not self.singular
            and all(getattr(self, f) <= tol for f in self.FIELDS)
        )

    def default_tol(self) -> float:
        """1e-9 for float64, 1e-3 for float32 (relative)."""
        return 1e-3 if self.dtype == "float32" else 1e-9

    def assert_ok(self, tol: float | None = None) -> None:
        """Raise ``AssertionError`` with every figure unless all are within ``tol``."""
        tol = self.default_tol() if tol is None else tol
        if not self.ok(tol):
            raise AssertionError(f"bijection check failed at tol={tol:g}:\n{self}")

    def __str__(self) -> str:
        lines = [f"  {f:<24s} {getattr(self, f):.3e}" for f in self.FIELDS]
        lines.append(f"  {'dtype_ok':<24s} {self.dtype_ok}")
        lines.append(f"  {'singular':<24s} {self.singular}")
        lines += [f"  error: {e}" for e in self.errors]
        return "BijectionReport(\n" + "\n".join(lines) + "\n)"


def check_bijection(
    layer: Bijection, params, x, rng: np.random.Generator | None = None, *, jacobian: bool = True
) -> BijectionReport:
    """Check a bijection against brute force at the batch ``x``.

    Parameters
    ----------
    layer : Bijection
        Any object with the layer contract's ``forward(params, x, rng)`` and
        ``inverse(params, y, rng)``.
    params : pytree
        Its parameters (from ``layer.init``).
    x : ndarray, shape (n, ...)
        Points to check at. Keep the event small (the dense Jacobian costs one reverse pass per
        output entry): vectors of a few dozen entries, images such as ``2 x 4 x 4``.
    rng : numpy.random.Generator, optional
        For stochastic layers; every call gets a copy of it, so all calls see the same draws.
    jacobian : bool
        Build dense Jacobians (default). Switch off for large events to check only round trips,
        inverse log-det and batch independence.

    Returns
    -------
    BijectionReport
        Never raises for a failing layer; call ``report.assert_ok(tol)``.

    Examples
    --------
    >>> import numpy as np, flowmath as fm
    >>> rng = np.random.default_rng(0)
    >>> layer = fm.PeriodicConv2d()
    >>> x = rng.normal(size=(2, 2, 4, 4))
    >>> report = fm.testing.check_bijection(layer, layer.init(rng, x), x)
    >>> report.assert_ok(1e-10)
    """
    if rng is not None:
        check_rng(rng)
    report = BijectionReport()
    x = np.asarray(x)
    report.dtype = str(np.float32 if x.dtype == np.float32 else np.float64)
    n = x.shape[0]

    def fwd(v):
        return layer.forward(params, v, _fresh(rng))

    def inv(v):
        return layer.inverse(params, v, _fresh(rng))

    try:
        y, ld = fwd(x)
        x_back, ld_inv = inv(y)
        y_again, _ = fwd(x_back)
        y, ld, x_back, ld_inv = map(to_numpy, (y, ld, x_back, ld_inv))
        report.dtype_ok = (
            y.dtype == x_back.dtype == ld.dtype == ld_inv.dtype
            and (x.dtype != np.float32 or y.dtype == np.float32)
            and ld.shape == (n,)
            and ld_inv.shape == (n,)
        )
        report.forward_roundtrip = relative_error(x_back, x)
        report.inverse_roundtrip = relative_error(y_again, y)
        report.inverse_logdet_error = relative_error(ld_inv, -ld)
        batch = [fwd(x[i : i + 1]) for i in range(n)]
        report.batch_error = max(
            relative_error(np.concatenate([to_numpy(b[0]) for b in batch]), y),
            relative_error(np.concatenate([to_numpy(b[1]) for b in batch]), ld),
        )
        if jacobian:
            jf = dense_jacobian(lambda v: fwd(v)[0], x)
            sign, logabs = np.linalg.slogdet(jf.astype(np.float64))
            report.singular = bool(np.any(sign == 0))
            report.logdet_error = relative_error(ld, logabs)
            ji = dense_jacobian(lambda v: inv(v)[0], y)
            _, logabs_i = np.linalg.slogdet(ji.astype(np.float64))
            report.inverse_jacobian_error = relative_error(ld_inv, logabs_i)
        else:
            report.logdet_error = report.inverse_jacobian_error = 0.0
    except Exception as exc:  # noqa: BLE001 - the report carries every failure, by contract
        report.errors.append(f"{type(exc).__name__}: {exc}")
    return report


# ---------------------------------------------------------------------------------------------
# derivatives against finite differences, with seeded directions
# ---------------------------------------------------------------------------------------------
def _random_like(x, rng):
    """A standard-normal element of the vector space of ``x`` (a pytree of arrays), from
    ``rng``."""
    flat, unflatten = flatten(x)
    return unflatten(rng.standard_normal(np.shape(flat)))


def _close(exact, numeric, atol, rtol):
    err = abs(exact - numeric)
    return err <= atol or err <= rtol * abs(exact + numeric), err


def _numerical_jvp(f, x, v, eps):
    x_vs = vspace(x)
    plus = f(x_vs.add(x, x_vs.scalar_mul(v, eps / 2)))
    minus = f(x_vs.add(x, x_vs.scalar_mul(v, -eps / 2)))
    y_vs = vspace(plus)
    return y_vs.scalar_mul(y_vs.add(plus, y_vs.scalar_mul(minus, -1.0)), 1.0 / eps)


def _check_rev(f, x, rng, eps, atol, rtol, errors):
    vjp, y = make_vjp(f, x)
    x_vs, y_vs = vspace(x), vspace(y)
    u, w = _random_like(x, rng), _random_like(y, rng)
    exact = x_vs.inner_prod(u, vjp(w))
    numeric = y_vs.inner_prod(w, _numerical_jvp(f, x, u, eps))
    ok, err = _close(exact, numeric, atol, rtol)
    errors.append(float(err))
    if not ok:
        raise AssertionError(
            f"reverse-mode derivative check failed: analytic {exact!r}, finite differences "
            f"{numeric!r} (eps = {eps:g}, atol = {atol:g}, rtol = {rtol:g})"
        )
    return y


def _check_fwd(f, x, rng, eps, atol, rtol, errors):
    u = _random_like(x, rng)
    _, jv = make_jvp(f, x)(u)
    num = _numerical_jvp(f, x, u, eps)
    y_vs = vspace(jv)
    w = _random_like(jv, rng)
    ok, err = _close(y_vs.inner_prod(w, jv), y_vs.inner_prod(w, num), atol, rtol)
    errors.append(float(err))
    if not ok:
        raise AssertionError(
            f"forward-mode derivative check failed (eps = {eps:g}, atol = {atol:g}, rtol = "
            f"{rtol:g}): error {err:.3e}"
        )


def _check_grads(f, x, modes, order, rng, eps, atol, rtol, errors):
    if "fwd" in modes:
        _check_fwd(f, x, rng, eps, atol, rtol, errors)
        if order > 1:
            v = _random_like(x, rng)

            def jvp_f(args):
                return make_jvp(f, args[0])(args[1])[1]

            _check_grads(jvp_f, (x, v), modes, order - 1, rng, eps, atol, rtol, errors)
    if "rev" in modes:
        y = _check_rev(f, x, rng, eps, atol, rtol, errors)
        if order > 1:
            w = _random_like(y, rng)

            def vjp_f(args):
                return make_vjp(f, args[0])[0](args[1])

            _check_grads(vjp_f, (x, w), modes, order - 1, rng, eps, atol, rtol, errors)


@unary_to_nary
def check_grads(
    fun,
    x,
    modes=("rev",),
    order: int = 1,
    *,
    rng: np.random.Generator | None = None,
    eps: float = 1e-6,
    atol: float = 1e-6,
    rtol: float = 1e-6,
) -> float:
    r"""Check autograd derivatives of ``fun`` against central finite differences, seeded.

    The drop-in for :func:`autograd.test_util.check_grads` (same call:
    ``check_grads(f, modes=["rev"], order=2)(x, ...)`` checks the derivatives in the first
    argument), except that the random directions come from ``rng`` rather than NumPy's
    global state, so a failure reproduces exactly. For ``"rev"``: with ``u`` and ``w`` random
    in the input and output spaces,

    .. math:: \langle u, J^\top w\rangle \;\text{against}\;
        \Big\langle w, \frac{f(x + \tfrac{\epsilon}{2} u) - f(x - \tfrac{\epsilon}{2}
        u)}{\epsilon}\Big\rangle,

    within ``atol`` or ``rtol`` times the sum (autograd's criterion); ``order > 1`` checks the
    VJP (JVP) map itself in both its arguments, recursively.

    Parameters
    ----------
    fun : callable
    x : the argument to differentiate (any autograd pytree).
    modes : sequence of {"rev", "fwd"}
    order : int >= 1
    rng : numpy.random.Generator, optional
        Source of the directions (default ``numpy.random.default_rng(0)``: deterministic).
    eps, atol, rtol : float
        Finite-difference step and tolerances (autograd's defaults).

    Returns
    -------
    float
        The largest discrepancy measured (so that a test can state its margin).

    Raises
    ------
    AssertionError
        With the analytic and numerical values, on the first failing check.

    Examples
    --------
    >>> import autograd.numpy as anp, numpy as np
    >>> err = check_grads(lambda x: anp.sum(anp.sin(x) ** 2), order=2)(np.arange(3.0))
    >>> err < 1e-8
    True
    """
    if rng is None:
        rng = np.random.default_rng(0)
    check_rng(rng)
    modes = tuple(modes)
    if not modes or any(m not in ("rev", "fwd") for m in modes):
        raise ValueError(f"`modes` must be a non-empty subset of ('rev', 'fwd'); got {modes!r}")
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ValueError(f"`order` must be an int >= 1; got {order!r}")
    errors: list[float] = []
    _check_grads(fun, x, modes, order, rng, float(eps), float(atol), float(rtol), errors)
    return max(errors)
