"""Gradients of ODE solves: backsolve adjoint, checkpointed discrete adjoint, direct autograd.

For a loss :math:`L(y(t_0), \\dots, y(t_{T-1}))` the three modes of ``adjoint=`` compute
:math:`\\partial L / \\partial y_0` and :math:`\\partial L / \\partial \\theta`:

``"backsolve"`` (Chen et al. 2018, Algorithm 1)
    integrate the augmented system backwards from :math:`t_{T-1}` to :math:`t_0`,

    .. math::

        \\frac{d}{dt}\\begin{bmatrix} z \\\\ a \\\\ a_\\theta \\end{bmatrix}
        = \\begin{bmatrix} f(t, z, \\theta) \\\\ -a^\\top \\partial f / \\partial z \\\\
          -a^\\top \\partial f / \\partial \\theta \\end{bmatrix},
        \\qquad a(t_{T-1}) = \\partial L / \\partial y(t_{T-1}),\\; a_\\theta(t_{T-1}) = 0,

    adding :math:`\\partial L / \\partial y(t_k)` to :math:`a` at every output time.  The state
    :math:`z` is reconstructed in reverse time (memory: the outputs only); at every output time
    it restarts from the forward value (as torchdiffeq does), and the reconstruction drift
    :math:`\\|\\hat z(t_0) - y_0\\|` (and its maximum over the output times) is reported.
    Error control covers :math:`[z, a]` and not the quadrature :math:`a_\\theta` (the
    "seminorm" of Kidger, Chen, Lyons 2021, arXiv:2009.09457).
    The gradient has the solver's error, with the backward tolerances ``adjoint_rtol``,
    ``adjoint_atol``; each reverse-time segment starts from half the forward's largest accepted
    step.

``"checkpoint"``
    store every accepted step of the forward solve (its ``s`` stage inputs); backwards, per step,
    run the vector-Jacobian product of each stage in reverse.  This is the exact gradient (to
    rounding) of the discrete map the forward solve computed, with the step sizes held fixed (as
    selected by the controller), at the cost of at most ``s`` VJPs per step (no evaluation of
    ``f`` without its VJP) and ``s * n_accepted + 1`` stored states (``(s - 1) * n_accepted + 1``
    with First-Same-As-Last, where a step's last stage input is the next step's first).

``"direct"``
    autograd traces the Runge-Kutta stages of the accepted steps (the step sizes are selected by
    an untraced forward pass and held fixed, exactly as in ``"checkpoint"``): the reference the
    other two are tested against; memory is the whole tape.

The VJPs :math:`a^\\top \\partial f/\\partial y`, :math:`a^\\top \\partial f/\\partial \\theta` come
from ``f.vjp(t, y, params, a) -> (dydt, a_y, a_params)`` when ``f`` provides it (the fused
protocol), and from ``autograd.make_vjp`` otherwise (the generic reference path).

The backward counts land in the solution's :class:`~flowmath.ode.solve.BackwardStats` (and in
``stats["backward"]`` when a ``stats`` dict was passed) when autograd runs the VJP.

References
----------
Chen, Rubanova, Bettencourt, Duvenaud (2018), "Neural Ordinary Differential Equations",
arXiv:1806.07366.
Zhuang et al. (2020), "Adaptive Checkpoint Adjoint Method for Gradient Estimation in Neural ODE",
arXiv:2006.02493.
Kidger, Chen, Lyons (2021), "'Hey, that's not an ODE': Faster ODE Adjoints via Seminorms",
arXiv:2009.09457.
"""

from __future__ import annotations

import numpy as np
from autograd import make_vjp
from autograd.extend import defvjp, defvjp_argnums, primitive

from .._xp import getval, is_box
from .solve import _Counts, _make_flat_fun, _Trace, integrate, tree_flatten

__all__ = ["differentiable_solve", "make_vjp_fun"]


def _flat(x):
    return np.asarray(x, dtype=np.float64).reshape(-1)


def _differentiable(leaf) -> bool:
    """Leaves autograd can differentiate with respect to: real floating arrays and floats."""
    if isinstance(leaf, np.ndarray):
        return leaf.dtype.kind == "f"
    return isinstance(leaf, float)


