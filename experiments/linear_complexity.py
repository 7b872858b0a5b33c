"""Complexity of the inverse and the log-det of every linear layer and convolution, measured.

docs/theory.rst's table gives a cost for the inverse and the log-determinant of each linear layer
and convolution. Here each is timed over a range of sizes (median of repeats, each repeat looped
to last at least ``min_time``), the slope of log(time) against log(size) is fitted by least
squares, and the fitted exponents are tabulated beside the table's. Because a cost model such as
``d log d`` or ``c^3 + c^2 hw`` is not a pure power, the "model slope" column gives the slope the
model itself has over the same sizes.

What is timed: ``layer.inverse(params, y)`` through the public API (validation included), and
the log-det expression each layer evaluates inside ``forward`` (``FullLinear._logdet``,
``BlockDiagonalLinear._logdet``, ``InvConv1x1._logdet``, the Fourier log-det of
``PeriodicConv2d``, the centre-tap sum of ``EmergingConv2d``, and ``sum(log_scale)``,
``sum(log_diag)``, ``sum(log_s)`` for the diagonal, triangular and LU layers), checked first
against the log-det that ``forward`` returns. The ``O(d)`` log-dets only read a length-``d``
vector, so they are timed at sizes up to millions, where the work is larger than Python's
per-call overhead; the ``O(d^2)`` and ``O(d^3)`` operations at ``d`` up to a few thousand.
The 1x1 convolution is swept in ``c`` (at a 2 x 2 image, where the ``c^3`` term dominates) and
in ``h w`` (at fixed ``c``) separately. Slopes are fitted to the medians (and, for reference, to
the minima, the usual estimator of the cost without interference) over the repeats.

The timings run in a child process with a single-threaded BLAS (``Config.blas_threads``; see
:func:`experiments._timing.in_child_process`): a multi-threaded BLAS on a shared,
oversubscribed machine measures the scheduler, and its parallel efficiency grows with the
matrix size, which bends exponents.

Every fitted exponent more than ``DEVIATION = 0.3`` from the model slope is marked in the table
and the figure with the reason (:func:`explain`): the same operations counted instead of timed
(:func:`flowmath._opcount.cost_exponents`, asserted in ``tests/test_complexity.py``) have the
theory's slopes to within 0.15, so every such deviation is a property of the machine, not of
the algorithm; ``docs/theory-costs.md`` derives the true costs where the lecture's table is loose.

Caveats (reported with the numbers): timings on a shared machine are noisy; BLAS/LAPACK become
more efficient as matrices grow (blocking, cache reuse), which pulls the fitted exponents of the
``O(d^3)`` factorisations below 3 on small sizes; and anything near a microsecond is call
overhead, not the algorithm.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import statistics

import autograd.numpy as anp
import numpy as np

import flowmath as fm
from experiments._common import fit_loglog_slope, setup_matplotlib, tex_table
from experiments._timing import THREAD_VARS, alternate, in_child_process

__all__ = ["DEVIATION", "Config", "explain", "plot", "run", "tex"]

#: A timed exponent further than this from the model slope is marked and explained.
DEVIATION = 0.3

#: Why a timed exponent leaves the model slope (keys used in the table's "note" column).
REASONS = {
    "blas": (
        "LAPACK's blocked factorisations run more flops per second as n grows (level-3 BLAS, "
        "cache blocking), pulling cubic slopes below 3; counted flops give 3"
    ),
    "blocks": (
        "d/c small blocks: numpy's batched LAPACK pays a per-block overhead that falls as the "
        "blocks get fewer and larger, offsetting the flops, quadratic in c; counted flops give 2"
    ),
    "memory": (
        "the O(d) reductions stream 2-32 MiB vectors that leave the cache as d grows: time per "
        "element rises (memory bandwidth); counted flops give 1"
    ),
}


@dataclasses.dataclass(frozen=True)
class Config:
    dense_sizes: tuple = (256, 512, 1024, 2048)
    vector_sizes: tuple = (2**18, 2**19, 2**20, 2**21, 2**22)
    block_size: int = 8
    block_d_sizes: tuple = (2**14, 2**15, 2**16, 2**17)
    block_c_sizes: tuple = (8, 16, 32, 64, 128, 256)
    block_c_d: int = 2**13
    batch: int = 4
    conv1x1_channels: tuple = (128, 256, 512, 1024)
    conv1x1_sides: tuple = (64, 128, 256, 512)
    conv1x1_fixed_c: int = 16
    periodic_sides: tuple = (32, 64, 128, 256)
    emerging_sides: tuple = (64, 128, 256, 512)
    spatial_channels: int = 2
    repeats: int = 7
    min_time: float = 5e-3
    blas_threads: int | None = 1
    seed: int = 0

    @classmethod
    def quick(cls) -> Config:
        return cls(
            dense_sizes=(256, 512, 1024),
            vector_sizes=(2**18, 2**19, 2**20, 2**21),
            block_d_sizes=(2**13, 2**14, 2**15, 2**16),
            block_c_sizes=(16, 32, 64, 128),
            conv1x1_channels=(96, 192, 384, 768),
            conv1x1_sides=(64, 128, 256),
            periodic_sides=(32, 64, 128),
            emerging_sides=(64, 128, 256),
            repeats=5,
            min_time=3e-3,
        )


def _time_sizes(fns, repeats, min_time):
    """Seconds per call of each function: median and minimum over ``repeats``. The sizes are
    visited round-robin within each repeat, so a burst of load on the shared machine hits all
    sizes alike instead of bending the fitted slope."""
    times = alternate(dict(enumerate(fns)), repeats, min_time=min_time)
    return ([statistics.median(v) for v in times.values()], [min(v) for v in times.values()])


def _model_slope(model, sizes):
    return fit_loglog_slope(sizes, [model(float(s)) for s in sizes])


def _check(value, reference, what):
    if not np.allclose(np.asarray(value), np.asarray(reference).ravel()[0], rtol=1e-10, atol=0):
        raise AssertionError(f"{what}: timed log-det {value} differs from forward's {reference}")


# -- one builder per (layer, operation, swept size): returns the function to time ----------------


def _linear_setup(layer, rng, d, n):
    x = rng.normal(size=(n, d))
    params = layer.init(rng, x)
    y, logdet = layer.forward(params, x)
    return params, y, logdet


def _series(config):
    """The measurements: (layer, operation, swept variable, sizes, table entry, model, build)."""
    n = config.batch
    dense, vec = config.dense_sizes, config.vector_sizes
    c1 = config.conv1x1_fixed_c
    cs = config.spatial_channels
    out = []

    def add(layer, op, var, sizes, table, model, build, count=None):
        out.append(
            {
                "layer": layer,
                "op": op,
                "var": var,
                "sizes": list(sizes),
                "table": table,
                "count": count or table,
                "model": model,
                "build": build,
            }
        )

    # linear layers ------------------------------------------------------------------------
    def linear(make, op, batch):
        """Builder: ``make(size) -> (layer, d)``; times ``layer.inverse`` on ``batch`` rows, or
        the log-det ``layer._logdet(W)`` (checked against ``forward``'s)."""

        def build(rng, size):
            layer, d = make(size)
            params, y, ld = _linear_setup(layer, rng, d, batch)
            if op == "inverse":
                return lambda: layer.inverse(params, y)
            _check(layer._logdet(params["W"]), ld, type(layer).__name__)
            return lambda: layer._logdet(params["W"])

        return build

    def sized(layer_cls):
        return lambda d: (layer_cls(), d)

    def vector_logdet(layer_cls, key, **kw):
        def build(rng, d):
            layer = layer_cls(**kw)
            small = layer.init(rng, rng.normal(size=(1, 16)))
            ld = layer.forward(small, rng.normal(size=(1, 16)))[1]
            _check(anp.sum(small[key]), ld, layer_cls.__name__)
            vecp = {key: 0.1 * rng.normal(size=d)}
            return lambda: anp.sum(vecp[key])

        return build

    add(
        "FullLinear",
        "inverse",
        "d",
        dense,
        "d^3",
        lambda d: d**3 + n * d**2,
        linear(sized(fm.FullLinear), "inverse", n),
    )
    add(
        "FullLinear",
        "log-det",
        "d",
        dense,
        "d^3",
        lambda d: d**3,
        linear(sized(fm.FullLinear), "log-det", 1),
    )
    add(
        "DiagonalLinear",
        "inverse",
        "d",
        vec,
        "d",
        lambda d: d,
        linear(sized(fm.DiagonalLinear), "inverse", 1),
    )
    add(
        "DiagonalLinear",
        "log-det",
        "d",
        vec,
        "d",
        lambda d: d,
        vector_logdet(fm.DiagonalLinear, "log_scale"),
    )
    add(
        "TriangularLinear",
        "inverse",
        "d",
        dense,
        "d^2",
        lambda d: n * d**2,
        linear(sized(fm.TriangularLinear), "inverse", n),
    )
    add(
        "TriangularLinear",
        "log-det",
        "d",
        vec,
        "d",
        lambda d: d,
        vector_logdet(fm.TriangularLinear, "log_diag"),
    )

    cb, db = config.block_size, config.block_c_d

    def block_c(c):  # block size swept, d fixed
        return fm.BlockDiagonalLinear(c), db

    def block_d(d):  # d swept, block size fixed
        return fm.BlockDiagonalLinear(cb), d

    add(
        f"BlockDiagonalLinear (c={cb})",
        "inverse",
        "d",
        config.block_d_sizes,
        "c^3 d",
        lambda d: d * cb**2 + n * d * cb,
        linear(block_d, "inverse", n),
        "c^2 d + n c d",
    )
    add(
        f"BlockDiagonalLinear (c={cb})",
        "log-det",
        "d",
        config.block_d_sizes,
        "c^3 d",
        lambda d: d * cb**2,
        linear(block_d, "log-det", 1),
        "c^2 d",
    )
    add(
        f"BlockDiagonalLinear (d={db})",
        "inverse",
        "c",
        config.block_c_sizes,
        "c^3 d",
        lambda c: db * c**2 + n * db * c,
        linear(block_c, "inverse", n),
        "c^2 d + n c d",
    )
    add(
        f"BlockDiagonalLinear (d={db})",
        "log-det",
        "c",
        config.block_c_sizes,
        "c^3 d",
        lambda c: db * c**2,
        linear(block_c, "log-det", 1),
        "c^2 d",
    )

    add(
        "LULinear",
        "inverse",
        "d",
        dense,
        "d^2",
        lambda d: n * d**2,
        linear(sized(fm.LULinear), "inverse", n),
    )
    add("LULinear", "log-det", "d", vec, "d", lambda d: d, vector_logdet(fm.LULinear, "log_s"))

    # 1x1 convolution: c and h*w apart -----------------------------------------------------
    def conv1x1(lu, op, sweep):
        def build(rng, size):
            c, side, batch = (size, 2, 1) if sweep == "c" else (c1, size, n)
            layer = fm.InvConv1x1(lu=lu)
            x = rng.normal(size=(batch, c, side, side))
            params = layer.init(rng, x)
            y, ld = layer.forward(params, x)
            if op == "inverse":
                return lambda: layer.inverse(params, y)
            _check(layer._logdet(params, x), ld, "InvConv1x1")
            return lambda: layer._logdet(params, x)

        return build

    for lu, tag in ((False, "plain"), (True, "LU")):
        add(
            f"InvConv1x1 {tag} (h=w=2)",
            "inverse",
            "c",
            config.conv1x1_channels,
            "c^3 + c^2 d",
            lambda c: c**3 + 4 * c**2,
            conv1x1(lu, "inverse", "c"),
            "c^3 + c^2 hw",
        )
        add(
            f"InvConv1x1 {tag} (c={c1}, n={n})",
            "inverse",
            "hw",
            [s * s for s in config.conv1x1_sides],
            "c^3 + c^2 d",
            lambda hw: c1**3 + c1**2 * hw,
            _on_side(conv1x1(lu, "inverse", "hw")),
            "c^3 + c^2 hw",
        )
    add(
        "InvConv1x1 plain (h=w=2)",
        "log-det",
        "c",
        config.conv1x1_channels,
        "c^3",
        lambda c: c**3,
        conv1x1(False, "log-det", "c"),
    )
    add(
        f"InvConv1x1 plain (c={c1}, n={n})",
        "log-det",
        "hw",
        [s * s for s in config.conv1x1_sides],
        "c^3",
        lambda hw: 1.0,
        _on_side(conv1x1(False, "log-det", "hw")),
        "c^3, none in hw",
    )

    def conv1x1_lu_logdet(rng, c):
        layer = fm.InvConv1x1(lu=True)
        x = rng.normal(size=(1, 3, 2, 2))
        small = layer.init(rng, x)
        _check(layer._logdet(small, x), layer.forward(small, x)[1], "InvConv1x1 LU")
        params = {"log_s": 0.1 * rng.normal(size=c)}
        xc = np.zeros((1, c, 1, 1))
        return lambda: layer._logdet(params, xc)

    add(
        "InvConv1x1 LU (h=w=1)",
        "log-det",
        "c",
        vec,
        "c^3",
        lambda c: c,
        conv1x1_lu_logdet,
        "c (sum of log|s|)",
    )

    # spatial convolutions: swept in h*w at fixed c ------------------------------------------
    def spatial(layer_cls, op, logdet_of):
        def build(rng, side):
            layer = layer_cls()
            x = rng.normal(size=(1, cs, side, side))
            params = layer.init(rng, x)
            y, ld = layer.forward(params, x)
            if op == "inverse":
                return lambda: layer.inverse(params, y)
            logdet = functools.partial(logdet_of, layer, params, x)
            _check(logdet(), ld, layer_cls.__name__)
            return logdet

        return build

    def periodic_logdet(layer, params, x):
        side = x.shape[-1]
        return layer._checked_logdet(layer.fourier_matrices(params, side, side), x.dtype)

    def emerging_logdet(layer, params, x):
        return layer._logdet(layer._parts(params), x)

    def periodic(op):
        return spatial(fm.PeriodicConv2d, op, periodic_logdet)

    def emerging(op):
        return spatial(fm.EmergingConv2d, op, emerging_logdet)

    hw_sizes = [s * s for s in config.periodic_sides]
    add(
        f"PeriodicConv2d (c={cs})",
        "inverse",
        "hw",
        hw_sizes,
        "d log d",
        lambda hw: hw * np.log(hw) + hw * cs,
        _on_side(periodic("inverse")),
        "c hw log hw + c^3 hw",
    )
    add(
        f"PeriodicConv2d (c={cs})",
        "log-det",
        "hw",
        hw_sizes,
        "d",
        lambda hw: hw * np.log(hw) + hw * cs,
        _on_side(periodic("log-det")),
        "c^2 hw log hw + c^3 hw",
    )
    hw_sizes = [s * s for s in config.emerging_sides]
    add(
        f"EmergingConv2d (c={cs})",
        "inverse",
        "hw",
        hw_sizes,
        "d log d",
        lambda hw: hw,
        _on_side(emerging("inverse")),
        "c^2 k^2 hw",
    )
    add(
        f"EmergingConv2d (c={cs})",
        "log-det",
        "hw",
        hw_sizes,
        "d",
        lambda hw: 1.0,
        _on_side(emerging("log-det")),
        "c, none in hw",
    )
    return out


def _on_side(build):
    """Adapt a builder taking the image side to one taking ``h w`` (square images)."""
    return lambda rng, hw: build(rng, int(round(np.sqrt(hw))))


def _measure(config: Config) -> dict:
    rng = np.random.default_rng(config.seed)
    rows = []
    for s in _series(config):
        fns = [s["build"](rng, size) for size in s["sizes"]]
        times, fastest = _time_sizes(fns, config.repeats, config.min_time)
        del fns
        rows.append(
            {
                "layer": s["layer"],
                "op": s["op"],
                "var": s["var"],
                "sizes": s["sizes"],
                "table": s["table"],
                "count": s["count"],
                "times": times,
                "times_min": fastest,
                "model_slope": _model_slope(s["model"], s["sizes"]),
                "fitted_slope": fit_loglog_slope(s["sizes"], times),
                "fitted_slope_min": fit_loglog_slope(s["sizes"], fastest),
            }
        )
    return {
        "rows": rows,
        "cpu_count": os.cpu_count(),
        "threads_env": {k: os.environ.get(k) for k in THREAD_VARS},
    }


def run(config: Config) -> dict:
    results = in_child_process(_measure, config, config.blas_threads)
    results["blas_threads"] = config.blas_threads
    return results


def plot(results: dict, path) -> None:
    plt = setup_matplotlib()
    rows = results["rows"]
    groups = []
    for r in rows:
        key = r["layer"].split(" (")[0].replace(" plain", "").replace(" LU", "")
        if key not in groups:
            groups.append(key)
    ncol = 3
    nrow = (len(groups) + 1 + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(12.5, 3.3 * nrow))
    axes = axes.ravel()
    styles = {"inverse": "o-", "log-det": "s--"}
    for ax, g in zip(axes, groups, strict=False):
        for r in rows:
            if r["layer"].split(" (")[0].replace(" plain", "").replace(" LU", "") != g:
                continue
            sub = r["layer"][len(g) :].strip()
            label = (
                f"{r['op']} vs {r['var']}{' ' + sub if sub else ''}: "
                f"{r['fitted_slope']:.2f} ({r['model_slope']:.2f})"
            )
            ax.loglog(r["sizes"], np.asarray(r["times"]) * 1e3, styles[r["op"]], label=label)
        ax.set_title(g)
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_xlabel("size swept (d, c or h w)")
        ax.set_ylabel("time [ms]")
        ax.legend(fontsize=6)
    ax = axes[len(groups)]
    model = [r["model_slope"] for r in rows]
    fitted = [r["fitted_slope"] for r in rows]
    colors = ["C0" if r["op"] == "inverse" else "C1" for r in rows]
    ax.scatter(model, fitted, c=colors, s=18)
    lim = [-0.5, 3.5]
    ax.plot(lim, lim, "k:", lw=0.8)
    band = np.array(lim)
    ax.fill_between(band, band - DEVIATION, band + DEVIATION, color="0.9", zorder=0)
    for r in rows:
        key = explain(r)
        if key:
            ax.scatter([r["model_slope"]], [r["fitted_slope"]], s=70, facecolors="none",
                       edgecolors="red")  # fmt: skip
            ax.annotate(key, (r["model_slope"], r["fitted_slope"]), fontsize=6, color="red",
                        xytext=(4, -8), textcoords="offset points")  # fmt: skip
    ax.set_xlim(lim)
    ax.set_ylim(lim)
    ax.set_xlabel("theory: slope of the cost model")
    ax.set_ylabel("measured: fitted log-log slope")
    ax.set_title(
        f"fitted vs theory (blue inverse, orange log-det); red: > {DEVIATION} off", fontsize=8
    )
    for ax in axes[len(groups) + 1 :]:
        ax.axis("off")
    fig.suptitle("Cost of inverse and log-det; legend: fitted slope (model slope)", y=1.0)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def explain(row: dict) -> str | None:
    """The key of :data:`REASONS` for a row whose timed exponent is more than
    :data:`DEVIATION` from its model slope (``"unexplained"`` if no known cause fits); ``None``
    when the row is within the band."""
    gap = row["fitted_slope"] - row["model_slope"]
    if abs(gap) <= DEVIATION:
        return None
    if row["layer"].startswith("BlockDiagonal") and row["var"] == "c" and gap < 0:
        return "blocks"
    if row["model_slope"] >= 2.5 and gap < 0:
        return "blas"
    if row["model_slope"] <= 1.2 and gap > 0 and max(row["sizes"]) >= 2**18:
        return "memory"
    return "unexplained"


def _math(expr: str) -> str:
    expr = expr.replace("log|s|", "\\log|s|").replace("log ", "\\log ")
    head, _, tail = expr.partition(", ")
    text = f"$O({head})$"
    return text + (f", {tail}" if tail else "")


def tex(results: dict) -> str:
    rows = []
    for r in results["rows"]:
        sizes = f"{r['sizes'][0]}--{r['sizes'][-1]}"
        rows.append(
            [
                r["layer"],
                r["op"],
                f"${r['var']}$ ({sizes})",
                _math(r["table"]),
                _math(r["count"]),
                r["model_slope"],
                r["fitted_slope"],
                r.get("fitted_slope_min"),
                explain(r) or "",
            ]
        )
    threads = results.get("blas_threads")
    blas = "BLAS as configured" if threads is None else f"{threads}-thread BLAS"
    caption = (
        "Measured complexity exponents: least-squares slope of log(time) against "
        "log(size) (fitted to the medians, and to the minima over the repeats), beside "
        "the cost in the lecture's table, the operation count of the implementation "
        "and the slope that count has over the same sizes "
        f"(shared CPU, {blas}). Note: the fitted (median) exponent is more than {DEVIATION} "
        "from the model slope because "
        + "; ".join(
            f"({key}) {REASONS[key]}"
            for key in REASONS
            if any(explain(r) == key for r in results["rows"])
        )
        + (
            "; (unexplained) to investigate"
            if any(explain(r) == "unexplained" for r in results["rows"])
            else ""
        )
        + ". Counted operations (machine-independent, asserted in the test suite) have the "
        "theory's slopes to within 0.15."
    )
    return tex_table(
        [
            "layer",
            "operation",
            "swept",
            "table",
            "count",
            "model slope",
            "fitted (median)",
            "fitted (min)",
            "note",
        ],
        rows,
        caption,
        "tab:linear-complexity",
        fmt="{:.2f}",
    )
