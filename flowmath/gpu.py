"""Which paths run on which array namespace, and ``flowmath gpu-check``.

flowmath's layers and estimators are written against :func:`flowmath._xp.array_namespace`, which
picks autograd's NumPy for traced arrays, CuPy for CuPy arrays and, for any other array that
implements the array API standard (``__array_namespace__``), that array's namespace. Whether a
layer really runs on another namespace is a measurement, not a design intention:

* :func:`array_api_report` runs the ``_forward`` and ``_inverse`` of every layer of
  :data:`CASES` and the estimators on a *strict* array-API namespace (``array_api_strict``, which
  rejects every NumPy extension) and compares the results with NumPy's. The test suite checks
  that its outcome is exactly :data:`NUMPY_ONLY` (and the documentation lists it), so the list
  of NumPy-only paths is never a guess.
* :func:`gpu_check` (``flowmath gpu-check``) runs the public ``forward`` and ``inverse`` of every
  layer on CuPy arrays and reports, against NumPy, the largest differences and the timings. It
  needs CuPy and a GPU; without them it says so and exits cleanly.

Autograd differentiates NumPy only: gradients never run on CuPy.

Examples
--------
>>> from flowmath import gpu
>>> sorted(gpu.NUMPY_ONLY)[:3]
['ActNorm', 'AdditiveCoupling', 'AffineCoupling']
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["CASES", "ESTIMATORS", "NUMPY_ONLY", "GpuCase", "array_api_report", "gpu_check"]


@dataclass(frozen=True)
class GpuCase:
    """A layer to run on another namespace: its constructor, the example shape and the domain
    of its inputs (``"normal"`` or ``"unit"`` for (0, 1))."""

    name: str
    make: Callable
    shape: tuple
    domain: str = "normal"


def _cases() -> list[GpuCase]:
    import flowmath as fm

    vec, img = (6,), (2, 4, 4)
    return [
        GpuCase("FullLinear", fm.FullLinear, vec),
        GpuCase("DiagonalLinear", fm.DiagonalLinear, vec),
        GpuCase("TriangularLinear", fm.TriangularLinear, vec),
        GpuCase("BlockDiagonalLinear", lambda: fm.BlockDiagonalLinear(2), vec),
        GpuCase("LULinear", fm.LULinear, vec),
        GpuCase("InvConv1x1", fm.InvConv1x1, img),
        GpuCase("PeriodicConv2d", fm.PeriodicConv2d, img),
        GpuCase("EmergingConv2d", fm.EmergingConv2d, img),
        GpuCase("ELU", fm.ELU, vec),
        GpuCase("LeakyReLU", fm.LeakyReLU, vec),
        GpuCase("Logit", fm.Logit, vec, "unit"),
        GpuCase("Sigmoid", fm.Sigmoid, vec),
        GpuCase("AdditiveCoupling", lambda: fm.AdditiveCoupling(hidden=(8,)), vec),
        GpuCase("AffineCoupling", lambda: fm.AffineCoupling(hidden=(8,)), vec),
        GpuCase("ActNorm", fm.ActNorm, img),
        GpuCase("Squeeze", fm.Squeeze, img),
        GpuCase("GlowStep", lambda: fm.GlowStep(hidden=(8,)), img),
        GpuCase("Glow", lambda: fm.Glow(levels=2, steps=1, hidden=(8,)), img),
        GpuCase("IResBlock", lambda: fm.IResBlock(hidden=(8,), logdet="exact"), vec),
        GpuCase("CNF", lambda: fm.CNF(hidden=(8,)), vec),
        GpuCase("MAF", lambda: fm.MAF(hidden=(8,)), vec),
        GpuCase("IAF", lambda: fm.IAF(hidden=(8,)), vec),
        GpuCase("Chain", lambda: fm.Chain([fm.DiagonalLinear(), fm.ELU()]), vec),
    ]


class _Lazy(list):
    """``CASES`` is built on first use (the layers import flowmath, which imports this)."""

    def _fill(self):
        if not super().__len__():
            self.extend(_cases())

    def __iter__(self):
        self._fill()
        return super().__iter__()

    def __len__(self):
        self._fill()
        return super().__len__()

    def __getitem__(self, i):
        self._fill()
        return super().__getitem__(i)


#: Every layer of the public contract with an example shape (a test checks none is missing).
CASES: list[GpuCase] = _Lazy()

#: The estimators probed on a strict namespace.
ESTIMATORS = ("exact_trace", "hutchinson_trace", "hutchpp_trace", "power_series_logdet")

#: What :func:`array_api_report` measures today on ``array_api_strict``: the paths that are
#: NumPy-only, each with the NumPy-only construct it meets first (``ELU``, ``Logit`` and
#: ``Sigmoid`` run on the strict namespace and agree with NumPy exactly). Most fail
#: before their algebra: dtypes handled as NumPy dtypes (``np.float64``, ``.astype``,
#: ``dtype.kind``), NumPy index masks and NumPy constants built at ``init`` mixed into the
#: arithmetic, NumPy random probes. "falls back" means NumPy functions turned the result into a
#: NumPy array. The public ``forward`` / ``inverse`` add the base class's validation, NumPy-only
#: as well. CuPy accepts most of these constructs (its dtypes are NumPy's); ``flowmath
#: gpu-check`` measures what runs there.
NUMPY_ONLY: dict[str, str] = {
    "ActNorm": "NumPy arrays mixed into the arithmetic (layers.glow)",
    "AdditiveCoupling": "falls back to NumPy",
    "AffineCoupling": "NumPy arrays in the conditioner (kernels.coupling_mlp)",
    "BlockDiagonalLinear": "NumPy dtype (layers.linear._ones)",
    "CNF": "``.astype`` (layers.continuous._integrate); the ODE solver works on NumPy vectors",
    "Chain": "its layers (here DiagonalLinear)",
    "DiagonalLinear": "NumPy dtype (layers.linear._ones)",
    "EmergingConv2d": "NumPy dtype (kernels.emerging.ar_mask); numba kernels",
    "FullLinear": "NumPy dtype (layers.linear._ones)",
    "Glow": "its layers (InvConv1x1, ActNorm, couplings)",
    "GlowStep": "NumPy arrays mixed into the arithmetic (layers.glow, ActNorm)",
    "IAF": "NumPy dtype (layers.autoregressive.masks); numba MADE kernels",
    "IResBlock": "``dtype.kind`` (lipschitz._check_matrix)",
    "InvConv1x1": "NumPy dtype (layers.conv._lu_parts)",
    "LULinear": "NumPy dtype (layers.linear._factors)",
    "LeakyReLU": "``.astype`` (layers.elementwise._apply)",
    "MAF": "NumPy dtype (layers.autoregressive.masks); numba MADE kernels",
    "PeriodicConv2d": "NumPy dtype (layers.conv.fourier_matrices)",
    "Squeeze": "NumPy dtype (layers.glow)",
    "TriangularLinear": "NumPy dtype (layers.linear._ones)",
    "exact_trace": "NumPy unit vectors passed to ``matvec`` (estimators.trace)",
    "hutchinson_trace": "NumPy probes from numpy.random.Generator (estimators.trace)",
    "hutchpp_trace": "falls back to NumPy (NumPy probes and QR)",
    "power_series_logdet": "NumPy probes (estimators.logdet._series_value)",
}


def _draw(case: GpuCase, rng: np.random.Generator, n: int = 3) -> np.ndarray:
    shape = (n, *case.shape)
    if case.domain == "unit":
        return rng.uniform(0.05, 0.95, size=shape)
    return rng.normal(size=shape)


def _run_private(case, xp, rng):
    """``_forward`` then ``_inverse`` of ``case`` on namespace ``xp`` against NumPy; returns
    ``(ok, detail)``."""
    from ._pytree import tree_map

    layer = case.make()
    x = _draw(case, rng)
    params = layer.init(rng, x)
    ref_y, ref_ld = layer._forward(params, x, np.random.default_rng(1))
    ref_x, _ = layer._inverse(params, ref_y, np.random.default_rng(1))

    def move(v):
        return xp.asarray(v) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v

    p_xp = tree_map(move, params)
    y, ld = layer._forward(p_xp, xp.asarray(x), np.random.default_rng(1))
    x_back, _ = layer._inverse(p_xp, y, np.random.default_rng(1))
    for out in (y, ld, x_back):
        if isinstance(out, np.ndarray) or not hasattr(out, "__array_namespace__"):
            return False, "falls back to NumPy: the result is a NumPy array"
    err = max(
        float(np.max(np.abs(np.asarray(_to_host(a)) - b)))
        for a, b in ((y, ref_y), (ld, ref_ld), (x_back, ref_x))
    )
    return err < 1e-10, f"max |difference| {err:.1e}"


def _to_host(a):
    if hasattr(a, "get"):  # CuPy
        return a.get()
    try:
        return np.asarray(a)
    except (TypeError, ValueError, RuntimeError):
        import array_api_strict as xs  # only reached for its arrays

        return np.asarray(xs.to_device(a, xs.Device("CPU_DEVICE")))


def _run_estimator(name, xp, rng):
    from . import estimators

    d = 5
    A = rng.normal(size=(d, d))
    Ax = xp.asarray(A)

    def matvec(V):
        return xp.matmul(xp.asarray(V), xp.permute_dims(Ax, (1, 0)))

    if name == "exact_trace":
        out = estimators.exact_trace(matvec, d)
    elif name == "hutchinson_trace":
        out = estimators.hutchinson_trace(matvec, d, n_probes=4, rng=rng)
    elif name == "hutchpp_trace":
        out = estimators.hutchpp_trace(matvec, d, n_matvecs=6, rng=rng)
    else:
        J = 0.1 * A

        def vjp(V):
            return xp.matmul(xp.asarray(V), xp.asarray(J))

        out = estimators.power_series_logdet(vjp, 1, d, n_terms=3, rng=rng)
    if isinstance(out, (np.ndarray, np.generic, float)):
        return False, "falls back to NumPy: the result is a NumPy value"
    return True, "ran on the namespace"


def _where(exc) -> str:
    """The innermost flowmath frame of ``exc``'s traceback as ``module.function``."""
    import traceback

    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "flowmath" in f.filename]
    if not frames:
        return "?"
    f = frames[-1]
    module = f.filename.split("flowmath", 1)[1].strip("/\\").removesuffix(".py")
    return f"{module.replace('/', '.')}.{f.name}"