def make_vjp_fun(f, params, shape, leaves_raw, need_params, rebuild=None):
    """``vjp(t, y_flat, a_flat) -> (dydt_flat, a_y_flat, a_params_flat or None)``.

    Uses the fused ``f.vjp`` when present, else ``autograd.make_vjp`` (with respect to the
    floating leaves of ``params``; integer leaves get zero cotangents).  ``a_params_flat`` is the
    concatenation of the raveled leaves of ``a^T df/dparams`` in :func:`tree_flatten` order.
    """
    n_leaves = len(leaves_raw)
    if rebuild is None:
        rebuild = tree_flatten(params)[1]
    diff_idx = [i for i, leaf in enumerate(leaves_raw) if _differentiable(leaf)]
    sizes = [int(np.size(leaf)) for leaf in leaves_raw]

    def flat_params(tree):
        ls, _ = tree_flatten(tree)
        if len(ls) != n_leaves:
            raise ValueError(
                f"`f.vjp` must return a_params with the pytree structure of `params` "
                f"({n_leaves} leaves); got {len(ls)} leaves"
            )
        if not ls:
            return np.zeros(0)
        return np.concatenate([_flat(leaf) for leaf in ls])

    fused = getattr(f, "vjp", None)
    if callable(fused):

        def vjp(t, yflat, aflat):
            dydt, a_y, a_p = fused(t, yflat.reshape(shape), params, aflat.reshape(shape))
            return _flat(dydt), _flat(a_y), (flat_params(a_p) if need_params else None)

        return vjp

    def vjp(t, yflat, aflat):
        y = yflat.reshape(shape)
        a = aflat.reshape(shape)
        if need_params:

            def fun(args):
                leaves = list(leaves_raw)
                for i, v in zip(diff_idx, args[1], strict=True):
                    leaves[i] = v
                return f(t, args[0], rebuild(leaves))

            vjp_fn, ans = make_vjp(fun)((y, tuple(leaves_raw[i] for i in diff_idx)))
            a_y, a_d = vjp_fn(a)
            parts = [np.zeros(n) for n in sizes]
            for i, g in zip(diff_idx, a_d, strict=True):
                parts[i] = _flat(g)
            a_p = np.concatenate(parts) if parts else np.zeros(0)
            return _flat(ans), _flat(a_y), a_p
        vjp_fn, ans = make_vjp(lambda y_: f(t, y_, params))(y)
        return _flat(ans), _flat(vjp_fn(a)), None

    return vjp


