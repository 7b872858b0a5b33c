"""ODE benchmarks W1-W4 of docs/benchmarks.rst: flowmath against scipy, torchdiffeq and autograd.

W1  forward solve of f(t, z) = W2 tanh(W1 z + b1 + t u) + b2, z in R^2, hidden 64, batch 1024,
    t: 0 -> 1, Dormand-Prince 5(4), rtol 1e-5, atol 1e-7
    (scipy ``solve_ivp`` RK45 on the flattened batch; ``torchdiffeq.odeint``).
W2  gradient of sum(z(1)^2) with respect to z0 and all weights, same problem
    (``torchdiffeq.odeint_adjoint``, backprop through ``torchdiffeq.odeint``, the gradient of
    ``autograd.scipy.integrate.odeint``).
    W1 and W2 time flowmath twice: on the dynamics a user writes (a plain autograd.numpy
    function; its gradients through ``autograd.make_vjp``) and on the fused built-in
    :class:`~flowmath.ode.dynamics.MLPDynamics` (hand-written VJP); every flowmath contender is
    reported as a multiple of every baseline's time (``fm/baseline``: below 1 is faster).
    W1's floor rows time the solves' own evaluations of f bare (the 26 calls, recorded once, of
    the user-written f and of scipy's NumPy f): their ratio to scipy's RK45 bounds what any
    solver reaches at that step sequence.
W3  one training step of a 2-D CNF: state [z, log p], exact divergence, the same MLP, batch 1024
    from 8gaussians, dopri5 rtol = atol = 1e-5, loss -mean log-likelihood under N(0, I)
    (torch + ``torchdiffeq.odeint_adjoint``, FFJORD-style).
W4  forward CNF solve with Hutchinson (Gaussian) divergence against d in {2, 8, 32, 128, 512},
    random fixed MLP (one hidden layer of min(4d, 512) units, tanh), batch 256, dopri5 1e-5
    (``torchdiffeq.odeint`` with FFJORD's vector-Jacobian divergence).

Timing protocol (docs/benchmarks.rst): one process, ~32 MiB allocated and freed at start, a warm-up
call of every contender, then rounds alternating flowmath and each baseline (A B A B ...);
the ratio of every round is baseline time / flowmath time, and the table reports the median
of the ratios with the median times. Baselines are skipped with a message when absent.

Run: ``python -m experiments.bench_ode [--rounds 7] [--only W1 W2 ...] [--threads 2] [--json PATH]
[--quick]`` (the command line of every benchmark, ``experiments/_timing.py``).
"""

from __future__ import annotations

import math
import sys

from experiments._timing import (
    alternate,
    bench_main,
    blas_threads,
    clock,
    import_baselines,
    median_ms,
    median_ratio,
    thread_env_defaults,
    warm_allocator,
)

thread_env_defaults(2)

import autograd  # noqa: E402
import autograd.numpy as anp  # noqa: E402
import numpy as np  # noqa: E402

import flowmath as fm  # noqa: E402
from flowmath.ode.dynamics import CNFDynamics, MLPDynamics  # noqa: E402

__all__ = ["WORKLOADS", "blas_threads", "compare_all", "main", "run_benchmarks", "user_mlp"]

RTOL, ATOL = 1e-5, 1e-7
CNF_TOL = 1e-5


def _torch(threads=2):
    def skip(exc):  # pragma: no cover - optional baseline
        print(f"  [skip] torch / torchdiffeq baselines: {exc}", file=sys.stderr)

    return import_baselines("torch", "torchdiffeq", threads=threads, on_missing=skip)


# ----------------------------------------------------------------------------- problem setup
def mlp_params(rng, d, hidden, *, time_in_output=False):
    """W ~ N(0, 1/fan_in) for f = W2 tanh(W1 z + b1 + t u) + b2 (flowmath's concat layout)."""
    field = MLPDynamics((hidden,))
    params = field.init(rng, d)
    if not time_in_output:
        params[-1]["u"] = np.zeros(d)
    return field, params


def eight_gaussians(n, rng):
    try:
        return fm.data.eight_gaussians(n, rng)
    except AttributeError:  # data module not there: FFJORD's recipe
        r = 1 / math.sqrt(2)
        centers = 4.0 * np.array(
            [(1, 0), (-1, 0), (0, 1), (0, -1), (r, r), (r, -r), (-r, r), (-r, -r)]
        )
        pts = rng.normal(size=(n, 2)) * 0.5 + centers[rng.integers(0, 8, size=n)]
        return pts / 1.414


