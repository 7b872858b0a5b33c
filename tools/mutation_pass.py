"""A mutation pass over flowmath's mathematics: does the test suite catch small deliberate errors?

Each mutation replaces ONE snippet of a library file (it must occur exactly once) by a slightly
wrong one — a 1 %, 2 % or 5 % bias of an estimator, an inflated bound, a loop that stops one
iteration early, a wrong tableau coefficient — runs the tests that should catch it, and restores
the file. It runs on a COPY of the repository (a detached ``git worktree`` of HEAD, so only
committed code is mutated), never on the working tree, and checks after every mutation that the
copy is clean again (``git diff --quiet``).

Usage::

    python tools/mutation_pass.py [--keep] [--only SUBSTRING] [--json PATH]

prints one line per mutation (caught / SURVIVED, the seconds it took) and the totals.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COPY = Path("/tmp/flowmath-mutation")


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


P = "tests/test_power.py"
R = "tests/test_residual.py"
REF = "tests/test_references.py"
EL = "tests/test_estimators_logdet.py"
ET = "tests/test_estimators_trace.py"
CNF = "tests/test_cnf.py"
ODE = ("tests/test_ode.py", "tests/test_ode_registry.py", "tests/test_ode_adjoint.py")

_SERIES = "            return estimators.power_series_logdet("
_ROUL = "            dtype=dtype,\n        ).logdet"
_GAUSS = (
    "            return rng.standard_normal(shape).astype(dtype, copy=False)\n        return (2.0"
)
_RADE = "        return (2.0 * rng.integers(0, 2, size=shape) - 1.0).astype(dtype, copy=False)"
_SURR = "            surrogate = surrogate + (s - getval(s))"

MUTATIONS = [
    # -- biases of the layer-level stochastic paths (item 1 of issue 10) --------------------
    *[
        Mutation(
            f"IResBlock series log-det x{1 + b}",
            "flowmath/layers/residual.py",
            _SERIES,
            _SERIES.replace("return ", f"return {1 + b!r} * "),
            (P, R),
        )
        for b in (0.01, 0.02, 0.05)
    ],
    *[
        Mutation(
            f"IResBlock roulette log-det x{1 + b}",
            "flowmath/layers/residual.py",
            _ROUL,
            _ROUL + f" * {1 + b!r}",
            (P, R),
        )
        for b in (0.01, 0.02, 0.05)
    ],
    *[
        Mutation(
            f"CNF Gaussian probe x{s} (log-det x{s * s:.4f})",
            "flowmath/layers/continuous.py",
            _GAUSS,
            _GAUSS.replace("return rng", f"return {s!r} * rng"),
            (P, CNF),
        )
        for s in (1.005, 1.01, 1.025)
    ],
    *[
        Mutation(
            f"CNF Rademacher probe +1 -> {1 + b:g} (log-det x{1 + b / 2 + b * b / 4:.4f})",
            "flowmath/layers/continuous.py",
            _RADE,
            _RADE.replace("(2.0 *", f"({2 + b!r} *"),
            (P, CNF),
        )
        for b in (0.02, 0.04, 0.1)
    ],
    *[
        Mutation(
            f"Neumann gradient x{1 + b}",
            "flowmath/estimators/logdet.py",
            _SURR,
            _SURR.replace("+ (s", f"+ {1 + b!r} * (s"),
            (P, EL),
        )
        for b in (0.01, 0.02, 0.05)
    ],
    # -- estimators, their variances and bounds ---------------------------------------------
    Mutation(
        "hutchinson_trace x1.01",
        "flowmath/estimators/trace.py",
        "    return xp.mean(xp.sum(V * AV, axis=1))",
        "    return 1.01 * xp.mean(xp.sum(V * AV, axis=1))",
        (P, ET),
    ),
    Mutation(
        "hutchpp remainder x1.02",
        "flowmath/estimators/trace.py",
        "    return sketch + remainder",
        "    return sketch + 1.02 * remainder",
        (P, ET),
    ),
    Mutation(
        "Gaussian Hutchinson variance x1.02",
        "flowmath/estimators/trace.py",
        "        return 2.0 * fro2",
        "        return 2.04 * fro2",
        (ET, EL),
    ),
    Mutation(
        "Rademacher variance: diagonal term x0.98",
        "flowmath/estimators/trace.py",
        "    return 2.0 * (fro2 - float(np.sum(np.diag(A) ** 2)))",
        "    return 2.0 * (fro2 - 0.98 * float(np.sum(np.diag(A) ** 2)))",
        (ET, EL),
    ),
    Mutation(
        "roulette weights x0.99",
        "flowmath/estimators/logdet.py",
        "    coef = np.where(keep, 1.0 / np.where(keep, surv, 1.0), 0.0)",
        "    coef = np.where(keep, 0.99 / np.where(keep, surv, 1.0), 0.0)",
        (P, EL),
    ),
    Mutation(
        "geometric survival off by one",
        "flowmath/estimators/logdet.py",
        "        return np.power(1.0 - p, np.maximum(k, 1) - 1).astype(np.float64)",
        "        return np.power(1.0 - p, np.maximum(k, 1)).astype(np.float64)",
        (EL,),
    ),
    Mutation(
        "series term sign (k+1 -> k on one pass)",
        "flowmath/estimators/logdet.py",
        "            total = total + ((-1.0) ** (k + 1) / k) * coef[k - 1] * xp.sum(w * v, axis=1)",
        "            total = total + ((-1.0) ** (k + 1) / (k + (k == 3))) * coef[k - 1]"
        " * xp.sum(w * v, axis=1)",
        (P, EL),
    ),
    Mutation(
        "truncation bound x1.1",
        "flowmath/estimators/logdet.py",
        "    return dim * _log_series_tail(L, n_terms)",
        "    return 1.1 * dim * _log_series_tail(L, n_terms)",
        (EL, REF),
    ),
    Mutation(
        "truncation bound: one term too few",
        "flowmath/estimators/logdet.py",
        "    return dim * _log_series_tail(L, n_terms)",
        "    return dim * _log_series_tail(L, n_terms + 1)",
        (EL, REF),
    ),
    Mutation(
        "power_series_bias_std std x1.02",
        "flowmath/estimators/logdet.py",
        "        std.append(math.sqrt(hutchinson_variance(M, probe) / n_probes))",
        "        std.append(1.02 * math.sqrt(hutchinson_variance(M, probe) / n_probes))",
        (EL, REF),
    ),
    Mutation(
        "roulette_std: second moment x1.01",
        "flowmath/estimators/logdet.py",
        "        second += 2.0 * np.sum(pair[:-1]) + pair[-1]",
        "        second += 1.01 * (2.0 * np.sum(pair[:-1]) + pair[-1])",
        (EL, REF),
    ),
    # -- fixed point and Lipschitz ----------------------------------------------------------
    Mutation(
        "fixed point: a-priori bound x10",
        "flowmath/layers/residual.py",
        "        a_priori = L**k / (1.0 - L) * d0",
        "        a_priori = 10 * L**k / (1.0 - L) * d0",
        (R, REF),
    ),
    Mutation(
        "fixed point: a-posteriori bound x0.5",
        "flowmath/layers/residual.py",
        "        a_post = L / (1.0 - L) * _row_norm(x - x_prev)",
        "        a_post = 0.5 * L / (1.0 - L) * _row_norm(x - x_prev)",
        (R, REF),
    ),
    Mutation(
        "fixed point: stops one iteration early",
        "flowmath/layers/residual.py",
        "        if np.all(bound <= thresh):",
        "        if np.all(bound * L <= thresh):",
        (R, REF),
    ),
    Mutation(
        "certified Lipschitz x0.99",
        "flowmath/layers/residual.py",
        "        return L * (1.0 + 8 * len(Wn) * np.finfo(np.float64).eps)",
        "        return 0.99 * L * (1.0 + 8 * len(Wn) * np.finfo(np.float64).eps)",
        (R, REF),
    ),
    Mutation(
        "gram certificate loses its rounding term",
        "flowmath/lipschitz.py",
        "        bound_lam = _up(t + _up(err, 2 * n), 8)",
        "        bound_lam = lam",
        ("tests/test_lipschitz.py", REF),
    ),
    # -- exact log-dets ----------------------------------------------------------------------
    Mutation(
        "LULinear / InvConv1x1 log|s| x1.001",
        "flowmath/layers/conv.py",
        '        return hw * xp.linalg.slogdet(params["weight"])[1]',
        '        return 1.001 * hw * xp.linalg.slogdet(params["weight"])[1]',
        ("tests/test_conv.py", "tests/test_contract.py", "tests/test_glow.py"),
    ),
    Mutation(
        "periodic conv: one frequency dropped",
        "flowmath/layers/conv.py",
        "        return xp.sum(xp.linalg.slogdet(mats)[1])",
        "        return xp.sum(xp.linalg.slogdet(mats)[1][1:])",
        ("tests/test_conv.py", "tests/test_contract.py"),
    ),
    Mutation(
        "block-diagonal log-det x1.001",
        "flowmath/layers/linear.py",
        "        return anp.sum(anp.linalg.slogdet(W)[1])",
        "        return 1.001 * anp.sum(anp.linalg.slogdet(W)[1])",
        ("tests/test_linear_elementwise.py", "tests/test_contract.py"),
    ),
    Mutation(
        "standard normal log-density constant",
        "flowmath/distributions.py",
        "        return -0.5 * sum_except_batch(z * z) - 0.5 * d * math.log(2 * math.pi)",
        "        return -0.5 * sum_except_batch(z * z) - 0.5 * d * math.log(2.01 * math.pi)",
        ("tests/test_core.py", CNF, "tests/test_dequantize.py"),
    ),
    Mutation(
        "bits/dim shift log K -> log(K+1)",
        "flowmath/dequantize.py",
        "    shift = 0.0 if levels is None else dim * math.log(_check_levels(levels))",
        "    shift = 0.0 if levels is None else dim * math.log(_check_levels(levels) + 1)",
        ("tests/test_dequantize.py",),
    ),
    # -- costs (asserted on counted operations) ----------------------------------------------
    Mutation(
        "TriangularLinear inverse by a dense solve",
        "flowmath/layers/linear.py",
        "        xt = solve_triangular(\n"
        '            W, anp.transpose(y - params["b"]), lower=self.lower, check_finite=False\n'
        "        )",
        '        xt = anp.linalg.solve(W, anp.transpose(y - params["b"]))',
        ("tests/test_complexity.py",),
    ),
    Mutation(
        "LULinear forward assembles the dense W (O(d^3))",
        "flowmath/layers/linear.py",
        "        z = anp.dot(anp.dot(x, anp.transpose(U)), anp.transpose(L))",
        "        z = anp.dot(x, anp.transpose(anp.dot(L, U)))",
        ("tests/test_complexity.py",),
    ),
    # -- ODE: tableau and step control --------------------------------------------------------
    Mutation(
        "dopri5 c_2 = 1/5 -> 0.21",
        "flowmath/ode/tableau.py",
        "    c=[0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0],",
        "    c=[0.0, 0.21, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0],",
        ("tests/test_ode.py",),
    ),
    Mutation(
        "rk4 weights 1/6,1/3,1/3,1/6 -> 0.17,...",
        "flowmath/ode/tableau.py",
        "    b=[1 / 6, 1 / 3, 1 / 3, 1 / 6],",
        "    b=[0.17, 1 / 3, 1 / 3, 1 / 6 - 0.0033333333333333335],",
        ("tests/test_ode.py",),
    ),
    Mutation(
        "step control exponent -1/(q+1) -> -1/q",
        "flowmath/ode/tableau.py",
        "        return -1.0 / (min(self.order, self.embedded_order) + 1)",
        "        return -1.0 / (min(self.order, self.embedded_order))",
        ("tests/test_ode.py", "tests/test_ode_adjoint.py", "tests/test_ode_registry.py", REF),
    ),
    Mutation(
        "step control SAFETY 0.9 -> 1.5",
        "flowmath/ode/controller.py",
        "SAFETY = 0.9",
        "SAFETY = 1.5",
        ("tests/test_ode.py", "tests/test_ode_adjoint.py", REF),
    ),
    # -- second round: structural slips ------------------------------------------------------
    Mutation(
        "CNF: one probe shared by every sample of the batch",
        "flowmath/layers/continuous.py",
        "        probe = self.draw_probe(rng, (n, d)) if self.stochastic else None",
        "        probe = np.repeat(self.draw_probe(rng, (1, d)), n, axis=0) if self.stochastic"
        " else None",
        (P, CNF),
    ),
    Mutation(
        "IResBlock roulette ignores n_exact",
        "flowmath/layers/residual.py",
        "            n_exact=self.n_exact,",
        "            n_exact=0,",
        (P, R),
    ),
    Mutation(
        "Hutchinson variance without symmetrising A",
        "flowmath/estimators/trace.py",
        "    sym = 0.5 * (A + A.T)",
        "    sym = A",
        (ET, EL, REF),
    ),
    Mutation(
        "Hutch++ remainder not deflated",
        "flowmath/estimators/trace.py",
        "    G_perp = G - (G @ Q) @ Qt",
        "    G_perp = G",
        (P, ET),
    ),
    Mutation(
        "importance-weighted bound: mean of log-weights instead of log-mean",
        "flowmath/dequantize.py",
        "    return logsumexp(logw, axis=0) - math.log(logw.shape[0])",
        "    return np.mean(logw, axis=0)",
        ("tests/test_dequantize.py", "tests/test_verify.py"),
    ),
    Mutation(
        "choose_n_terms one more than needed",
        "flowmath/estimators/logdet.py",
        "    return hi\n",
        "    return hi + 1\n",
        (EL,),
    ),
    Mutation(
        "spectral normalisation ignores coeff",
        "flowmath/layers/residual.py",
        "                Wn = W / xp.maximum(1.0, sigma / self.coeff)",
        "                Wn = W / xp.maximum(1.0, sigma)",
        (R, REF, P),
    ),
    Mutation(
        "Flow.log_prob subtracts the log-det",
        "flowmath/distributions.py",
        "        return self.base.log_prob(z) + logdet",
        "        return self.base.log_prob(z) - logdet",
        ("tests/test_core.py", "tests/test_verify.py"),
    ),
]


MUTATIONS += [
    # -- third round ------------------------------------------------------------------------
    Mutation(
        "step control MAX_FACTOR 10 -> 5",
        "flowmath/ode/controller.py",
        "MAX_FACTOR = 10.0",
        "MAX_FACTOR = 5.0",
        ("tests/test_ode.py", "tests/test_ode_registry.py", REF),
    ),
    Mutation(
        "step control MIN_FACTOR 0.2 -> 0.5",
        "flowmath/ode/controller.py",
        "MIN_FACTOR = 0.2",
        "MIN_FACTOR = 0.5",
        (REF, "tests/test_ode.py", "tests/test_ode_registry.py"),
    ),
    Mutation(
        "dopri5 propagates the 4th-order solution (b = the 7th row + 1e-3 drift)",
        "flowmath/ode/tableau.py",
        "    b=[_f(35, 384), 0, _f(500, 1113), _f(125, 192), _f(-2187, 6784), _f(11, 84), 0],",
        "    b=[_f(35, 384) + 1e-3, 0, _f(500, 1113), _f(125, 192), _f(-2187, 6784),"
        " _f(11, 84) - 1e-3, 0],",
        ("tests/test_ode.py", "tests/test_ode_registry.py"),
    ),
    Mutation(
        "fixed point: residual bound / (1 + L) instead of / (1 - L)",
        "flowmath/layers/residual.py",
        "    resid = _row_norm(y - x - g(x)) / (1.0 - L)",
        "    resid = _row_norm(y - x - g(x)) / (1.0 + L)",
        (REF, R),
    ),
    Mutation(
        "Poisson survival off by one",
        "flowmath/estimators/logdet.py",
        "special.gammainc(np.maximum(k, 1), lam)",
        "special.gammainc(np.maximum(k, 1) + 1, lam)",
        (EL, P),
    ),
    Mutation(
        "ELU claimed Lipschitz 0.9",
        "flowmath/activations.py",
        '    "elu": _A("elu", elu, elu_derivative, None, _elu_from_output, lipschitz=1.0, code=3),',
        '    "elu": _A("elu", elu, elu_derivative, None, _elu_from_output, lipschitz=0.9, code=3),',
        ("tests/test_activations.py", "tests/test_lipschitz.py", R, REF),
    ),
    Mutation(
        "dequantisation divides by K + 1",
        "flowmath/dequantize.py",
        "        y = (xs + u) / levels",
        "        y = (xs + u) / (levels + 1)",
        ("tests/test_dequantize.py", "tests/test_verify.py"),
    ),
    Mutation(
        "ActNorm log-det misses one pixel",
        "flowmath/layers/glow.py",
        '(hw * anp.sum(params["log_scale"]))',
        '((hw - (hw > 1)) * anp.sum(params["log_scale"]))',
        ("tests/test_glow.py", "tests/test_contract.py"),
    ),
    # -- fourth round: log-dets, densities, optimiser, dequantisation, tableaux ---------------
    Mutation(
        "ActNorm log-det uses h*h for h*w (needs a non-square image case)",
        "flowmath/layers/glow.py",
        "hw = 1 if x.ndim == 2 else x.shape[2] * x.shape[3]",
        "hw = 1 if x.ndim == 2 else x.shape[2] * x.shape[2]",
        ("tests/test_contract.py", "tests/test_glow.py"),
    ),
    Mutation(
        "ActNorm inverse: shift scaled by 0.999",
        "flowmath/layers/glow.py",
        'x = y * anp.exp(-params["log_scale"]) + params["loc"]',
        'x = y * anp.exp(-params["log_scale"]) + 0.999 * params["loc"]',
        ("tests/test_contract.py",),
    ),
    Mutation(
        "diagonal linear log-det drops one term",
        "flowmath/layers/linear.py",
        'return anp.exp(s) * x + params["b"], _ones(x, anp.sum(s))',
        'return anp.exp(s) * x + params["b"], _ones(x, anp.sum(s[1:]))',
        ("tests/test_contract.py", "tests/test_linear_elementwise.py"),
    ),
    Mutation(
        "block-diagonal log-det drops one block",
        "flowmath/layers/linear.py",
        "return anp.sum(anp.linalg.slogdet(W)[1])",
        "return anp.sum(anp.linalg.slogdet(W)[1][1:])",
        ("tests/test_contract.py", "tests/test_linear_elementwise.py"),
    ),
    Mutation(
        "LeakyReLU log-det 0.1 % low",
        "flowmath/layers/elementwise.py",
        "n_negative * math.log(slope)",
        "n_negative * math.log(slope) * 0.999",
        ("tests/test_contract.py", "tests/test_linear_elementwise.py"),
    ),
    Mutation(
        "ELU log-det: the negative part 0.1 % low",
        "flowmath/layers/elementwise.py",
        "logdet = sum_except_batch(xp.where(x > 0, 0.0, math.log(a) + neg))",
        "logdet = sum_except_batch(xp.where(x > 0, 0.0, math.log(a) + 0.999 * neg))",
        ("tests/test_contract.py", "tests/test_linear_elementwise.py"),
    ),
    Mutation(
        "Logit log-det off by 1e-7",
        "flowmath/layers/elementwise.py",
        "math.log(1.0 - 2.0 * a) - logp - log1mp)",
        "math.log(1.0 - 2.0 * a) - logp - log1mp + 1e-7)",
        ("tests/test_contract.py", "tests/test_linear_elementwise.py"),
    ),
    Mutation(
        "1x1 conv (LU) log-det counts one pixel too few",
        "flowmath/layers/conv.py",
        'return hw * xp.sum(params["log_s"])',
        'return (hw - 1) * xp.sum(params["log_s"])',
        ("tests/test_contract.py", "tests/test_conv.py"),
    ),
    Mutation(
        "emerging conv: second factor's log-det 0.1 % low",
        "flowmath/layers/conv.py",
        "total = hw * (xp.sum(parts[0][2]) + xp.sum(parts[1][2]))",
        "total = hw * (xp.sum(parts[0][2]) + 0.999 * xp.sum(parts[1][2]))",
        ("tests/test_contract.py", "tests/test_conv.py"),
    ),
    Mutation(
        "affine coupling log-det 0.01 % high",
        "flowmath/layers/coupling.py",
        "return xb * anp.exp(s) + t, sum_except_batch(s)",
        "return xb * anp.exp(s) + t, sum_except_batch(s) * 1.0001",
        ("tests/test_contract.py", "tests/test_coupling.py"),
    ),
    Mutation(
        "affine coupling inverse: scale 0.01 % off",
        "flowmath/layers/coupling.py",
        "return (yb - t) * anp.exp(-s), -sum_except_batch(s)",
        "return (yb - t) * anp.exp(-s * 1.0001), -sum_except_batch(s)",
        ("tests/test_contract.py", "tests/test_coupling.py"),
    ),
    Mutation(
        "MAF log-det 0.01 % high",
        "flowmath/layers/autoregressive.py",
        "return (x - mu) * anp.exp(-s), -anp.sum(s, axis=1)",
        "return (x - mu) * anp.exp(-s), -anp.sum(s, axis=1) * 1.0001",
        ("tests/test_autoregressive.py", "tests/test_contract.py"),
    ),
    Mutation(
        "MADE sequential kernel: scale 0.01 % off",
        "flowmath/kernels/made.py",
        "v = (y[s_i, i] - mu) * np.exp(-s)",
        "v = (y[s_i, i] - mu) * np.exp(-s * 1.0001)",
        ("tests/test_autoregressive.py", "tests/test_contract.py"),
    ),
    Mutation(
        "standard normal: pi rounded to 3.1416",
        "flowmath/distributions.py",
        "0.5 * d * math.log(2 * math.pi)",
        "0.5 * d * math.log(2 * 3.1416)",
        ("tests/test_core.py", "tests/test_cnf.py"),
    ),
    Mutation(
        "standard logistic: tail term 0.1 % off",
        "flowmath/distributions.py",
        "-sum_except_batch(a + 2.0 * xp.log1p(xp.exp(-a)))",
        "-sum_except_batch(a + 2.0 * xp.log1p(xp.exp(-a * 1.001)))",
        ("tests/test_core.py",),
    ),
    Mutation(
        "sample_and_log_prob: log-det 0.1 % low",
        "flowmath/distributions.py",
        "return x, self.base.log_prob(z) - logdet_inv",
        "return x, self.base.log_prob(z) - 0.999 * logdet_inv",
        ("tests/test_core.py", "tests/test_cnf.py", "tests/test_glow.py"),
    ),
    Mutation(
        "bits/dim: the log 2 0.1 % high",
        "flowmath/dequantize.py",
        "return -(log_p - shift) / (dim * math.log(2.0))",
        "return -(log_p - shift) / (dim * math.log(2.0) * 1.001)",
        ("tests/test_bits_per_dim.py", "tests/test_dequantize.py"),
    ),
    Mutation(
        "bits/dim: the discretisation shift for one dimension too few",
        "flowmath/dequantize.py",
        "shift = 0.0 if levels is None else dim * math.log(_check_levels(levels))",
        "shift = 0.0 if levels is None else (dim - 1) * math.log(_check_levels(levels))",
        ("tests/test_bits_per_dim.py", "tests/test_dequantize.py", "tests/test_data.py"),
    ),
    Mutation(
        "uniform dequantisation noise 0.1 % narrow",
        "flowmath/dequantize.py",
        "return (xf + u) / dtype.type(levels)",
        "return (xf + 0.999 * u) / dtype.type(levels)",
        ("tests/test_dequantize.py", "tests/test_data.py", "tests/test_bits_per_dim.py"),
    ),
    Mutation(
        "importance-weighted bound: the shift uses K + 1 levels",
        "flowmath/dequantize.py",
        "shift = d * math.log(levels)",
        "shift = d * math.log(levels + 1)",
        ("tests/test_bits_per_dim.py", "tests/test_dequantize.py"),
    ),
    Mutation(
        "Hutchinson trace 0.1 % high",
        "flowmath/estimators/trace.py",
        "return xp.mean(xp.sum(V * AV, axis=1))",
        "return xp.mean(xp.sum(V * AV, axis=1)) * 1.001",
        ("tests/test_estimators_trace.py", "tests/test_estimators_api.py"),
    ),
    Mutation(
        "CNF exact divergence 0.01 % high",
        "flowmath/ode/dynamics.py",
        "tr = xp.sum(xp.sum(T * WL.T[None, :, :], axis=2), axis=1)",
        "tr = 1.0001 * xp.sum(xp.sum(T * WL.T[None, :, :], axis=2), axis=1)",
        ("tests/test_cnf.py", "tests/test_dynamics.py"),
    ),
    Mutation(
        "backsolve adjoint: parameter adjoint 0.01 % off",
        "flowmath/ode/adjoint.py",
        "np.negative(a_p, out=out[2 * N :])",
        "np.multiply(a_p, -1.0001, out=out[2 * N :])",
        ("tests/test_cnf.py", "tests/test_ode_adjoint.py"),
    ),
    Mutation(
        "rk4 weights perturbed by 1e-4 (still consistent; order drops)",
        "flowmath/ode/tableau.py",
        "b=[1 / 6, 1 / 3, 1 / 3, 1 / 6]",
        "b=[1 / 6, 1 / 3 + 1e-4, 1 / 3 - 1e-4, 1 / 6]",
        ("tests/test_ode.py", "tests/test_ode_registry.py"),
    ),
    Mutation(
        "Adam: second-moment bias correction one step ahead",
        "flowmath/train.py",
        "c1, c2 = 1 - b1**t, 1 - b2**t",
        "c1, c2 = 1 - b1**t, 1 - b2 ** (t + 1)",
        ("tests/test_train.py",),
    ),
    Mutation(
        "gradient clipping 1 % too strong",
        "flowmath/train.py",
        "scale = self.clip_norm / norm",
        "scale = 0.99 * self.clip_norm / norm",
        ("tests/test_train.py",),
    ),
    # -- fifth round: the ODE solver's dense output, events, forced boundaries, max_step --------
    Mutation(
        "Hermite dense output: the end-slope weight 0.1 % off (w(1) = b kept)",
        "flowmath/ode/tableau.py",
        "dense[fsal_last] += [0.0, -1.0, 1.0]",
        "dense[fsal_last] += [0.0, -1.001, 1.001]",
        ODE,
    ),
    Mutation(
        "tsit5 continuous extension: one factor's root 0.1 % off (w(1) = b kept)",
        "flowmath/ode/tableau.py",
        "(2.5, [th2, [-1.0, 1.0], [-0.6, 1.0]]),",
        "(2.5, [th2, [-1.0, 1.0], [-0.601, 1.0]]),",
        ODE,
    ),
    Mutation(
        "cubic Hermite of the solution object: h11 0.1 % off",
        "flowmath/ode/solution.py",
        "h11 = theta * theta * (theta - 1)",
        "h11 = theta * theta * (theta - 1.001)",
        ODE,
    ),
    # Loosening the default to 1e-8 of the step (or a user's xtol 1000x) is not observable:
    # Brent's method converges superlinearly and lands on the zero to rounding anyway (measured:
    # |g(t_e, sol(t_e))| = 0 with both), so the mutant that can be caught is a coarse one.
    Mutation(
        "events located to 1e-4 of the step by default instead of 4 eps",
        "flowmath/ode/loop.py",
        "xtol = max(ev.xtol / abs(h), 4 * np.finfo(float).eps)",
        "xtol = max(ev.xtol / abs(h), 1e-4)",
        ODE,
    ),
    Mutation(
        "events with direction 0 miss downward crossings",
        "flowmath/ode/loop.py",
        "if not ((up and ev.direction >= 0) or (down and ev.direction <= 0)):",
        "if not ((up and ev.direction >= 0) or (down and ev.direction < 0)):",
        ODE,
    ),
    Mutation(
        "max_step exceeded by 50 %",
        "flowmath/ode/loop.py",
        "if h_abs > max_step:\n            h_abs = max_step",
        "if h_abs > 1.5 * max_step:\n            h_abs = 1.5 * max_step",
        ODE,
    ),
    Mutation(
        "forced step boundaries (jump_t) ignored",
        "flowmath/ode/loop.py",
        "t_new = stops[j_next]  # a forced step boundary",
        "pass  # a forced step boundary",
        ODE,
    ),
    Mutation(
        "error norm divided by m + 1 (a looser controller)",
        "flowmath/ode/loop.py",
        "err_norm = math.sqrt(float(q @ q) / m) if m else 0.0",
        "err_norm = math.sqrt(float(q @ q) / (m + 1)) if m else 0.0",
        ODE + (REF,),
    ),
    Mutation(
        "event-time gradient 0.1 % off",
        "flowmath/ode/adjoint.py",
        "return -g_y / rate, [None if x is None else -x / rate for x in g_leaves], f_e",
        "return -g_y / (1.001 * rate), [None if x is None else -x / rate for x in g_leaves], f_e",
        ODE,
    ),
    # -- sixth round: masks, schedules, early stopping, variance formulas, activations ---------
    Mutation(
        "MADE hidden masks strict (> for >=): still autoregressive; fewer connections",
        "flowmath/kernels/made.py",
        "masks.append((m[None, :] >= prev[:, None]).astype(np.float64))",
        "masks.append((m[None, :] > prev[:, None]).astype(np.float64))",
        ("tests/test_autoregressive.py",),
    ),
    Mutation(
        "MADE output mask >= for > (an output sees its own input)",
        "flowmath/kernels/made.py",
        "masks.append((out[None, :] > prev[:, None]).astype(np.float64))",
        "masks.append((out[None, :] >= prev[:, None]).astype(np.float64))",
        ("tests/test_autoregressive.py",),
    ),
    Mutation(
        "checkerboard mask becomes stripes (still a valid coupling)",
        "flowmath/layers/coupling.py",
        "m = np.broadcast_to((ii + jj) % 2 == 0, event_shape).copy()",
        "m = np.broadcast_to((ii + 2 * jj) % 2 == 0, event_shape).copy()",
        ("tests/test_coupling.py", "tests/test_contract.py"),
    ),
    Mutation(
        "cosine schedule: the period one step long",
        "flowmath/train.py",
        "return self.final + (1 - self.final) * 0.5 * (1 + math.cos(math.pi * s / span))",
        "return self.final + (1 - self.final) * 0.5 * (1 + math.cos(math.pi * s / (span + 1)))",
        ("tests/test_train.py",),
    ),
    Mutation(
        "warm-up one step ahead",
        "flowmath/train.py",
        "f *= (step + 1) / self.warmup",
        "f *= min(1.0, (step + 2) / self.warmup)",
        ("tests/test_train.py",),
    ),
    Mutation(
        "early stopping one evaluation late",
        "flowmath/train.py",
        "if self.patience is not None and self.bad_evals >= self.patience:",
        "if self.patience is not None and self.bad_evals > self.patience:",
        ("tests/test_train.py",),
    ),
    Mutation(
        "Gaussian Hutchinson variance 1 % high",
        "flowmath/estimators/trace.py",
        "        return 2.0 * fro2\n",
        "        return 2.02 * fro2\n",
        (ET, "tests/test_estimators_api.py"),
    ),
    Mutation(
        "LipSwish divisor 1.09 (Lip 1.009 > the table's 1)",
        "flowmath/activations.py",
        "LIPSWISH_SCALE = 1.1",
        "LIPSWISH_SCALE = 1.09",
        ("tests/test_activations.py", "tests/test_lipschitz.py"),
    ),
    Mutation(
        "Poisson roulette survival one term shifted",
        "flowmath/estimators/logdet.py",
        "special.gammainc(np.maximum(k, 1), lam)",
        "special.gammainc(np.maximum(k, 1) + 1, lam)",
        (EL, "tests/test_estimators_api.py"),
    ),
    Mutation(
        "variational dequantiser: log q misses the flow's log-det",
        "flowmath/dequantize.py",
        "            log_q = log_q - logdet_inv  # log|det J_g(w)| = -log|det J_{g^-1}(eps)|",
        "            log_q = log_q - 0.999 * logdet_inv  # mutated",
        ("tests/test_dequantize.py", "tests/test_bits_per_dim.py"),
    ),
]


def _git(*args, cwd=REPO, check=True):
    return subprocess.run(["git", *args], cwd=cwd, check=check, capture_output=True, text=True)


def make_copy(extra_files=()):
    """A detached worktree of HEAD at COPY (recreated), plus uncommitted ``extra_files``."""
    if COPY.exists():
        _git("worktree", "remove", "--force", str(COPY), check=False)
        shutil.rmtree(COPY, ignore_errors=True)
    _git("worktree", "prune")
    _git("worktree", "add", "--detach", str(COPY), "HEAD")
    for f in extra_files:
        shutil.copy(REPO / f, COPY / f)
    return COPY


def run_tests(tests, timeout=900):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(COPY))
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        proc = subprocess.run(cmd, cwd=COPY, env=env, capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return True, "timeout"
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
    return proc.returncode != 0, tail[0]


def apply_and_test(m: Mutation):
    path = COPY / m.path
    original = path.read_text()
    count = original.count(m.old)
    if count != 1:
        return None, f"snippet found {count} times"
    try:
        path.write_text(original.replace(m.old, m.new))
        tests = [t for t in m.tests if (COPY / t).exists()]
        caught, tail = run_tests(tests)
    finally:
        path.write_text(original)
    if _git("diff", "--quiet", cwd=COPY, check=False).returncode != 0:
        raise RuntimeError(f"the copy is not clean after {m.name!r}")
    return caught, tail


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--only", default=None, help="comma-separated: run the mutations whose name contains one"
    )
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the worktree afterwards")
    args = ap.parse_args(argv)
    make_copy()
    # the copy must import its own flowmath, not the working tree's editable install
    env = dict(os.environ, PYTHONPATH=str(COPY))
    where = subprocess.run(
        [sys.executable, "-c", "import flowmath; print(flowmath.__file__)"],
        cwd=COPY, env=env, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    if not where.startswith(str(COPY)):
        raise RuntimeError(f"the copy imports flowmath from {where}")
    rows = []
    try:
        for m in MUTATIONS:
            if args.only and not any(key in m.name for key in args.only.split(",")):
                continue
            t0 = time.perf_counter()
            caught, tail = apply_and_test(m)
            dt = time.perf_counter() - t0
            verdict = "skipped" if caught is None else ("caught" if caught else "SURVIVED")
            print(f"{verdict:9s} {dt:6.1f}s  {m.name}  [{tail}]", flush=True)
            rows.append({"name": m.name, "verdict": verdict, "seconds": dt, "tail": tail})
    finally:
        if not args.keep:
            _git("worktree", "remove", "--force", str(COPY), check=False)
    tried = [r for r in rows if r["verdict"] != "skipped"]
    caught = [r for r in tried if r["verdict"] == "caught"]
    print(f"{len(caught)} / {len(tried)} mutations caught")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if len(caught) == len(tried) else 1


if __name__ == "__main__":
    sys.exit(main())
