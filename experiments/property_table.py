"""The lecture's property table of flow families, every cell decided by a measurement.

One row per family, each a small flowmath object built here (a plain residual network with no
inverse; NICE; an i-RevNet-style block, additive couplings after an invertible downsampling;
Real NVP; Glow; FFJORD; i-ResNet; MADE/MAF; Residual Flow; plus two flowmath variants: the
i-ResNet block with its exact log-det and FFJORD with the exact trace). The columns of
Behrmann et al. (2019, i-ResNet, arXiv:1811.00995, Table 1) are measured as follows:

- *analytic forward / inverse*: the pass runs no fixed-point iteration and no ODE solve, counted
  by :func:`flowmath.testing.count_iterations` (the counts are printed);
- *non-volume preserving*: ``log|det J_f(x)|`` from the dense autograd Jacobian varies with x
  (spread over ``n_points`` inputs above ``1e-8`` relative);
- *exact likelihood*: ``Flow.log_prob`` equals ``log pi(f(x)) + slogdet(J_f(x))`` from the
  dense Jacobian to ``1e-10`` (relative);
- *unbiased stochastic log-det*: N/A where the likelihood is exact; else a z-test of the mean of
  the layer's log-det estimates at a fixed x against the exact (dense-Jacobian) log-det, with
  enough estimates that a bias of ``rel_bias`` (1 %) of ``|log det|`` lies ``z_crit + 2``
  standard errors away (power about 0.98 at ``|z| > z_crit``): unbiased when ``|z| < z_crit``
  (the observations are the means of independent calls, since one call's estimates may share
  a random draw);
- *free-form*: declared by the layer (``Bijection.free_form`` and its ``free_form_reason``).

The lecture's cells (Behrmann et al. 2019, Table 1, which has no MADE/MAF or Residual Flow
column) are printed beside the measured ones and every disagreement is flagged. Full settings
take about 200-250 s on the shared 2-core machine (the FFJORD and Residual Flow z-tests are most
of it), quick settings about 150 s.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np

import flowmath as fm
from experiments._common import setup_matplotlib, tex_table
from flowmath import nets
from flowmath.testing import count_iterations, dense_jacobian, relative_error

__all__ = [
    "COLUMNS",
    "LECTURE",
    "Config",
    "PlainResNet",
    "ROW_GROUPS",
    "cells",
    "declared_free_form",
    "disagreements",
    "measure_row",
    "notes",
    "plot",
    "rows",
    "run",
    "tex",
]

COLUMNS = (
    "free_form",
    "analytic_forward",
    "analytic_inverse",
    "non_volume_preserving",
    "exact_likelihood",
    "unbiased_logdet",
)
COLUMN_TITLES = {
    "free_form": "free-form",
    "analytic_forward": "analytic forward",
    "analytic_inverse": "analytic inverse",
    "non_volume_preserving": "non-volume preserving",
    "exact_likelihood": "exact likelihood",
    "unbiased_logdet": "unbiased stoch. log-det",
}

# Behrmann, Grathwohl, Chen, Duvenaud and Jacobsen (2019), Invertible residual networks,
# arXiv:1811.00995, Table 1 (the lecture's table): "yes", "no" or "N/A" per column of COLUMNS.
LECTURE = {
    "resnet": ("yes", "yes", "N/A", "N/A", "N/A", "N/A"),
    "nice": ("no", "yes", "yes", "no", "yes", "N/A"),
    "irevnet": ("no", "yes", "yes", "no", "yes", "N/A"),
    "realnvp": ("no", "yes", "yes", "yes", "yes", "N/A"),
    "glow": ("no", "yes", "yes", "yes", "yes", "N/A"),
    "ffjord": ("yes", "no", "no", "yes", "no", "yes"),
    "iresnet": ("yes", "yes", "no", "yes", "no", "no"),
}

EXACT_TOL = 1e-10  # exact likelihood: relative agreement with the dense-Jacobian log-likelihood
NVP_TOL = 1e-8  # non-volume preserving: relative spread of the log-det over the inputs


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    n_points: int = 6
    z_crit: float = 4.0
    rel_bias: float = 0.01
    pilot_groups: int = 200
    max_groups: int = 40_000

    @classmethod
    def quick(cls) -> Config:
        return cls(n_points=3, pilot_groups=100, max_groups=15_000)


# -- the plain residual network (the lecture's "ResNet" column) --------------------------------
class PlainResNet:
    """``x + g(x)`` with an unconstrained MLP branch ``g``: a ResNet block, not a bijection.

    It has no ``inverse`` and no log-det (nothing makes it invertible: with ``Lip(g) > 1`` it
    may fold space), which is what the N/A cells of the lecture's ResNet column stand for.
    """

    free_form = True
    free_form_reason = "any branch g: no constraint at all (hence no inverse and no density)"

    def __init__(self, hidden=(16,), scale: float = 3.0):
        self.hidden = tuple(hidden)
        self.scale = float(scale)

    def init(self, rng, x):
        d = x.shape[1]
        params = nets.mlp_init(rng, [d, *self.hidden, d])
        return [{k: self.scale * v for k, v in layer.items()} for layer in params]

    def forward(self, params, x, rng=None):
        return x + nets.mlp_apply(params, x)


# -- the rows -----------------------------------------------------------------------------------
def _vector_couplings(cls, d_hidden, n):
    return [cls("half", (d_hidden,), flip=bool(i % 2)) for i in range(n)]


def _aligned_residual(params, rng, bias=0.5):
    """Weights with ``J_g`` close to ``-c^2 I``: in column form ``W_1 = U`` (orthonormal
    columns), ``W_2 = -U^T``, positive hidden biases (the layers store the transposes, ``h W +
    b``). The power series then loses its alternation and its truncation bias approaches the
    bound ``d sum_{k>n} L^k / k``; random weights give Jacobians far below ``L`` and biases too
    small to see."""
    first, _ = params
    U, _ = np.linalg.qr(rng.normal(size=first["W"].shape[::-1]))  # (hidden, d)
    return [{"W": U.T, "b": np.full(U.shape[0], bias)}, {"W": -U, "b": np.zeros(U.shape[1])}]


def _gradient_field(params, rng, strength=1.5):
    """MLP field ``f = -s tanh(z W_1 + b_1 + t u_1) W_1^T``: a gradient flow, whose Jacobian
    ``-s W_1 diag(tanh') W_1^T`` is symmetric negative definite, so that the trace (the log-det
    rate) dominates its Frobenius norm (Hutchinson's standard deviation) and a 1 % bias is
    within reach of 10^6 probes; a random field has a trace near zero."""
    first, last = params
    return [first, {**last, "W": -strength * first["W"].T, "b": np.zeros_like(last["b"])}]


#: copies of x per call in the z-test. The roulette estimator shares one draw of N per call, so
#: its call means keep the variance of N (measured: standard deviation 4.9, 1.4 and 0.71 for
#: 1, 16 and 256 copies): 256 copies per call need the fewest calls for a 1 % bias.
ROW_GROUPS = {"residual_flow": 256}


def rows() -> dict:
    """``name -> (label, builder)``; ``builder(rng)`` returns ``(model, x, prepare)`` with
    ``model`` a :class:`flowmath.Flow` (or :class:`PlainResNet`), ``x`` a batch of inputs and
    ``prepare`` ``None`` or ``(params, rng) -> params`` applied after ``init``; the row's
    ``group`` (copies of x per call in the z-test) is ``ROW_GROUPS.get(name, 1000)``."""

    def vec(rng, d=4, n=8):
        return rng.normal(size=(n, d))

    def resnet(rng):
        return PlainResNet(), vec(rng), None

    def nice(rng):
        # NICE: additive couplings and the final diagonal scaling, logistic prior (Sec. 5.1)
        layer = fm.Chain([*_vector_couplings(fm.AdditiveCoupling, 16, 4), fm.DiagonalLinear()])
        return fm.Flow(layer, base=fm.StandardLogistic()), vec(rng), None

    def irevnet(rng):
        # i-RevNet: invertible downsampling (squeeze) then additive couplings on the channels
        layer = fm.Chain(
            [
                fm.Squeeze(),
                fm.AdditiveCoupling("channel", (8,)),
                fm.AdditiveCoupling("channel", (8,), flip=True),
            ]
        )
        return fm.Flow(layer), rng.normal(size=(8, 1, 4, 4)), None

    def realnvp(rng):
        return fm.Flow(fm.Chain(_vector_couplings(fm.AffineCoupling, 16, 4))), vec(rng), None

    def glow(rng):
        flow = fm.Flow(fm.Glow(levels=1, steps=2, hidden=(8,)))
        return flow, rng.normal(size=(8, 2, 4, 4)), None

    def ffjord(rng, trace="hutchinson"):
        layer = fm.CNF(hidden=(16,), t1=1.0, trace=trace, probe="gaussian")
        return fm.Flow(layer), vec(rng, d=2), _gradient_field

    def iresnet(rng, logdet="series"):
        # i-ResNet: ELU branch, 10 power-series terms, one Gaussian probe (Algorithm 2)
        block = fm.IResBlock(hidden=(16,), coeff=0.9, logdet=logdet, n_terms=10)
        return fm.Flow(block), vec(rng), _aligned_residual

    def residual_flow(rng):
        # Residual Flows: the same block with the Russian-roulette estimator. Its variance is
        # finite when L^2 < 1 - p; p = 0.1 keeps L^2 / (1 - p) = 0.73 (at p = 0.3 the ratio is
        # 0.94, the tail is so heavy that 10^5 estimates under-estimate the mean by 6 %)
        block = fm.IResBlock(hidden=(16,), coeff=0.9, logdet="roulette", roulette_p=0.1, n_exact=2)
        return fm.Flow(block), vec(rng), _aligned_residual

    out = {
        "resnet": ("ResNet", resnet),
        "nice": ("NICE", nice),
        "irevnet": ("i-RevNet", irevnet),
        "realnvp": ("Real NVP", realnvp),
        "glow": ("Glow", glow),
        "ffjord": ("FFJORD", ffjord),
        "iresnet": ("i-ResNet", iresnet),
    }
    if hasattr(fm, "MAF"):

        def maf(rng):
            layer = fm.Chain([fm.MAF(hidden=(16,)), fm.MAF(hidden=(16,), order="reversed")])
            return fm.Flow(layer), vec(rng), None

        out["maf"] = ("MADE / MAF", maf)
    out["residual_flow"] = ("Residual Flow", residual_flow)
    out["iresnet_exact"] = ("i-ResNet, exact log-det", lambda rng: iresnet(rng, "exact"))
    out["ffjord_exact"] = ("FFJORD, exact trace", lambda rng: ffjord(rng, "exact"))
    return out


def declared_free_form(obj) -> tuple:
    """``(flag, reason)`` as the object declares it; a :class:`flowmath.Flow` answers for its
    layer, a :class:`flowmath.Chain` is free-form when one of its parts is (the product of the
    Jacobians then has no imposed structure) and structured when every part says so."""
    obj = getattr(obj, "layer", obj)
    if isinstance(obj, fm.Chain):
        parts = [declared_free_form(layer) for layer in obj.layers]
        flags = [f for f, _ in parts]
        reasons = []
        for layer, (_, r) in zip(obj.layers, parts, strict=True):
            text = f"{type(layer).__name__}: {r}"
            if r and text not in reasons:
                reasons.append(text)
        if any(f is True for f in flags):
            flag = True
        else:
            flag = False if all(f is False for f in flags) else None
        return flag, "; ".join(reasons)
    return getattr(obj, "free_form", None), getattr(obj, "free_form_reason", "")


# -- the measurements ---------------------------------------------------------------------------
def _fresh(rng):
    return copy.deepcopy(rng)


def _counts_dict(c):
    return dataclasses.asdict(c)


def _dense_logdets(fn, x):
    jac = dense_jacobian(fn, x)
    sign, logabs = np.linalg.slogdet(jac.reshape(jac.shape[0], jac.shape[1], -1))
    return sign, logabs


def _group_means(layer, params, x0, n_groups, group, rng):
    """Means of ``n_groups`` independent calls, each on ``group`` copies of ``x0``.

    The copies of one call may share random draws (the roulette estimator draws one ``N`` per
    call, as the Residual Flows code does), so the call means, not the single estimates, are the
    independent observations of the z-test."""
    xs = np.repeat(x0[None], group, axis=0)
    return np.array([float(np.mean(layer.forward(params, xs, rng)[1])) for _ in range(n_groups)])


def _z_test(layer, params, x0, exact, group, cfg: Config, rng):
    """z-test of the estimator's mean against ``exact``: enough calls that a bias of
    ``rel_bias * |exact|`` is ``z_crit + 2`` standard errors (capped at ``max_groups``)."""
    pilot = _group_means(layer, params, x0, cfg.pilot_groups, group, rng)
    sigma = float(pilot.std(ddof=1))
    target = cfg.rel_bias * max(abs(exact), 1e-300)
    # 1.25 sigma: the pilot's standard deviation is itself uncertain (heavy tails under-read it)
    need = math.ceil(((cfg.z_crit + 2.0) * 1.25 * sigma / target) ** 2)
    n_groups = int(min(max(need, cfg.pilot_groups), cfg.max_groups))
    means = _group_means(layer, params, x0, n_groups, group, rng)
    mean, se = float(means.mean()), float(means.std(ddof=1) / math.sqrt(n_groups))
    return {
        "n_calls": n_groups,
        "group": group,
        "n_estimates": n_groups * group,
        "mean": mean,
        "exact": float(exact),
        "bias": mean - float(exact),
        "se": se,
        "z": (mean - exact) / se,
        # the relative bias this sample size detects at |z| > z_crit with probability ~0.98
        "detectable_rel_bias": (cfg.z_crit + 2.0) * se / abs(exact),
    }


def measure_row(model, x, cfg: Config, rng, prepare=None, group=1000) -> dict:
    """Every measurement behind one row of the table (see the module docstring)."""
    m = {}
    m["free_form_declared"], m["free_form_reason"] = declared_free_form(model)
    params = model.init(rng, x)
    if prepare is not None:
        params = prepare(params, rng)
    x = x[: cfg.n_points]
    if isinstance(model, PlainResNet):
        with count_iterations() as c:
            model.forward(params, x)
        m["forward_counts"] = _counts_dict(c)
        m["has_inverse"] = False
        # what the N/A stands for: det(I + J_g) changes sign between inputs, so the block
        # folds space (not a diffeomorphism)
        sign, _ = _dense_logdets(lambda v: model.forward(params, v), x)
        m["det_signs"] = sign.tolist()
        return m
    layer = model.layer
    stoch = _fresh(rng) if layer.stochastic else None
    with count_iterations() as c:
        z, logdet = layer.forward(params, x, _fresh(stoch) if stoch else None)
    m["forward_counts"] = _counts_dict(c)
    m["has_inverse"] = True
    with count_iterations() as c:
        layer.inverse(params, z, _fresh(stoch) if stoch else None)
    m["inverse_counts"] = _counts_dict(c)
    sign, logabs = _dense_logdets(
        lambda v: layer.forward(params, v, _fresh(stoch) if stoch else None)[0], x
    )
    m["dense_logdet"] = logabs.tolist()
    m["nvp_spread"] = float((logabs.max() - logabs.min()) / max(1.0, np.abs(logabs).max()))
    reference = model.base.log_prob(z) + logabs
    logp = model.log_prob(params, x, _fresh(stoch) if stoch else None)
    m["likelihood_error"] = relative_error(logp, reference)
    m["stochastic"] = bool(layer.stochastic)
    if isinstance(layer, fm.IResBlock):
        lip = float(layer.lipschitz_bound(params))
        m["lipschitz"] = lip
        m["truncation_bound"] = float(
            fm.estimators.series_truncation_bound(lip, x.shape[1], layer.n_terms)
        )
    if m["likelihood_error"] > EXACT_TOL and layer.stochastic:
        m["z_test"] = _z_test(layer, params, x[0], float(logabs[0]), group, cfg, rng)
    return m


def _yes(flag):
    return "yes" if flag else "no"


def cells(m: dict, cfg: Config) -> tuple:
    """The six cells of :data:`COLUMNS` decided from the measurements ``m``."""
    free = m["free_form_declared"]
    free = "undeclared" if free is None else _yes(free)
    fwd = _yes(not _iterative(m["forward_counts"]))
    if not m["has_inverse"]:
        return (free, fwd, "N/A", "N/A", "N/A", "N/A")
    inv = _yes(not _iterative(m["inverse_counts"]))
    nvp = _yes(m["nvp_spread"] > NVP_TOL)
    exact = m["likelihood_error"] <= EXACT_TOL
    if exact:
        unbiased = "N/A"
    elif "z_test" in m:
        unbiased = _yes(abs(m["z_test"]["z"]) < cfg.z_crit)
    else:  # deterministic but inexact (ODE tolerance): no stochastic estimator to test
        unbiased = "N/A"
    return (free, fwd, inv, nvp, _yes(exact), unbiased)


def _iterative(counts):
    return counts["fixed_point_solves"] > 0 or counts["ode_solves"] > 0


def run(config: Config) -> dict:
    rng = np.random.default_rng(config.seed)
    out = {}
    for name, (label, build) in rows().items():
        model, x, prepare = build(rng)
        m = measure_row(model, x, config, rng, prepare, ROW_GROUPS.get(name, 1000))
        m["label"] = label
        m["cells"] = list(cells(m, config))
        m["lecture"] = list(LECTURE[name]) if name in LECTURE else None
        out[name] = m
    return {
        "rows": out,
        "columns": list(COLUMNS),
        "z_crit": config.z_crit,
        "rel_bias": config.rel_bias,
        "exact_tol": EXACT_TOL,
        "nvp_tol": NVP_TOL,
    }


# -- reporting ----------------------------------------------------------------------------------
def disagreements(results: dict) -> list[tuple[str, str, str, str]]:
    """``(row, column, measured, lecture)`` for every cell where the two differ."""
    out = []
    for name, r in results["rows"].items():
        if r["lecture"] is None:
            continue
        for col, got, want in zip(results["columns"], r["cells"], r["lecture"], strict=True):
            if got != want:
                out.append((name, col, got, want))
    return out


def notes(results: dict) -> list[str]:
    """The table's notes, each read off the measurements: every disagreement with the lecture
    and what the flowmath variants and the lecture's open questions measure."""
    R = results["rows"]
    out = []
    dis = disagreements(results)
    if dis:
        for name, col, got, want in dis:
            out.append(
                f"Disagreement: {R[name]['label']}, {COLUMN_TITLES[col]}: measured {got}, "
                f"lecture {want}."
            )
    else:
        out.append("Every measured cell of the lecture's rows equals the lecture's cell.")
    if "resnet" in R:
        signs = R["resnet"]["det_signs"]
        out.append(
            "ResNet: det(I + J_g) has signs "
            + ", ".join(f"{s:+.0f}" for s in signs)
            + " at the inputs: an unconstrained residual block can fold space, so it has no "
            "inverse and no density (the N/A cells)."
        )
    if "nice" in R:
        out.append(
            f"NICE: the log-det is constant (relative spread {R['nice']['nvp_spread']:.0e}); the "
            "final diagonal scaling makes it non-zero but not x-dependent, hence volume "
            "preserving up to a constant."
        )
    if "glow" in R:
        c = R["glow"]["inverse_counts"]
        out.append(
            f"Glow's inverse ran {c['fixed_point_iterations']} fixed-point iterations and "
            f"{c['ode_steps']} ODE steps: ActNorm, the LU 1x1 convolution (two triangular "
            "solves) and the affine coupling invert in closed form, as the lecture says."
        )
    for name in ("iresnet", "residual_flow"):
        if name in R and "z_test" in R[name]:
            zt = R[name]["z_test"]
            text = (
                f"{R[name]['label']}: estimator mean {zt['mean']:.4f} against the exact "
                f"{zt['exact']:.4f}: bias {zt['bias']:+.4f} +- {zt['se']:.4f} "
                f"({100 * zt['bias'] / abs(zt['exact']):+.2f} % of the log-det, "
                f"z = {zt['z']:+.1f}; {zt['n_estimates']} estimates in {zt['n_calls']} calls, "
                f"which detect a {100 * zt['detectable_rel_bias']:.2f} % bias)"
            )
            if name == "iresnet":
                text += (
                    f"; the truncation bound d sum_(k>10) L^k / k with the certified "
                    f"L = {R[name]['lipschitz']:.3f} is {R[name]['truncation_bound']:.4f}, "
                    "nearly attained by this block (J_g close to -L I)"
                )
            out.append(text + ".")
    if "ffjord" in R and "z_test" in R["ffjord"]:
        zt = R["ffjord"]["z_test"]
        out.append(
            f"FFJORD (Hutchinson trace, one Gaussian probe per solve): z = {zt['z']:+.1f} over "
            f"{zt['n_estimates']} estimates, unbiased at the 1 % level."
        )
    if "iresnet_exact" in R:
        out.append(
            "i-ResNet with logdet='exact' (slogdet of the dense Jacobian, cubic in d): "
            "log-likelihood error "
            f"{R['iresnet_exact']['likelihood_error']:.0e}, exact. The lecture's 'no' belongs to "
            "the power-series estimator used at scale, not to the architecture."
        )
    if "ffjord_exact" in R:
        out.append(
            "FFJORD with the exact trace: log-likelihood error "
            f"{R['ffjord_exact']['likelihood_error']:.0e} against the dense Jacobian of the "
            "solved flow map, the ODE solver's tolerance (rtol 1e-7): exact only up to the "
            "solver, hence 'no' at 1e-10, and no stochastic estimator to test."
        )
    return out


_COLOURS = {"yes": "#8fd18f", "no": "#f29b9b", "N/A": "#dddddd", "undeclared": "#ffe08a"}


def plot(results: dict, path) -> None:
    plt = setup_matplotlib()
    names = list(results["rows"])
    cols = results["columns"]
    fig, ax = plt.subplots(figsize=(11, 0.55 * len(names) + 1.6))
    flagged = {(r, c) for r, c, _, _ in disagreements(results)}
    for i, name in enumerate(names):
        r = results["rows"][name]
        for j, col in enumerate(cols):
            got = r["cells"][j]
            want = None if r["lecture"] is None else r["lecture"][j]
            face = _COLOURS.get(got, "white")
            edge, lw = ("#d95f02", 3) if (name, col) in flagged else ("white", 1)
            ax.add_patch(plt.Rectangle((j, i), 1, 1, facecolor=face, edgecolor=edge, lw=lw))
            ax.text(j + 0.5, i + 0.42, got, ha="center", va="center", fontsize=9, weight="bold")
            ax.text(
                j + 0.5,
                i + 0.78,
                "lecture: " + ("--" if want is None else want),
                ha="center",
                va="center",
                fontsize=6,
                color="#333333",
            )
    ax.set_xlim(0, len(cols))
    ax.set_ylim(len(names), 0)
    ax.set_xticks(np.arange(len(cols)) + 0.5)
    ax.set_xticklabels([COLUMN_TITLES[c] for c in cols], fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks(np.arange(len(names)) + 0.5)
    ax.set_yticklabels([results["rows"][n]["label"] for n in names], fontsize=8)
    ax.grid(False)
    ax.set_title(
        "Property table measured on flowmath objects (bold) beside the lecture's cells "
        "(Behrmann et al. 2019, Table 1); orange frame: disagreement",
        fontsize=9,
        pad=28,
    )
    fig.savefig(path)
    plt.close(fig)


def _counts_text(c):
    return f"{c['fixed_point_iterations']} fp it., {c['ode_steps']} ODE steps"


def _latex(text: str) -> str:
    for a, b in (("%", "\\%"), ("_", "\\_"), ("<=", "$\\le$"), ("+-", "$\\pm$"), ("^k", "$^k$")):
        text = text.replace(a, b)
    return text


def tex(results: dict) -> str:
    flagged = {(r, c) for r, c, _, _ in disagreements(results)}
    header = ["family"] + [COLUMN_TITLES[c] for c in results["columns"]]
    body = []
    for name, r in results["rows"].items():
        row = [r["label"]]
        for j, col in enumerate(results["columns"]):
            got = r["cells"][j]
            want = "--" if r["lecture"] is None else r["lecture"][j]
            mark = "$^\\ast$" if (name, col) in flagged else ""
            row.append(f"{got}{mark} ({want})")
        body.append(row)
    table1 = tex_table(
        header,
        body,
        caption=(
            "Properties of the flow families, each cell measured on a flowmath object; in "
            "brackets the lecture's cell (Behrmann et al. 2019, arXiv:1811.00995, Table 1; "
            "-- where the lecture has no column); $^\\ast$ marks a disagreement."
        ),
        label="tab:property_table",
    )
    header2 = [
        "family",
        "forward work",
        "inverse work",
        "log-det spread",
        "log-lik. error",
        "z (estimates)",
        "detectable bias",
    ]
    body2 = []
    for r in results["rows"].values():
        zt = r.get("z_test")
        body2.append(
            [
                r["label"],
                _counts_text(r["forward_counts"]),
                _counts_text(r["inverse_counts"]) if r["has_inverse"] else "no inverse",
                f"{r['nvp_spread']:.2g}" if r["has_inverse"] else "--",
                f"{r['likelihood_error']:.1e}" if r["has_inverse"] else "--",
                f"{zt['z']:+.1f} ({zt['n_estimates']})" if zt else "--",
                f"{100 * zt['detectable_rel_bias']:.2f} \\%" if zt else "--",
            ]
        )
    table2 = tex_table(
        header2,
        body2,
        caption=(
            "The measurements behind the property table: fixed-point iterations and ODE steps "
            "of one forward and one inverse pass; relative spread of the dense-Jacobian log-det "
            f"over the inputs (non-volume preserving above {NVP_TOL:g}); relative error of "
            "\\texttt{log\\_prob} against the dense-Jacobian log-likelihood (exact at most "
            f"{EXACT_TOL:g}); z-score of the log-det estimator's mean against the exact log-det "
            f"(unbiased when $|z| < {results['z_crit']:g}$) and the relative bias its sample "
            "size detects."
        ),
        label="tab:property_table_measurements",
    )
    reasons = [
        [r["label"], r["cells"][0], _latex(r["free_form_reason"])] for r in results["rows"].values()
    ]
    table3 = tex_table(
        ["family", "free-form", "as the layers declare it"],
        reasons,
        caption="The free-form column: what each family's layers declare, and why.",
        label="tab:property_table_free_form",
    )
    items = "\n".join(f"\\item {_latex(n)}" for n in notes(results))
    notes_tex = (
        "% generated by flowmath reproduce; do not edit by hand\n"
        "\\paragraph{Notes to the property table.}\n"
        f"\\begin{{itemize}}\n{items}\n\\end{{itemize}}\n"
    )
    return table1 + "\n" + table2 + "\n" + table3 + "\n" + notes_tex