def _failure(exc) -> tuple[bool, str]:
    return False, f"{type(exc).__name__} in {_where(exc)}: {exc}"[:160]


def array_api_report(xp=None) -> dict:
    """``{name: (runs, detail)}`` for every layer of :data:`CASES` and every estimator of
    :data:`ESTIMATORS` on the namespace ``xp`` (default: ``array_api_strict``).

    A layer *runs* when its ``_forward`` and ``_inverse`` (the implementations, below the
    base class's NumPy validation) return arrays of ``xp`` equal to NumPy's results to
    ``1e-10``; otherwise ``detail`` is the exception (type and message) or why it fell back.
    """
    if xp is None:
        import array_api_strict as xp
    rng = np.random.default_rng(0)
    report = {}
    for case in CASES:
        try:
            report[case.name] = _run_private(case, xp, rng)
        except Exception as exc:  # noqa: BLE001 - a failure is the measurement
            report[case.name] = _failure(exc)
    for name in ESTIMATORS:
        try:
            report[name] = _run_estimator(name, xp, rng)
        except Exception as exc:  # noqa: BLE001
            report[name] = _failure(exc)
    return report


def _timed(fn, repeats, sync=lambda: None):
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def gpu_check(batch: int = 256, repeats: int = 5, out=print) -> int:
    """Run every layer's public ``forward`` and ``inverse`` on CuPy against NumPy.

    Prints one line per layer: the largest absolute differences of ``y``, the log-det and the
    round trip against NumPy (float64), and the best-of-``repeats`` times on the GPU and on the
    CPU. Returns 0 when all layers ran and agree to ``1e-8`` (relative to the NumPy values),
    1 when one differs or fails, and 0 after a message when CuPy or a GPU is missing (nothing
    to check on this machine).
    """
    try:
        import cupy as cp
    except ImportError:
        out("gpu-check: CuPy is not installed (pip install 'flowmath[gpu]'); nothing checked")
        return 0
    try:
        n_dev = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - no driver, no device: say so
        out(f"gpu-check: CuPy found no GPU ({type(exc).__name__}: {exc}); nothing checked")
        return 0
    if n_dev == 0:
        out("gpu-check: CuPy found no GPU; nothing checked")
        return 0
    from ._pytree import tree_map

    sync = cp.cuda.Device().synchronize
    out(f"gpu-check on {cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}, batch {batch}")
    out(f"{'layer':<22s} {'|dy|':>9s} {'|dlogdet|':>9s} {'|dx|':>9s} {'gpu ms':>8s} {'cpu ms':>8s}")
    failures = []
    rng = np.random.default_rng(0)
    for case in CASES:
        layer = case.make()
        x = _draw(case, rng, batch)
        params = layer.init(rng, x)
        try:
            y, ld = layer.forward(params, x)
            xb, _ = layer.inverse(params, y)
            pg, xg = tree_map(cp.asarray, params), cp.asarray(x)
            yg, ldg = layer.forward(pg, xg)
            xbg, _ = layer.inverse(pg, yg)
            errs = [
                float(np.max(np.abs(cp.asnumpy(a) - b)) / max(1.0, float(np.max(np.abs(b)))))
                for a, b in ((yg, y), (ldg, ld), (xbg, xb))
            ]
            t_gpu = _timed(lambda pg=pg, xg=xg, layer=layer: layer.forward(pg, xg), repeats, sync)
            t_cpu = _timed(
                lambda params=params, x=x, layer=layer: layer.forward(params, x), repeats
            )
        except Exception as exc:  # noqa: BLE001 - report and go on
            failures.append(case.name)
            out(f"{case.name:<22s} FAILED {type(exc).__name__}: {str(exc)[:80]}")
            continue
        flag = "" if max(errs) < 1e-8 else "  <-- differs"
        if flag:
            failures.append(case.name)
        out(
            f"{case.name:<22s} {errs[0]:9.1e} {errs[1]:9.1e} {errs[2]:9.1e} "
            f"{1e3 * t_gpu:8.2f} {1e3 * t_cpu:8.2f}{flag}"
        )
    if failures:
        out(f"gpu-check: {len(failures)} layer(s) failed or differ: {', '.join(failures)}")
        return 1
    out("gpu-check: every layer agrees with NumPy")
    return 0