def _np_mlp(p):
    """The field as a scipy / autograd user writes it (plain array code)."""
    W1, b1, u, W2, b2 = p[0]["W"], p[0]["b"], p[0]["u"], p[1]["W"], p[1]["b"]

    def f(t, z):
        return np.tanh(z @ W1 + b1 + t * u) @ W2 + b2

    return f


def _torch_module(torch, p):
    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.W1 = torch.nn.Parameter(torch.tensor(p[0]["W"]))
            self.b1 = torch.nn.Parameter(torch.tensor(p[0]["b"]))
            self.u = torch.nn.Parameter(torch.tensor(p[0]["u"]))
            self.W2 = torch.nn.Parameter(torch.tensor(p[1]["W"]))
            self.b2 = torch.nn.Parameter(torch.tensor(p[1]["b"]))
            self.nfe = 0

        def forward(self, t, z):
            self.nfe += 1
            return torch.tanh(z @ self.W1 + self.b1 + t * self.u) @ self.W2 + self.b2

    return Field()


def _torch_cnf(torch, p, *, probe=None):
    """FFJORD-style augmented field on (z, logp): d logp/dt = -div f, exact (one autograd.grad
    per dimension) or Hutchinson (one vector-Jacobian product with a fixed probe)."""
    field = _torch_module(torch, p)

    class Aug(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.field = field
            self.nfe = 0
            self.probe = probe

        def forward(self, t, state):
            self.nfe += 1
            z, _ = state
            with torch.enable_grad():
                if not z.requires_grad:
                    z = z.requires_grad_(True)
                dz = self.field(t, z)
                if self.probe is None:
                    div = 0.0
                    for i in range(z.shape[1]):
                        grad_i = torch.autograd.grad(dz[:, i].sum(), z, create_graph=True)[0]
                        div = div + grad_i[:, i]
                else:
                    e_dzdx = torch.autograd.grad(dz, z, self.probe, create_graph=self.training)[0]
                    div = (e_dzdx * self.probe).sum(dim=1)
            return dz, -div

    return Aug()


# ----------------------------------------------------------------------------- timing helpers
def compare(contenders: dict, rounds: int) -> dict:
    """Warm up every contender, then alternate flowmath (the first) and each baseline.

    Each round times the pairs (flowmath, baseline) in turn: ``fm B fm C ...``. Returns per
    name: median time (ms), and for baselines the median of per-round ratios
    baseline / flowmath, plus whatever the warm-up call returned as ``info`` (e.g. NFE)."""
    names = list(contenders)
    ref, baselines = names[0], names[1:]
    infos = {name: clock(contenders[name])[1] for name in names}
    order = [n for name in baselines for n in (ref, name)] or [ref]
    times = alternate(contenders, rounds, warmup=0, order=order)
    out = {name: {"ms": median_ms(times[name]), "info": infos[name]} for name in names}
    for i, name in enumerate(baselines):
        out[name]["ratio"] = median_ratio(times[name], times[ref][i :: len(baselines)])
    return out


def compare_all(contenders: dict, rounds: int) -> dict:
    """Warm up, then time every contender once per round, all in one alternating sequence
    (mirrored on odd rounds); for every flowmath contender (name starting with "flowmath")
    and every baseline, the median per-round ratio flowmath time / baseline time. Floor rows
    (name starting with "floor") get their ratios to the baselines, and every flowmath row its
    ratio to each floor."""
    names = list(contenders)
    infos = {name: clock(contenders[name])[1] for name in names}
    times = alternate(contenders, rounds, warmup=0, mirror=True)
    # floor rows (names starting with "floor") are reported against the baselines like
    # flowmath's, and every flowmath row against them too
    floors = [n for n in names if n.startswith("floor")]
    ours = [n for n in names if n.startswith("flowmath")] + floors
    out = {name: {"ms": median_ms(times[name]), "info": infos[name]} for name in names}
    for name in ours:
        refs = [b for b in names if b not in ours] + (floors if name not in floors else [])
        out[name]["fm/baseline"] = {b: median_ratio(times[name], times[b]) for b in refs}
    return out


def _print_all(title, res):
    print(f"\n{title}")
    print(f"  {'contender':<46s} {'median ms':>10s}  info")
    for name, r in res.items():
        print(f"  {name:<46s} {r['ms']:10.2f}  {r['info']}")
    for name, r in res.items():
        for b, x in r.get("fm/baseline", {}).items():
            print(f"    {name} / {b}: {x:.2f}x")


def user_mlp(t, z, p):
    """The W1/W2 field as a user writes it: a plain autograd.numpy function of (t, z, params)
    on flowmath's parameter layout (no fused VJP: gradients go through autograd.make_vjp)."""
    h = anp.tanh(anp.dot(z, p[0]["W"]) + p[0]["b"] + t * p[0]["u"])
    return anp.dot(h, p[1]["W"]) + p[1]["b"]


def _print(title, res):
    print(f"\n{title}")
    print(f"  {'contender':<34s} {'median ms':>10s} {'baseline/fm':>12s}  info")
    for name, r in res.items():
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else "--"
        print(f"  {name:<34s} {r['ms']:10.2f} {ratio:>12s}  {r['info']}")


# ----------------------------------------------------------------------------- workloads
def w1(rounds, torch, tdq):
    rng = np.random.default_rng(0)
    field, p = mlp_params(rng, 2, 64)
    z0 = rng.normal(size=(1024, 2))
    t = np.array([0.0, 1.0])

    def make_fm(f):
        def run():
            sol = fm.ode.solve(f, z0, t, p, rtol=RTOL, atol=ATOL)
            return f"nfe={sol.nfe}"

        return run

    from scipy.integrate import solve_ivp

    f = _np_mlp(p)

    def scipy_rk45():
        sol = solve_ivp(
            lambda s, y: f(s, y.reshape(1024, 2)).ravel(),
            (0.0, 1.0),
            z0.ravel(),
            method="RK45",
            rtol=RTOL,
            atol=ATOL,
        )
        return f"nfe={sol.nfev}"

    # The floor: the evaluations of f that the solves make (recorded once), with nothing around
    # them. At scipy's step sequence (flowmath's dopri5 makes the same 26) no solver is faster.
    user_calls, scipy_calls = [], []

    def user_rec(s, z, q):
        user_calls.append((s, np.array(z)))
        return user_mlp(s, z, q)

    def scipy_rec(s, y):
        scipy_calls.append((s, y.copy()))
        return f(s, y.reshape(1024, 2)).ravel()

    fm.ode.solve(user_rec, z0, t, p, rtol=RTOL, atol=ATOL)
    solve_ivp(
        scipy_rec,
        (0.0, 1.0),
        z0.ravel(),
        method="RK45",
        rtol=RTOL,
        atol=ATOL,
    )

    def floor_user():
        for s, z in user_calls:
            user_mlp(s, z, p)
        return f"{len(user_calls)} calls"

    def floor_scipy():
        for s, y in scipy_calls:
            f(s, y.reshape(1024, 2)).ravel()
        return f"{len(scipy_calls)} calls"

    contenders = {
        "flowmath dopri5 (user-written f)": make_fm(user_mlp),
        "flowmath dopri5 (fused MLPDynamics)": make_fm(field),
        "floor: the user-written f, bare": floor_user,
        "floor: scipy's NumPy f, bare": floor_scipy,
        "scipy solve_ivp RK45": scipy_rk45,
    }
    if torch is not None:
        mod = _torch_module(torch, p)
        z0t, tt = torch.tensor(z0), torch.tensor(t)

        def torch_solve():
            mod.nfe = 0
            with torch.no_grad():
                tdq.odeint(mod, z0t, tt, rtol=RTOL, atol=ATOL, method="dopri5")
            return f"nfe={mod.nfe}"

        contenders["torchdiffeq odeint"] = torch_solve
    res = compare_all(contenders, rounds)
    ref = (
        solve_ivp(
            lambda s, y: f(s, y.reshape(1024, 2)).ravel(),
            (0.0, 1.0),
            z0.ravel(),
            method="DOP853",
            rtol=1e-12,
            atol=1e-12,
        )
        .y[:, -1]
        .reshape(1024, 2)
    )
    for name, dyn in (("user-written f", user_mlp), ("fused MLPDynamics", field)):
        sol = fm.ode.solve(dyn, z0, t, p, rtol=RTOL, atol=ATOL)
        res[f"flowmath dopri5 ({name})"]["info"] += (
            f" max|err|={np.max(np.abs(sol.ys[-1] - ref)):.1e}"
        )
    return res


def w2(rounds, torch, tdq, *, with_autograd_odeint=True):
    rng = np.random.default_rng(1)
    field, p = mlp_params(rng, 2, 64)
    z0 = rng.normal(size=(1024, 2))
    t = np.array([0.0, 1.0])

    def make_fm(adjoint, f=field):
        stats: dict = {}

        def loss(args):
            z, params = args
            return anp.sum(
                fm.odeint(f, z, t, params, rtol=RTOL, atol=ATOL, adjoint=adjoint, stats=stats)[-1]
                ** 2
            )

        grad = autograd.grad(loss)

        def run():
            g = grad((z0, p))
            back = stats.get("backward", {})
            return (
                f"|g_z0|={np.linalg.norm(g[0]):.6e} nfe={stats['forward']['nfe']}"
                f"+{back.get('nfe')} fused={back.get('fused_vjp')}"
            )

        return run

    contenders = {
        "flowmath backsolve (user-written f)": make_fm("backsolve", user_mlp),
        "flowmath checkpoint (user-written f)": make_fm("checkpoint", user_mlp),
        "flowmath backsolve (fused VJP)": make_fm("backsolve"),
        "flowmath checkpoint (fused VJP)": make_fm("checkpoint"),
    }
    if torch is not None:
        mod = _torch_module(torch, p)
        tt = torch.tensor(t)

        def make_torch(adjoint):
            solver = tdq.odeint_adjoint if adjoint else tdq.odeint

            def run():
                z = torch.tensor(z0, requires_grad=True)
                mod.zero_grad()
                loss = (solver(mod, z, tt, rtol=RTOL, atol=ATOL, method="dopri5")[-1] ** 2).sum()
                loss.backward()
                return f"|g_z0|={z.grad.norm().item():.6e}"

            return run

        contenders["torchdiffeq odeint_adjoint"] = make_torch(True)
        contenders["torchdiffeq backprop"] = make_torch(False)
    if with_autograd_odeint:
        from autograd.scipy.integrate import odeint as ag_odeint

        def func(y, s, W1, b1, u, W2, b2):
            z = anp.reshape(y, (1024, 2))
            return anp.reshape(anp.dot(anp.tanh(anp.dot(z, W1) + b1 + s * u), W2) + b2, (-1,))

        from autograd.builtins import tuple as ag_tuple

        def ag_loss(y0, args):
            ys = ag_odeint(func, y0, np.array([0.0, 1.0]), args, rtol=RTOL, atol=ATOL)
            return anp.sum(ys[-1] ** 2)

        ag_grad = autograd.grad(ag_loss, argnum=(0, 1))
        weights = (p[0]["W"], p[0]["b"], p[0]["u"], p[1]["W"], p[1]["b"])

        def autograd_run():
            g = ag_grad(z0.ravel(), ag_tuple(weights))
            return f"|g_z0|={np.linalg.norm(g[0]):.6e}"

        contenders["autograd scipy odeint (LSODA)"] = autograd_run
    return compare_all(contenders, rounds)


def w3(rounds, torch, tdq):
    rng = np.random.default_rng(2)
    x = eight_gaussians(1024, rng)
    flow = fm.Flow(fm.CNF(hidden=(64,), t1=1.0, rtol=CNF_TOL, atol=CNF_TOL, adjoint="backsolve"))
    params = flow.init(rng, x)
    params[-1]["u"] = np.zeros(2)
    vg = autograd.value_and_grad(lambda q: -anp.mean(flow.log_prob(q, x)))

    def fm_step():
        value, _ = vg(params)
        return f"loss={value:.6f}"

    contenders = {"flowmath CNF step (backsolve)": fm_step}
    if torch is not None:
        aug = _torch_cnf(torch, params)
        xt = torch.tensor(x)
        tt = torch.tensor([0.0, 1.0], dtype=torch.float64)

        def torch_step():
            aug.zero_grad()
            logp0 = torch.zeros(xt.shape[0], dtype=torch.float64)
            z1, dlogp = tdq.odeint_adjoint(
                aug, (xt, logp0), tt, rtol=CNF_TOL, atol=CNF_TOL, method="dopri5"
            )
            z1, dlogp = z1[-1], dlogp[-1]
            logpz = -0.5 * (z1**2).sum(1) - math.log(2 * math.pi)
            loss = -(logpz - dlogp).mean()
            loss.backward()
            return f"loss={loss.item():.6f}"

        contenders["torchdiffeq odeint_adjoint step"] = torch_step
    return compare(contenders, rounds)


def w4(rounds, torch, tdq, dims=(2, 8, 32, 128, 512), batch=256):
    out = {}
    for d in dims:
        hidden = min(4 * d, 512)
        rng = np.random.default_rng(100 + d)
        field, p = mlp_params(rng, d, hidden)
        eps = rng.standard_normal((batch, d))
        dyn = CNFDynamics(field, eps)
        y0 = np.concatenate([rng.normal(size=(batch, d)), np.zeros((batch, 1))], axis=1)
        t = np.array([0.0, 1.0])

        def fm_run(dyn=dyn, y0=y0, p=p, t=t):
            sol = fm.ode.solve(dyn, y0, t, p, rtol=CNF_TOL, atol=CNF_TOL)
            return f"nfe={sol.nfe}"

        contenders = {f"flowmath d={d}": fm_run}
        if torch is not None:
            aug = _torch_cnf(torch, p, probe=torch.tensor(eps))
            aug.eval()
            z0t = torch.tensor(y0[:, :d])
            tt = torch.tensor(t)

            def torch_run(aug=aug, z0t=z0t, tt=tt):
                aug.nfe = 0
                with torch.no_grad():
                    tdq.odeint(
                        aug,
                        (z0t, torch.zeros(z0t.shape[0], dtype=torch.float64)),
                        tt,
                        rtol=CNF_TOL,
                        atol=CNF_TOL,
                        method="dopri5",
                    )
                return f"nfe={aug.nfe}"

            contenders[f"torchdiffeq d={d}"] = torch_run
        out.update(compare(contenders, rounds))
    return out


def _workload(fn, doc: str):
    """``fn(rounds, torch, tdq)`` as a workload of the shared command line (``_timing``)."""

    def run(rounds: int = 7, threads: int = 2, quick: bool = False) -> dict:
        torch, tdq = _torch(threads)
        kwargs = {"dims": (2, 8, 32, 128)} if quick and fn is w4 else {}
        res = fn(3 if quick else rounds, torch, tdq, **kwargs)
        show = _print_all if fn in (w1, w2) else _print
        show(f"{fn.__name__.upper()}  (alternating rounds: {3 if quick else rounds})", res)
        return res

    run.__doc__ = doc
    return run


#: The workloads of this benchmark (``--only`` picks from these ids).
WORKLOADS = {
    "W1": _workload(w1, "W1: dopri5 forward solve, MLP dynamics on R^2, batch 1024."),
    "W2": _workload(w2, "W2: gradient of sum z(1)^2 w.r.t. z0 and the weights (adjoints)."),
    "W3": _workload(w3, "W3: one training step of a 2-D CNF with the exact divergence."),
    "W4": _workload(w4, "W4: CNF forward solve with a Hutchinson trace against dimension d."),
}


def run_benchmarks(only=("W1", "W2", "W3", "W4"), rounds=7, quick=False, threads=2):
    """The workloads ``only`` with ``threads`` BLAS and torch threads; ``{id: results}``."""
    old = blas_threads(threads)
    warm_allocator()
    print(f"threads: torch {threads}, NumPy's OpenBLAS {threads} (was {old})")
    return {name: WORKLOADS[name](rounds, threads, quick) for name in only}


def main(argv=None) -> dict:
    """``python -m experiments.bench_ode [--rounds N] [--only W1 ...] [--threads N] [--json PATH]
    [--quick]``: the shared command line of ``experiments/_timing.py``."""
    return bench_main(
        argv,
        doc=__doc__,
        workloads=WORKLOADS,
        rounds=7,
        threads=2,
        options=[(("--quick",), {"action": "store_true", "help": "3 rounds, W4 up to d = 128"})],
    )


if __name__ == "__main__":
    main()
