"""The cost claims of the linear layers, asserted on COUNTED operations (never on timings).

:func:`flowmath._opcount.count_flops` counts the floating-point operations of every array call
the layer modules make (matrix products, factorisations, solves, FFTs, the emerging kernels),
from the arguments' shapes; the exponent of each sweep is fitted by least squares on a log-log
scale and compared with the slope of the theory's formula on the same sizes. Lower-order terms
at these sizes move the fitted slopes by at most 0.15 (measured); a wrong algorithm (a dense
solve where a triangular one is claimed, a dense block matrix) moves them by 1 or more.
"""

import numpy as np
import pytest

import flowmath as fm
from flowmath._opcount import cost_exponents, count_flops, fit_exponent

BAND = 0.2  # |fitted - theory| allowed; measured <= 0.15 (quick sweeps), <= 0.12 (full)


@pytest.fixture(scope="module")
def quick_rows():
    return cost_exponents(quick=True)


def _label(r):
    return f"{r['layer']} {r['op']} vs {r['variable']}"


def test_every_linear_type_is_covered(quick_rows):
    names = {r["layer"].split("(")[0] for r in quick_rows}
    assert names >= {
        "FullLinear", "DiagonalLinear", "TriangularLinear", "BlockDiagonalLinear",
        "LULinear", "InvConv1x1", "PeriodicConv2d", "EmergingConv2d",
    }  # fmt: skip
    for name in names:
        ops = {r["op"] for r in quick_rows if r["layer"].startswith(name)}
        assert "inverse" in ops and any("log-det" in o for o in ops), (name, ops)


def test_cost_exponents_match_theory_quick(quick_rows):
    bad = [
        (_label(r), round(r["fitted"], 2), round(r["expected"], 2))
        for r in quick_rows
        if abs(r["fitted"] - r["expected"]) > BAND
    ]
    assert not bad, bad


@pytest.mark.slow
def test_cost_exponents_match_theory_full():
    rows = cost_exponents(quick=False)
    bad = [
        (_label(r), r["fitted"], r["expected"])
        for r in rows
        if abs(r["fitted"] - r["expected"]) > 0.15
    ]
    assert not bad, bad


def test_block_diagonal_is_c2_d_not_c3_d():
    """d/c blocks of O(c^3) each: O(c^2 d) in total, the lecture's O(c^3 d) is an upper bound.
    At d = 256 the counted inverse grows like c^2 (slope within 0.15 of 2, far from 3)."""
    rng = np.random.default_rng(0)
    cs, counts = (4, 8, 16, 32), []
    for c in cs:
        layer = fm.BlockDiagonalLinear(c)
        x = rng.normal(size=(1, 256))
        params = layer.init(rng, x)
        with count_flops() as n:
            layer.inverse(params, x)
        counts.append(n.total)
    slope = fit_exponent(cs, counts)
    assert abs(slope - 2.0) < 0.15, slope


def test_counter_sees_the_routines_the_docstrings_name():
    """The op-count model is checked against the implementation: the routines counted are the
    ones each layer's docstring claims (a triangular inverse uses substitution, not a dense
    solve; LU's log-det no factorisation; the periodic inverse FFTs and per-frequency solves)."""
    rng = np.random.default_rng(1)

    def calls(layer, shape, op):
        x = rng.normal(size=shape)
        params = layer.init(rng, x)
        y, _ = layer.forward(params, x)
        with count_flops() as n:
            (layer.inverse if op == "inverse" else layer.forward)(
                params, y if op == "inverse" else x
            )
        return {k for k, v in n.by_call.items() if v > 0}

    assert "solve_triangular" in calls(fm.TriangularLinear(), (1, 8), "inverse")
    assert not {"linalg.solve", "linalg.inv"} & calls(fm.TriangularLinear(), (1, 8), "inverse")
    assert not {"linalg.slogdet", "linalg.solve", "linalg.inv"} & calls(
        fm.LULinear(), (1, 8), "forward"
    )
    # plain arrays: the real FFT of the batch (the kernel's matrices through fft2)
    assert {"fft.fft2", "fft.rfft2", "fft.irfft2", "linalg.solve"} <= calls(
        fm.PeriodicConv2d(), (1, 2, 4, 4), "inverse"
    )
    assert "ar_solve" in calls(fm.EmergingConv2d(), (1, 2, 4, 4), "inverse")
    assert "linalg.slogdet" not in calls(fm.InvConv1x1(lu=True), (1, 3, 4, 4), "forward")