class _Context:
    """State shared by the forward primitive and its VJP (one per differentiated solve)."""

    def __init__(self, f, y0raw, t, leaves_raw, rebuild, adjoint, opts, backward, stats):
        self.f = f
        self.shape = y0raw.shape
        self.y0_dtype = y0raw.dtype
        self.out_dtype = np.float32 if y0raw.dtype == np.float32 else np.float64
        self.y0flat = y0raw.astype(np.float64).reshape(-1)
        self.t = t
        self.leaves_raw = leaves_raw
        self.params = rebuild(leaves_raw)
        self.rebuild = rebuild
        self.adjoint = adjoint
        self.opts = opts
        self.backward_stats = backward
        self.stats = stats
        # checkpoint keeps the stage inputs of every accepted step (s states per step, no
        # recomputation in the backward pass); direct needs only the step grid.
        self.trace = (
            _Trace(store_stages=adjoint == "checkpoint") if adjoint != "backsolve" else None
        )
        self.ys_flat = None
        self.counts = None

    def forward(self):
        o = self.opts
        fun = _make_flat_fun(self.f, self.params, self.shape)
        self.ys_flat, self.counts = integrate(
            fun,
            self.t,
            self.y0flat,
            o["tab"],
            o["rtol"],
            o["atol"],
            step_size=o["step_size"],
            first_step=o["first_step"],
            max_steps=o["max_steps"],
            trace=self.trace,
        )
        return self.ys_flat.reshape((self.t.shape[0],) + self.shape).astype(self.out_dtype)

    def finish(self, **kw):
        bs = self.backward_stats
        for key, value in kw.items():
            setattr(bs, key, value)
        bs.computed = True
        # "direct" traces f with autograd whatever it provides
        bs.fused_vjp = self.adjoint != "direct" and callable(getattr(self.f, "vjp", None))
        if self.stats is not None:
            self.stats["backward"] = bs.as_dict()

    def backward(self, g, argnums):
        g = np.asarray(g, dtype=np.float64).reshape(self.t.shape[0], -1)
        need_params = any(i >= 1 for i in argnums)
        vjp = make_vjp_fun(
            self.f, self.params, self.shape, self.leaves_raw, need_params, self.rebuild
        )
        if self.adjoint == "backsolve":
            a0, ath = self._backsolve(vjp, g, need_params)
        else:
            a0, ath = self._checkpoint(vjp, g, need_params)
        out = []
        sizes = [int(np.size(leaf)) for leaf in self.leaves_raw]
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(int) if sizes else [0]
        for i in argnums:
            if i == 0:
                out.append(
                    a0.reshape(self.shape).astype(self.y0_dtype, copy=False)
                    if self.y0_dtype.kind == "f"
                    else a0.reshape(self.shape)
                )
            else:
                leaf = self.leaves_raw[i - 1]
                piece = ath[starts[i - 1] : starts[i]]
                if isinstance(leaf, np.ndarray):
                    dt = leaf.dtype if leaf.dtype.kind == "f" else np.float64
                    out.append(piece.reshape(leaf.shape).astype(dt, copy=False))
                else:
                    out.append(
                        float(piece[0]) if piece.size == 1 else piece.reshape(np.shape(leaf))
                    )
        return tuple(out)

    # ----------------------------------------------------------------- backsolve

    def _backsolve(self, vjp, g, need_params):
        o = self.opts
        N = self.y0flat.shape[0]
        P = sum(int(np.size(leaf)) for leaf in self.leaves_raw) if need_params else 0
        t = self.t

        def aug(tt, s):
            dz, a_y, a_p = vjp(tt, s[:N], s[N : 2 * N])
            out = np.empty(2 * N + P)
            out[:N] = dz
            np.negative(a_y, out=out[N : 2 * N])
            if P:
                np.negative(a_p, out=out[2 * N :])
            return out

        z = self.ys_flat[-1]
        a = g[-1]
        a_theta = np.zeros(P)
        total = _Counts()
        # The reverse-time solve retraces the forward trajectory: start it from half the
        # forward's largest accepted step rather than Hairer's selection (one evaluation plus a
        # ramp-up from a deliberately small step); 10-14% fewer backward evaluations measured on
        # W2-type problems.
        first_step = (
            0.5 * self.counts.h_max if o["tab"].adaptive and self.counts.h_max > 0 else None
        )
        drift = drift_max = 0.0
        for k in range(t.shape[0] - 1, 0, -1):
            s0 = np.concatenate([z, a, a_theta])
            ys, c = integrate(
                aug,
                np.array([t[k], t[k - 1]]),
                s0,
                o["tab"],
                o["adjoint_rtol"],
                o["adjoint_atol"],
                step_size=o["step_size"],
                first_step=first_step,
                max_steps=o["max_steps"],
                norm_size=2 * N,
                what="augmented adjoint state [z, a, a_theta]",
            )
            total.add(c)
            s1 = ys[-1]
            # reconstruction error of z at t_{k-1}; then restart from the forward pass's value
            # there (it is stored anyway), so the drift does not accumulate over segments
            drift = float(np.linalg.norm(s1[:N] - self.ys_flat[k - 1]))
            drift_max = max(drift_max, drift)
            z = self.ys_flat[k - 1]
            a = s1[N : 2 * N] + g[k - 1]
            a_theta = s1[2 * N :]
        self.finish(
            nfe=total.nfe,
            n_vjp=total.nfe,
            n_steps=total.n_steps,
            n_accepted=total.n_accepted,
            n_rejected=total.n_rejected,
            drift=drift,
            drift_max=drift_max,
            n_stored_states=int(t.shape[0]),
        )
        if t.shape[0] == 1:
            a = g[0]
        return a, a_theta

    # ----------------------------------------------------------------- checkpoint

    def _checkpoint(self, vjp, g, need_params):
        o = self.opts
        tab = o["tab"]
        A, b, c = tab.A, tab.b, tab.c
        s = tab.n_stages
        N = self.y0flat.shape[0]
        P = sum(int(np.size(leaf)) for leaf in self.leaves_raw) if need_params else 0
        tr = self.trace
        n_steps = len(tr.steps)
        a = np.zeros(N)
        for k in tr.node_out.get(n_steps, ()):
            a = a + g[k]
        a_theta = np.zeros(P)
        Kbar = np.empty((s, N))
        nfe = n_vjp = 0
        b_live = b != 0
        for n in range(n_steps - 1, -1, -1):
            t_n, h, _, Y = tr.steps[n]  # Y: the stage inputs stored by the forward pass
            # Cotangents of the stage derivatives K_i: y_{n+1} = y_n + h sum b_i K_i and the
            # dense outputs y_n + h sum w_i(theta) K_i.
            np.multiply.outer(h * b, a, out=Kbar)
            live = b_live.copy()
            abar = a.copy()
            for k, theta in tr.dense_out.get(n, ()):
                w = tab.dense_weights(theta)
                Kbar += np.multiply.outer(h * w, g[k])
                live |= w != 0
                abar += g[k]
            for i in range(s - 1, -1, -1):
                if not live[i]:
                    continue
                _, a_y, a_p = vjp(t_n + c[i] * h, Y[i], Kbar[i])
                n_vjp += 1
                abar += a_y
                if P:
                    a_theta += a_p
                if i:
                    Kbar[:i] += np.multiply.outer(h * A[i, :i], a_y)
                    live[:i] |= A[i, :i] != 0
            a = abar
            for k in tr.node_out.get(n, ()):
                a = a + g[k]
        self.finish(
            nfe=nfe,
            n_vjp=n_vjp,
            n_steps=n_steps,
            n_accepted=n_steps,
            n_rejected=0,
            # FSAL: a step's last stage input is the next step's first (one array, kept once)
            n_stored_states=((s - 1) if tab.fsal else s) * n_steps + 1,
        )
        return a, a_theta


