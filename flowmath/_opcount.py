"""Machine-independent cost measurement: floating-point operations counted at the array calls.

:func:`count_flops` temporarily replaces the array namespaces (``numpy``, ``autograd.numpy``,
the result of :func:`flowmath._xp.array_namespace`), ``solve_triangular``, the LAPACK helpers and
the emerging-convolution kernels *as seen by the linear and convolutional layer modules* with
wrappers that add each call's operation count, from the shapes of its arguments, to a
:class:`FlopCounts`. The library's code runs unchanged (the wrappers call through), so the counts
are those of the implementation, not of a model of it; the model is only the per-routine count:

=====================================  ==========================================
call (shapes)                          flops counted
=====================================  ==========================================
matmul / dot / tensordot / einsum      2 x (product of all index extents)
linalg.solve (b, n, n), (b, n, k)      b (2/3 n^3 + 2 n^2 k)
linalg.slogdet / det (b, n, n)         b 2/3 n^3 (LU)
linalg.inv (b, n, n)                   b 2 n^3
linalg.svd (b, m, n), k = min          b 4 max(m, n) k^2
solve_triangular (n, n), (n, k)        n^2 k
getrf (n, n) / gecon                   2/3 n^3 / 2 n^2
fft2 / ifft2 over (h, w), batch b      5 b hw log2(hw)
rfft2 / irfft2 (real, half spectrum)   2.5 b hw log2(hw)
emerging ar_conv / ar_solve            2 n c^2 k^2 hw / n c^2 k^2 hw (the kernel's loops)
elementwise / reductions               the size of the largest argument or result
=====================================  ==========================================

Operators on arrays (``a * b``, ``a + b``) are not seen; they are O(size) like the counted
elementwise calls beside them, so they change no exponent of the layers measured.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
from collections import Counter

import numpy as np

__all__ = ["CostClaim", "FlopCounts", "cost_exponents", "count_flops", "fit_exponent"]


@dataclasses.dataclass
class FlopCounts:
    """Operations counted inside :func:`count_flops`: ``total`` and ``by_call`` (name -> flops)."""

    total: float = 0.0
    by_call: Counter = dataclasses.field(default_factory=Counter)
    calls: int = 0

    def add(self, name, flops):
        self.total += float(flops)
        self.by_call[name] += float(flops)
        self.calls += 1


def _shape(a):
    return tuple(np.shape(getattr(a, "_value", a)))


def _size(a):
    return int(np.prod(_shape(a))) if _shape(a) else 1


def _matmul(a, b, *_, **__):
    sa, sb = _shape(a), _shape(b)
    if len(sa) == 1:
        sa = (1,) + sa
    if len(sb) == 1:
        sb = sb + (1,)
    batch = np.broadcast_shapes(sa[:-2], sb[:-2])
    return 2.0 * math.prod(batch) * sa[-2] * sa[-1] * sb[-1]


def _dot(a, b, *_, **__):
    sa, sb = _shape(a), _shape(b)
    if len(sa) <= 2 and len(sb) <= 2:
        return _matmul(a, b)
    k = sa[-1]
    return 2.0 * math.prod(sa) * math.prod(sb) / k


def _tensordot(a, b, axes=2, **_):
    sa, sb = _shape(a), _shape(b)
    if isinstance(axes, int):
        contracted = math.prod(sa[len(sa) - axes :])
    else:
        contracted = math.prod(sa[i] for i in np.atleast_1d(axes[0]))
    return 2.0 * math.prod(sa) * math.prod(sb) / max(contracted, 1)


def _einsum(subscripts, *operands, **_):
    inputs = subscripts.split("->")[0].split(",")
    extent = {}
    for spec, op in zip(inputs, operands, strict=False):
        for letter, n in zip(spec.strip(), _shape(op), strict=False):
            extent[letter] = n
    return 2.0 * math.prod(extent.values())


def _square_batch(a):
    s = _shape(a)
    return math.prod(s[:-2]), s[-1]


def _solve(a, b, *_, **__):
    batch, n = _square_batch(a)
    sb = _shape(b)
    k = 1 if len(sb) == len(_shape(a)) - 1 else sb[-1]
    return batch * (2.0 / 3.0 * n**3 + 2.0 * n * n * k)


def _lu(a, *_, **__):
    batch, n = _square_batch(a)
    return batch * 2.0 / 3.0 * n**3


def _inv(a, *_, **__):
    batch, n = _square_batch(a)
    return batch * 2.0 * n**3


def _svd(a, *_, **__):
    s = _shape(a)
    m, n = s[-2], s[-1]
    return math.prod(s[:-2]) * 4.0 * max(m, n) * min(m, n) ** 2


def _solve_triangular(a, b, *_, **__):
    n = _shape(a)[-1]
    sb = _shape(b)
    k = 1 if len(sb) == 1 else sb[-1]
    return float(n * n * k)


def _fft2(a, *_, **__):
    s = _shape(a)
    hw = s[-1] * s[-2]
    return 5.0 * math.prod(s[:-2]) * hw * max(math.log2(hw), 1.0)


def _rfft2(a, *_, **__):
    s = _shape(a)
    hw = s[-1] * s[-2]
    return 2.5 * math.prod(s[:-2]) * hw * max(math.log2(hw), 1.0)


def _irfft2(a, s=None, *_, **__):
    shape = _shape(a)
    h, w = s if s is not None else (shape[-2], 2 * (shape[-1] - 1))
    return 2.5 * math.prod(shape[:-2]) * h * w * max(math.log2(h * w), 1.0)


def _elementwise(*args, **kwargs):
    sizes = [_size(a) for a in args if hasattr(getattr(a, "_value", a), "shape")]
    return float(max(sizes, default=1))


MODEL = {
    "matmul": _matmul,
    "dot": _dot,
    "tensordot": _tensordot,
    "einsum": _einsum,
    "linalg.solve": _solve,
    "linalg.slogdet": _lu,
    "linalg.det": _lu,
    "linalg.inv": _inv,
    "linalg.svd": _svd,
    "fft.fft2": _fft2,
    "fft.ifft2": _fft2,
    "fft.rfft2": _rfft2,
    "fft.irfft2": _irfft2,
}
ELEMENTWISE = frozenset(
    "exp log log1p expm1 abs sqrt sign sum prod real conj tril triu diag diagonal maximum "
    "minimum where max min trace".split()
)


class _Namespace:
    """A module whose modelled functions count their operations into ``counts``."""

    def __init__(self, module, counts, prefix=""):
        self._module, self._counts, self._prefix = module, counts, prefix

    def __getattr__(self, name):
        attr = getattr(self._module, name)
        key = self._prefix + name
        if isinstance(attr, types.ModuleType):
            return _Namespace(attr, self._counts, key + ".")
        model = MODEL.get(key)
        if model is None and name in ELEMENTWISE and callable(attr):
            model = _elementwise
        if model is None:
            return attr
        return _counted(attr, model, key, self._counts)


def _counted(fn, model, key, counts):
    def wrapper(*args, **kwargs):
        counts.add(key, model(*args, **kwargs))
        return fn(*args, **kwargs)

    wrapper.__wrapped__ = fn
    return wrapper


def _lapack_funcs(real, counts):
    models = {"getrf": _lu, "gecon": lambda a, *_, **__: 2.0 * _shape(a)[-1] ** 2}

    def get_lapack_funcs(names, arrays=(), *args, **kwargs):
        funcs = real(names, arrays, *args, **kwargs)
        return tuple(
            _counted(f, models.get(n, _elementwise), "lapack." + n, counts)
            for n, f in zip(names, funcs, strict=True)
        )

    return get_lapack_funcs


@contextlib.contextmanager
def count_flops():
    """Count the floating-point operations of the linear and convolutional layers' array calls.

    Yields
    ------
    FlopCounts
        Filled while the block runs (single-threaded use: the module attributes are swapped).

    Examples
    --------
    >>> import numpy as np, flowmath as fm
    >>> from flowmath._opcount import count_flops
    >>> layer, x = fm.FullLinear(), np.ones((1, 8))
    >>> params = layer.init(np.random.default_rng(0), x)
    >>> with count_flops() as c:
    ...     _ = layer.inverse(params, x)
    >>> c.total > 8**3
    True
    """
    import autograd.numpy as anp
    import scipy.linalg

    from . import _xp
    from .kernels import emerging
    from .layers import conv, linear

    counts = FlopCounts()
    p_np, p_anp = _Namespace(np, counts), _Namespace(anp, counts)
    real_ns = _xp.array_namespace

    def array_namespace(*xs):
        ns = real_ns(*xs)
        return {id(np): p_np, id(anp): p_anp}.get(id(ns), _Namespace(ns, counts))

    def ar_model(w, d, x):
        c, k = _shape(w)[0], _shape(w)[2]
        n, _, h, wd = _shape(x)
        return float(n * c * c * k * k * h * wd)

    st_counted = _counted(conv.solve_triangular, _solve_triangular, "solve_triangular", counts)
    lin_st = _counted(linear.solve_triangular, _solve_triangular, "solve_triangular", counts)
    scipy_ns = types.SimpleNamespace(
        linalg=types.SimpleNamespace(
            lu=_counted(scipy.linalg.lu, _lu, "scipy.linalg.lu", counts),
            lapack=types.SimpleNamespace(
                get_lapack_funcs=_lapack_funcs(scipy.linalg.lapack.get_lapack_funcs, counts)
            ),
        )
    )
    patches = [
        (linear, "anp", p_anp),
        (linear, "np", p_np),
        (linear, "solve_triangular", lin_st),
        (conv, "anp", p_anp),
        (conv, "np", p_np),
        (conv, "scipy", scipy_ns),
        (conv, "array_namespace", array_namespace),
        (conv, "solve_triangular", st_counted),
        (
            conv,
            "ar_conv",
            _counted(emerging.ar_conv, lambda *a: 2 * ar_model(*a), "ar_conv", counts),
        ),
        (conv, "ar_solve", _counted(emerging.ar_solve, ar_model, "ar_solve", counts)),
    ]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
    try:
        for mod, name, value in patches:
            setattr(mod, name, value)
        yield counts
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)


# ---------------------------------------------------------------------------------------------
# the cost claims of the linear layers, measured on counted operations
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CostClaim:
    """One cost claim: ``op`` of ``layer`` grows like ``theory(size)`` along ``variable``."""

    layer: str
    op: str
    variable: str
    theory: str
    sizes: tuple
    build: object  # size -> (layer, x)
    theory_fn: object  # size -> float
    measure: object = None  # (layer, params, x, y) -> None; default by op


def _log2(v):
    return max(math.log2(v), 1.0)


def _vec(layer_fn):
    return lambda s: (layer_fn(), (1, s))


def _img(layer_fn, c=None, hw=None):
    """Square images: sweep the channels ``c`` at ``hw`` pixels, or the pixels ``hw`` (a
    square number) at ``c`` channels."""

    def build(s):
        if c is None:
            side = math.isqrt(hw)
            return layer_fn(), (1, s, side, side)
        side = math.isqrt(s)
        return layer_fn(), (1, c, side, side)

    return build


def _cost_claims():
    from . import layers as L

    claims = []
    dims = (32, 64, 128, 256)

    # vectors: inverse at batch 1, log-det by the layer's own log-det routine where it has one
    full = dict(layer="FullLinear", variable="d", sizes=dims, build=_vec(L.FullLinear))
    claims += [
        CostClaim(op="inverse", theory="d^3", theory_fn=lambda d: d**3, **full),
        CostClaim(
            op="log-det",
            theory="d^3",
            theory_fn=lambda d: d**3,
            measure=lambda lay, p, x, y: lay._logdet(p["W"]),
            **full,
        ),  # fmt: skip
    ]
    diag = dict(layer="DiagonalLinear", variable="d", sizes=dims, build=_vec(L.DiagonalLinear))
    claims += [
        CostClaim(op="inverse", theory="d", theory_fn=lambda d: d, **diag),
        CostClaim(op="forward + log-det", theory="d", theory_fn=lambda d: d, **diag),
    ]
    tri = dict(layer="TriangularLinear", variable="d", sizes=dims, build=_vec(L.TriangularLinear))
    claims += [
        CostClaim(op="inverse", theory="d^2", theory_fn=lambda d: d**2, **tri),
        # the log-det itself is sum(log_diag), O(d); the forward assembles W in O(d^2)
        CostClaim(op="forward + log-det", theory="d^2", theory_fn=lambda d: d**2, **tri),
    ]
    blk_d = dict(
        layer="BlockDiagonalLinear(c=4)", variable="d", sizes=dims,
        build=_vec(lambda: L.BlockDiagonalLinear(4)),
    )  # fmt: skip
    blk_c = dict(
        layer="BlockDiagonalLinear(d=256)", variable="c", sizes=(4, 8, 16, 32, 64),
        build=lambda c: (L.BlockDiagonalLinear(c), (1, 256)),
    )  # fmt: skip
    blk_ld = dict(measure=lambda lay, p, x, y: lay._logdet(p["W"]))
    claims += [
        CostClaim(op="inverse", theory="c^2 d", theory_fn=lambda d: d, **blk_d),
        CostClaim(op="log-det", theory="c^2 d", theory_fn=lambda d: d, **blk_d, **blk_ld),
        CostClaim(op="inverse", theory="c^2 d", theory_fn=lambda c: c**2, **blk_c),
        CostClaim(op="log-det", theory="c^2 d", theory_fn=lambda c: c**2, **blk_c, **blk_ld),
    ]
    lu = dict(layer="LULinear", variable="d", sizes=dims, build=_vec(L.LULinear))
    claims += [
        CostClaim(op="inverse", theory="d^2", theory_fn=lambda d: d**2, **lu),
        CostClaim(op="forward + log-det", theory="d^2", theory_fn=lambda d: d**2, **lu),
    ]
    # images: d = c h w
    hws = (16, 64, 256, 1024)
    conv_ld = dict(measure=lambda lay, p, x, y: lay._logdet(p, x))
    for lu_flag in (True, False):
        name = f"InvConv1x1(lu={lu_flag})"
        hw_sweep = dict(layer=name, variable="hw", sizes=hws,
                        build=_img(lambda f=lu_flag: L.InvConv1x1(lu=f), c=4))  # fmt: skip
        c_sweep = dict(layer=name, variable="c", sizes=(8, 16, 32, 64),
                       build=_img(lambda f=lu_flag: L.InvConv1x1(lu=f), hw=1))  # fmt: skip
        claims += [
            CostClaim(
                op="inverse", theory="c^3 + c^2 hw", theory_fn=lambda s: 64 + 16 * s, **hw_sweep
            ),
            CostClaim(
                op="inverse", theory="c^3 + c^2 hw", theory_fn=lambda c: c**3 + c**2, **c_sweep
            ),
            CostClaim(
                op="log-det",
                theory="c" if lu_flag else "c^3",
                theory_fn=(lambda c: c) if lu_flag else (lambda c: c**3),
                **c_sweep,
                **conv_ld,
            ),  # fmt: skip
            CostClaim(
                op="log-det",
                theory="c" if lu_flag else "c^3",
                theory_fn=lambda s: 1.0,
                **hw_sweep,
                **conv_ld,
            ),  # fmt: skip
        ]
    per_hw = dict(layer="PeriodicConv2d", variable="hw", sizes=hws,
                  build=_img(L.PeriodicConv2d, c=2))  # fmt: skip
    per_c = dict(layer="PeriodicConv2d", variable="c", sizes=(16, 32, 64, 128),
                 build=_img(L.PeriodicConv2d, hw=2))  # fmt: skip

    def per_ld(lay, p, x, y):
        mats = lay.fourier_matrices(p, x.shape[2], x.shape[3])
        return lay._checked_logdet(mats, x.dtype)

    hwlog = "c^3 hw + c^2 hw log hw"
    claims += [
        CostClaim(
            op="inverse", theory=hwlog, theory_fn=lambda s: 8 * s + 4 * s * _log2(s), **per_hw
        ),
        CostClaim(op="inverse", theory=hwlog, theory_fn=lambda c: c**3, **per_c),
        CostClaim(
            op="log-det",
            theory=hwlog,
            theory_fn=lambda s: 8 * s + 4 * s * _log2(s),
            measure=per_ld,
            **per_hw,
        ),  # fmt: skip
        CostClaim(op="log-det", theory=hwlog, theory_fn=lambda c: c**3, measure=per_ld, **per_c),
    ]
    em_hw = dict(layer="EmergingConv2d", variable="hw", sizes=hws,
                 build=_img(L.EmergingConv2d, c=2))  # fmt: skip
    em_c = dict(layer="EmergingConv2d", variable="c", sizes=(4, 8, 16, 32),
                build=_img(L.EmergingConv2d, hw=4))  # fmt: skip

    def em_ld(lay, p, x, y):
        return lay._logdet(lay._parts(p), x)

    claims += [
        CostClaim(op="inverse", theory="c^2 k^2 hw", theory_fn=lambda s: s, **em_hw),
        CostClaim(op="inverse", theory="c^2 k^2 hw", theory_fn=lambda c: c * c, **em_c),
        CostClaim(op="log-det", theory="c", theory_fn=lambda c: c, measure=em_ld, **em_c),
        CostClaim(op="log-det", theory="c", theory_fn=lambda s: 1.0, measure=em_ld, **em_hw),
    ]
    return claims


def _default_measure(op):
    if op == "inverse":
        return lambda lay, p, x, y: lay.inverse(p, y)
    return lambda lay, p, x, y: lay.forward(p, x)


def fit_exponent(sizes, values):
    """Least-squares slope of log(values) against log(sizes)."""
    return float(np.polyfit(np.log(np.asarray(sizes, float)), np.log(values), 1)[0])


def cost_exponents(quick: bool = False, seed: int = 0):
    """Count each claim's operation over its sweep and fit the exponent.

    Parameters
    ----------
    quick : bool
        Use the first three sizes of every sweep (about a third of the time).
    seed : int

    Returns
    -------
    list of dict
        ``layer, op, variable, theory, sizes, flops, fitted, expected`` where ``expected`` is
        the slope of the theory's formula fitted on the same sizes (for ``hw log hw`` that is
        slightly above 1).
    """
    rng = np.random.default_rng(seed)
    rows = []
    for claim in _cost_claims():
        flops = []
        measure = claim.measure or _default_measure(claim.op)
        sizes = claim.sizes[:3] if quick else claim.sizes
        for s in sizes:
            layer, shape = claim.build(s)
            x = rng.normal(size=shape)
            params = layer.init(rng, x)
            y, _ = layer.forward(params, x)
            with count_flops() as counts:
                measure(layer, params, x, y)
            flops.append(counts.total)
        theory = [float(claim.theory_fn(s)) for s in sizes]
        rows.append(
            {
                "layer": claim.layer,
                "op": claim.op,
                "variable": claim.variable,
                "theory": claim.theory,
                "sizes": list(sizes),
                "flops": flops,
                "fitted": fit_exponent(sizes, flops),
                "expected": fit_exponent(sizes, theory),
            }
        )
    return rows