@primitive
def _ode_primitive(y0, *leaves, ctx):
    """ys = solve(y0, params) as one autograd primitive: no tracing inside the solver."""
    return ctx.forward()


def _ode_vjpmaker(argnums, ans, args, kwargs):
    ctx = kwargs["ctx"]
    if any(is_box(a) for a in args):
        # nested differentiation (grad of grad): the inner VJP would silently ignore the outer
        # trace, so refuse
        raise NotImplementedError(
            f"second derivatives through adjoint={ctx.adjoint!r} are not supported (its backward "
            "pass is plain NumPy); use adjoint='direct'"
        )

    def vjp(g):
        return ctx.backward(g, argnums)

    return vjp


defvjp_argnums(_ode_primitive, _ode_vjpmaker)


@primitive
def _mark_backward(ys, ctx):
    """Identity whose VJP records the backward counts of the ``"direct"`` mode."""
    return ys


def _mark_vjp(ans, ys, ctx):
    def vjp(g):
        ctx.finish(**ctx.direct_counts)
        return g

    return vjp


defvjp(_mark_backward, _mark_vjp)


def _direct(ctx, f, y0, leaves, rebuild):
    """Autograd through the stages of the accepted steps recorded by ``ctx.forward()``."""
    import autograd.numpy as anp

    ctx.forward()
    tab = ctx.opts["tab"]
    A, b, c = tab.A, tab.b, tab.c
    s = tab.n_stages
    params = rebuild(leaves)
    tr = ctx.trace
    outs = [None] * ctx.t.shape[0]
    y = y0.astype(np.float64) if hasattr(y0, "astype") else anp.asarray(y0, dtype=np.float64)
    for k in tr.node_out.get(0, ()):
        outs[k] = y

    def comb(base, h, weights, K):
        acc = None
        for wj, Kj in zip(weights, K, strict=False):
            if wj != 0:
                term = wj * Kj
                acc = term if acc is None else acc + term
        return base if acc is None else base + h * acc

    K_last = None
    n_f = 0
    for n, (t_n, h, _, _) in enumerate(tr.steps):
        if tab.fsal and K_last is not None:
            K = [K_last]
        else:
            K = [f(t_n, y, params)]
            n_f += 1
        Ys = [y]
        for i in range(1, s):
            Yi = comb(y, h, A[i, :i], K)
            Ys.append(Yi)
            K.append(f(t_n + c[i] * h, Yi, params))
            n_f += 1
        y_new = Ys[-1] if tab.fsal else comb(y, h, b, K)
        for k, theta in tr.dense_out.get(n, ()):
            outs[k] = comb(y, h, tab.dense_weights(theta), K)
        for k in tr.node_out.get(n + 1, ()):
            outs[k] = y_new
        y = y_new
        K_last = K[-1]
    ys = anp.stack(outs).astype(ctx.out_dtype)
    ctx.direct_counts = dict(
        nfe=0,
        n_vjp=n_f,
        n_steps=len(tr.steps),
        n_accepted=len(tr.steps),
        n_rejected=0,
        n_stored_states=((s - 1) if tab.fsal else s) * len(tr.steps) + 1,
    )
    return _mark_backward(ys, ctx)


def differentiable_solve(f, y0, t, leaves, rebuild, adjoint, opts, backward, stats):
    """The autograd-aware solve: returns ``(ys, forward counts)`` with ``ys`` a box."""
    y0raw = np.asarray(getval(y0))
    leaves_raw = [getval(leaf) for leaf in leaves]
    ctx = _Context(f, y0raw, t, leaves_raw, rebuild, adjoint, opts, backward, stats)
    if adjoint == "direct":
        ys = _direct(ctx, f, y0, leaves, rebuild)
    else:
        ys = _ode_primitive(y0, *leaves, ctx=ctx)
    return ys, ctx.counts
