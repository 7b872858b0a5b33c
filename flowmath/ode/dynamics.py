"""Built-in time-dependent MLP dynamics for neural ODEs and CNFs, with hand-written fused VJPs.

Two dynamics objects follow the solver's protocol (docs/design.rst): ``f(t, y, params) -> dy/dt``
and a fused ``f.vjp(t, y, params, a) -> (dy/dt, a^T df/dy, a^T df/dparams)`` that the adjoint
modes call instead of tracing ``f`` with autograd.

- :class:`MLPDynamics` is the vector field :math:`f(t, z; \\theta)` itself, an MLP whose every
  layer sees the time, either by concatenation or by FFJORD's concat-squash gating.
- :class:`CNFDynamics` is the augmented field of a continuous normalizing flow on the packed state
  ``y = [z, l]`` of shape ``(n, d + 1)`` (the last column carries the log-determinant):

  .. math:: \\frac{d}{dt}\\begin{bmatrix} z \\\\ l \\end{bmatrix}
      = \\begin{bmatrix} f(t, z) \\\\
      \\operatorname{tr}\\, \\partial f / \\partial z \\end{bmatrix},

  with the exact trace (all ``d`` directions, propagated forward-mode through the MLP) or
  Hutchinson's estimate :math:`\\varepsilon^\\top (\\partial f/\\partial z)\\, \\varepsilon` with a
  probe fixed for the whole solve (FFJORD, Algorithm 1). Its VJP includes the second derivatives
  of the MLP that the divergence term needs.

``__call__`` is written against :func:`flowmath._xp.array_namespace`, so autograd can trace it
(the ``"direct"`` adjoint and the reference in tests) and it runs on CuPy for inference; ``vjp``
is plain NumPy and is tested against ``autograd.make_vjp`` of ``__call__``.

At a fixed time every layer is affine in its input with *effective* weights

.. math:: \\text{concat:}\\; W_e = W,\\; b_e = b + t u; \\qquad
    \\text{concat-squash:}\\; W_e = W \\operatorname{diag}(s),\\; b_e = b \\odot s + t c,
    \\; s = \\sigma(t g + g_0),

so both time injections share one forward pass and one backward pass; only the pull-back from
``(W_e, b_e)`` to the layer's parameters differs.

References
----------
Chen, Rubanova, Bettencourt, Duvenaud, "Neural Ordinary Differential Equations", NeurIPS 2018,
arXiv:1806.07366.
Grathwohl, Chen, Bettencourt, Sutskever, Duvenaud, "FFJORD: Free-form Continuous Dynamics for
Scalable Reversible Generative Models", ICLR 2019, arXiv:1810.01367.
"""

from __future__ import annotations

import autograd.numpy as anp
import numpy as np

from .. import activations as _activations
from .._checks import check_choice, check_int, check_rng
from .._xp import array_namespace, getval
from ..kernels import cnf_mlp1 as _mlp1
from ..kernels.cnf_tanh import USE_KERNEL as _TANH_KERNEL
from ..kernels.cnf_tanh import tanh as _fast_tanh
from ..kernels.cnf_tanh import tanh_derivs as _tanh_derivs

__all__ = ["ACTIVATIONS", "TIME_MODES", "CNFDynamics", "MLPDynamics"]

TIME_MODES = ("concat", "concat-squash")
#: The hidden activations the fused VJPs implement (entries of
#: :data:`flowmath.activations.ACTIVATIONS` with a second derivative).
ACTIVATIONS = ("tanh", "softplus")
_SOFTPLUS = _activations.ACTIVATIONS["softplus"]

#: One-hidden-layer tanh fields on states of at most this dimension run the fused row-wise
#: kernels of :mod:`flowmath.kernels.cnf_mlp1` (NumPy float64 only); above it the skinny
#: matrix products stop being skinny and BLAS wins. 0 switches the kernels off (the tests
#: compare both paths).
FUSED_MAX_DIM = 16

#: Whether ``MLPDynamics.__call__`` uses the row-wise kernel too. That kernel evaluates tanh
#: by a scalar ``exp`` per value, so where NumPy has a SIMD tanh
#: (``flowmath.kernels.cnf_tanh.USE_KERNEL`` false) BLAS plus ``numpy.tanh`` is faster (W1,
#: alternating in one process on an AVX-512 EPYC: 8 ms against 17 ms). The VJP and both CNF
#: kernels stay on there: they take the activations from BLAS and NumPy's tanh and fuse the
#: derivatives and the divergence, which the NumPy paths compute in extra passes over ``(n, H)``
#: arrays (see :mod:`flowmath.kernels.cnf_mlp1`).
FUSED_FORWARD = _TANH_KERNEL


def _fusable(field, y2d, params) -> bool:
    return (
        field.activation == "tanh"
        and len(field.hidden) == 1
        and 0 < y2d.shape[1] <= FUSED_MAX_DIM
        and type(y2d) is np.ndarray
        and y2d.dtype == np.float64
        and all(type(v) is np.ndarray and v.dtype == np.float64 for p in params for v in p.values())
    )


# -- activations: value, first and second derivative ------------------------------------------
def _act(xp, name, x):
    if name == "tanh":
        # the fused numba kernel (an autograd primitive) for NumPy and autograd; CuPy: its own
        return xp.tanh(x) if xp is not np and xp is not anp else _fast_tanh(x)
    return _SOFTPLUS.fn(x)  # logaddexp(0, x), overflow-free


def _act_np(name, x, order):
    """NumPy ``(sigma, sigma')`` (``order=1``) or ``(sigma, sigma', sigma'')`` in one pass."""
    if name == "tanh":
        return _tanh_derivs(x, order)
    h = _SOFTPLUS.fn(x)
    d1, d2 = _act_derivs(np, name, x, h)
    return (h, d1) if order == 1 else (h, d1, d2)


def _act_derivs(xp, name, x, h):
    """``(sigma'(x), sigma''(x))`` given ``h = sigma(x)``."""
    if name == "tanh":
        d1 = 1.0 - h * h
        return d1, -2.0 * h * d1
    sig = _SOFTPLUS.derivative(x)  # the logistic sigmoid; softplus'' = sig (1 - sig)
    return sig, sig * (1.0 - sig)


def _mm3(T, W):
    """``T @ W`` for ``T`` of shape ``(n, p, k)`` as one 2-D BLAS product (NumPy's batched
    matmul loops over ``n`` small products)."""
    n, p, k = T.shape
    return (np.ascontiguousarray(T).reshape(n * p, k) @ W).reshape(n, p, W.shape[1])


def _sigmoid(xp, x):
    return 0.5 * (1.0 + xp.tanh(0.5 * x))


class MLPDynamics:
    """Time-dependent MLP vector field :math:`f(t, z; \\theta)` with a fused VJP.

    .. math:: h_0 = z,\\quad h_{l+1} = \\sigma(h_l W_{e,l}(t) + b_{e,l}(t)),\\quad
        f(t, z) = h_L W_{e,L}(t) + b_{e,L}(t),

    rows are samples (``h_l`` has shape ``(n, H_l)``), and the effective weights carry the time
    (module docstring). The output layer is linear.

    Parameters
    ----------
    hidden : tuple of int
        Hidden widths; ``()`` gives the affine field ``f = z W + b + t u``.
    time : {"concat", "concat-squash"}
        How every layer sees ``t``: an extra input (FFJORD's ``ConcatLinear``) or a sigmoid gate
        and a time bias on the output (``ConcatSquashLinear``).
    activation : {"tanh", "softplus"}
        Hidden nonlinearity (smooth: the exact divergence's VJP needs its second derivative).

    Notes
    -----
    ``params`` is a list with one dict per layer: ``{"W": (H_in, H_out), "b": (H_out,),
    "u": (H_out,)}`` for concat, ``{"W", "b", "gate_w", "gate_b", "bias_t"}`` (the last three
    of shape ``(H_out,)``) for concat-squash. ``y`` may have any shape ``(..., d)``.

    Examples
    --------
    >>> import numpy as np
    >>> from flowmath.ode.dynamics import MLPDynamics
    >>> rng = np.random.default_rng(0)
    >>> f = MLPDynamics(hidden=(16,))
    >>> params = f.init(rng, 3)
    >>> z = rng.normal(size=(5, 3))
    >>> f(0.5, z, params).shape
    (5, 3)
    >>> dydt, a_z, a_params = f.vjp(0.5, z, params, np.ones_like(z))
    >>> a_z.shape, a_params[0]["W"].shape
    ((5, 3), (3, 16))
    """

    def __init__(self, hidden=(64, 64), time: str = "concat", activation: str = "tanh"):
        hidden = tuple(hidden)
        for i, h in enumerate(hidden):
            check_int(h, f"hidden[{i}]", minimum=1)
        self.hidden = tuple(int(h) for h in hidden)
        self.time = check_choice(time, "time", TIME_MODES)
        self.activation = _activations.check_activation(activation, "activation", ACTIVATIONS)

    def __repr__(self) -> str:
        return (
            f"MLPDynamics(hidden={self.hidden!r}, time={self.time!r}, "
            f"activation={self.activation!r})"
        )

    # -- parameters --------------------------------------------------------------------------
    def init(self, rng: np.random.Generator, dim: int, *, scale: float = 1.0):
        """Random parameters for states of dimension ``dim``: weights and time terms
        :math:`\\sim N(0, \\text{scale}^2/\\text{fan\\_in})` (a generic, non-identity field)."""
        check_rng(rng)
        dim = check_int(dim, "dim", minimum=1)
        widths = (dim,) + self.hidden + (dim,)
        params = []
        for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True):
            std = scale / np.sqrt(fan_in)
            layer = {
                "W": rng.normal(0.0, std, size=(fan_in, fan_out)),
                "b": rng.normal(0.0, std, size=fan_out),
            }
            if self.time == "concat":
                layer["u"] = rng.normal(0.0, std, size=fan_out)
            else:
                layer["gate_w"] = rng.normal(0.0, 1.0, size=fan_out)
                layer["gate_b"] = rng.normal(0.0, 1.0, size=fan_out)
                layer["bias_t"] = rng.normal(0.0, std, size=fan_out)
            params.append(layer)
        return params

    def check_params(self, params, dim: int | None = None) -> int:
        """Validate the structure of ``params``; return the state dimension it was made for."""
        params = getval(params)
        n_layers = len(self.hidden) + 1
        keys = (
            {"W", "b", "u"} if self.time == "concat" else {"W", "b", "gate_w", "gate_b", "bias_t"}
        )
        if not isinstance(params, (list, tuple)) or len(params) != n_layers:
            raise ValueError(
                f"`params` must be a list of {n_layers} layer dicts for hidden={self.hidden}; "
                f"got {type(params).__name__}"
                + (f" of length {len(params)}" if isinstance(params, (list, tuple)) else "")
            )
        for i, p in enumerate(params):
            p = getval(p)
            if not isinstance(p, dict) or set(p) != keys:
                got = sorted(p) if isinstance(p, dict) else type(p).__name__
                raise ValueError(
                    f"`params[{i}]` must be a dict with keys {sorted(keys)}; got {got}"
                )
        d = int(np.shape(getval(getval(params[0])["W"]))[0])
        if dim is not None and d != dim:
            raise ValueError(f"`params` were made for states of dimension {d}; got dimension {dim}")
        return d

    # -- effective weights at time t and their pull-back ---------------------------------------
    def _effective(self, xp, t, p):
        if self.time == "concat":
            return p["W"], p["b"] + t * p["u"]
        s = _sigmoid(xp, t * p["gate_w"] + p["gate_b"])
        return p["W"] * s, p["b"] * s + t * p["bias_t"]

    def _pullback(self, t, p, gW, gb):
        """Gradient with respect to the layer dict from that of the effective weights."""
        if self.time == "concat":
            return {"W": gW, "b": gb, "u": t * gb}
        s = _sigmoid(np, t * p["gate_w"] + p["gate_b"])
        gs = np.sum(gW * p["W"], axis=0) + gb * p["b"]
        gz = gs * s * (1.0 - s)
        return {"W": gW * s, "b": gb * s, "gate_w": t * gz, "gate_b": gz, "bias_t": t * gb}

    def effective_weights(self, t, params):
        """``[(W_e, b_e), ...]`` of every layer at time ``t`` (NumPy)."""
        return [self._effective(np, t, p) for p in params]

    # -- the field -----------------------------------------------------------------------------
    def __call__(self, t, y, params):
        """:math:`f(t, y)`, same shape as ``y`` (shape ``(..., d)``); autograd-traceable."""
        xp = array_namespace(y, params, t)
        shape = y.shape
        h = xp.reshape(y, (-1, shape[-1]))
        if xp is np and FUSED_FORWARD and _fusable(self, h, params):
            (W0, b0), (W1, b1) = self.effective_weights(t, params)
            return _mlp1.mlp1_forward(h, W0, b0, W1, b1).reshape(shape)
        last = len(params) - 1
        for l, p in enumerate(params):
            W, b = self._effective(xp, t, p)
            pre = xp.dot(h, W) + b
            h = _act(xp, self.activation, pre) if l < last else pre
        return xp.reshape(h, shape)

    def vjp(self, t, y, params, a):
        """Fused value and vector-Jacobian product.

        Parameters
        ----------
        t : float
        y, a : ndarray, shape (..., d)
            State and cotangent.
        params : list of dict

        Returns
        -------
        dydt : ndarray, shape of ``y``
        a_y : ndarray, shape of ``y``
            :math:`a^\\top \\partial f/\\partial y` (row-wise).
        a_params : list of dict
            :math:`\\sum_{\\text{rows}} a^\\top \\partial f/\\partial \\theta`, structured like
            ``params``.
        """
        shape = y.shape
        d = shape[-1]
        eff = self.effective_weights(t, params)
        if _fusable(self, np.reshape(y, (-1, d)), params):
            (W0, b0), (W1, b1) = eff
            f, gz, gW0, gb0, gW1, gb1 = _mlp1.mlp1_vjp(
                np.reshape(y, (-1, d)), np.reshape(a, (-1, d)), W0, b0, W1, b1
            )
            grads = [self._pullback(t, params[0], gW0, gb0), self._pullback(t, params[1], gW1, gb1)]
            return f.reshape(shape), gz.reshape(shape), grads
        last = len(eff) - 1
        hs = [np.reshape(y, (-1, d))]
        ds = []
        out = None
        for l, (W, b) in enumerate(eff):
            pre = hs[-1] @ W
            pre += b
            if l < last:
                h, d1 = _act_np(self.activation, pre, 1)
                ds.append(d1)
                hs.append(h)
            else:
                out = pre
        g = np.reshape(a, (-1, d))
        grads = [None] * len(eff)
        for l in range(last, -1, -1):
            W = eff[l][0]
            grads[l] = self._pullback(t, params[l], hs[l].T @ g, g.sum(axis=0))
            g = g @ W.T
            if l > 0:
                g *= ds[l - 1]
        return out.reshape(shape), g.reshape(shape), grads


class CNFDynamics:
    """Augmented CNF field on the packed state ``y = [z, l]`` of shape ``(n, d + 1)``.

    .. math:: \\dot z = f(t, z), \\qquad
        \\dot l = \\operatorname{tr}\\,\\frac{\\partial f}{\\partial z}
        \\;\\text{(exact)} \\quad\\text{or}\\quad
        \\varepsilon^\\top \\frac{\\partial f}{\\partial z}\\, \\varepsilon \\;\\text{(Hutchinson)}.

    The exact trace propagates the Jacobian forward through the MLP,
    :math:`J_{l+1} = (J_l W_{e,l}) \\operatorname{diag}\\sigma'(\\cdot)` with :math:`J_0 = I`,
    at the
    cost of ``d`` Jacobian-vector products (``O(n d H^2)`` memory and work per hidden layer; one
    hidden layer has the closed form :math:`\\sum_k \\sigma'_k \\sum_i W_{0,ik} W_{1,ki}`).
    Hutchinson's estimate propagates the single tangent ``eps`` instead (one JVP).

    Parameters
    ----------
    field : MLPDynamics
        The vector field ``f``.
    probe : ndarray, shape (n, d), optional
        ``None`` for the exact trace; otherwise Hutchinson's probes, one row per sample, held
        fixed over the whole solve (FFJORD, Algorithm 1).

    Notes
    -----
    The field does not depend on ``l``, so the last column of ``a_y`` returned by :meth:`vjp` is
    zero. Integrating from 0 to ``t1`` gives ``l(t1) - l(0) = log|det dz(t1)/dz(0)|`` (Liouville).
    """

    def __init__(self, field: MLPDynamics, probe=None):
        if not isinstance(field, MLPDynamics):
            raise TypeError(f"`field` must be an MLPDynamics; got {type(field).__name__}")
        if probe is not None:
            probe = np.asarray(probe)
            if probe.ndim != 2:
                raise ValueError(f"`probe` must have shape (n, d); got shape {probe.shape}")
        self.field = field
        self.probe = probe

    @property
    def exact(self) -> bool:
        return self.probe is None

    def __repr__(self) -> str:
        kind = "exact" if self.exact else "hutchinson"
        return f"CNFDynamics({self.field!r}, trace={kind!r})"

    # -- forward (autograd-traceable) ----------------------------------------------------------
    def divergence(self, t, z, params):
        """``(f(t, z), trace)`` with shapes ``(n, d)`` and ``(n,)``; autograd-traceable."""
        xp = array_namespace(z, params, t)
        fld = self.field
        eff = [fld._effective(xp, t, p) for p in params]
        n_hidden = len(eff) - 1
        if xp is np and self.exact and _fusable(fld, z, params):
            (W0, b0), (W1, b1) = eff
            return _mlp1.cnf1_forward(z, W0, b0, W1, b1)
        eps = self.probe
        h = z
        T = None  # tangents: (n, d, H) exact, (n, H) Hutchinson
        for l in range(n_hidden):
            W, b = eff[l]
            pre = xp.dot(h, W) + b
            if xp is np:
                h, s = _act_np(fld.activation, pre, 1)
            else:
                h = _act(xp, fld.activation, pre)
                s, _ = _act_derivs(xp, fld.activation, pre, h)
            if self.exact:
                if n_hidden == 1:
                    T = s  # closed form below
                else:
                    M = W[None, :, :] if l == 0 else xp.matmul(T, W)
                    T = M * s[:, None, :]
            else:
                M = xp.dot(eps, W) if l == 0 else xp.dot(T, W)
                T = M * s
        WL, bL = eff[-1]
        f = xp.dot(h, WL) + bL
        if n_hidden == 0:
            if self.exact:
                tr = xp.trace(WL) + xp.zeros(z.shape[0], dtype=z.dtype)
            else:
                tr = xp.sum(xp.dot(eps, WL) * eps, axis=1)
        elif self.exact and n_hidden == 1:
            c = xp.sum(eff[0][0] * WL.T, axis=0)
            tr = xp.dot(T, c)
        elif self.exact:
            tr = xp.sum(xp.sum(T * WL.T[None, :, :], axis=2), axis=1)
        else:
            tr = xp.sum(T * xp.dot(eps, WL.T), axis=1)
        return f, tr

    def __call__(self, t, y, params):
        """``d[z, l]/dt``, shape ``(n, d + 1)``; autograd-traceable."""
        xp = array_namespace(y, params, t)
        d = y.shape[1] - 1
        f, tr = self.divergence(t, y[:, :d], params)
        return xp.concatenate([f, tr[:, None]], axis=1)

    # -- fused VJP (NumPy) ----------------------------------------------------------------------
    def vjp(self, t, y, params, a):
        """Value and VJP of the augmented field, including the divergence's second derivatives.

        Returns ``(dydt, a_y, a_params)`` with ``a_y = a^T d[f, tr]/dy`` of shape ``(n, d + 1)``
        (last column zero) and ``a_params`` structured like ``params``.
        """
        fld = self.field
        n, d1 = y.shape
        d = d1 - 1
        z = y[:, :d]
        af = a[:, :d]
        at = a[:, d]
        eff = fld.effective_weights(t, params)
        n_hidden = len(eff) - 1
        exact = self.exact
        if exact and _fusable(fld, z, params):
            (W0, b0), (W1, b1) = eff
            f, tr, gz, gW0, gb0, gW1, gb1 = _mlp1.cnf1_vjp(z, af, at, W0, b0, W1, b1)
            dydt = np.concatenate([f, tr[:, None]], axis=1)
            a_y = np.concatenate([gz, np.zeros((n, 1))], axis=1)
            return (
                dydt,
                a_y,
                [fld._pullback(t, params[0], gW0, gb0), fld._pullback(t, params[1], gW1, gb1)],
            )
        eps = self.probe
        closed = exact and n_hidden == 1
        # forward, keeping what the backward pass needs
        hs, ss, dds, Ms, Ts = [z], [], [], [], [None]
        T = None
        for l in range(n_hidden):
            W, b = eff[l]
            pre = hs[-1] @ W
            pre += b
            h, s, dd = _act_np(fld.activation, pre, 2)
            hs.append(h)
            ss.append(s)
            dds.append(dd)
            if closed:
                continue
            if exact:
                M = W[None, :, :] if l == 0 else _mm3(T, W)
                T = M * s[:, None, :]
            else:
                M = eps @ W if l == 0 else T @ W
                T = M * s
            Ms.append(M)
            Ts.append(T)
        WL, bL = eff[-1]
        f = hs[-1] @ WL
        f += bL
        gW = [None] * len(eff)
        gb = [None] * len(eff)
        gW[-1] = hs[-1].T @ af
        gb[-1] = af.sum(axis=0)
        gh = af @ WL.T
        # the divergence at the output layer
        if n_hidden == 0:
            if exact:
                tr = np.full(n, np.trace(WL), dtype=y.dtype)
                gW[-1] = gW[-1] + at.sum() * np.eye(d, dtype=y.dtype)
            else:
                eW = eps @ WL
                tr = np.sum(eW * eps, axis=1)
                gW[-1] = gW[-1] + eps.T @ (at[:, None] * eps)
            dydt = np.concatenate([f, tr[:, None]], axis=1)
            a_y = np.concatenate([gh, np.zeros((n, 1), dtype=y.dtype)], axis=1)
            return dydt, a_y, [fld._pullback(t, params[-1], gW[-1], gb[-1])]
        if closed:
            W0 = eff[0][0]
            c = np.sum(W0 * WL.T, axis=0)
            s, dd = ss[0], dds[0]
            tr = s @ c
            gc = s.T @ at
            gW[-1] += gc[:, None] * W0.T
            gpre = gh * s + (at[:, None] * c) * dd
            gW[0] = hs[0].T @ gpre + gc[None, :] * WL.T
            gb[0] = gpre.sum(axis=0)
            gh = gpre @ W0.T
        else:
            T = Ts[-1]
            if exact:
                tr = np.einsum("nik,ki->n", T, WL)
                gW[-1] += np.einsum("n,nik->ki", at, T)
                gT = at[:, None, None] * WL.T[None, :, :]
            else:
                eWt = eps @ WL.T
                tr = np.sum(T * eWt, axis=1)
                gW[-1] += (T * at[:, None]).T @ eps
                gT = at[:, None] * eWt
            for l in range(n_hidden - 1, -1, -1):
                W = eff[l][0]
                s, dd, M = ss[l], dds[l], Ms[l]
                if exact:
                    gM = gT * s[:, None, :]
                    gs = np.sum(gT * M, axis=1)
                else:
                    gM = gT * s
                    gs = gT * M
                gpre = gh * s + gs * dd
                gWl = hs[l].T @ gpre
                if l == 0:
                    gWl += gM.sum(axis=0) if exact else eps.T @ gM
                else:
                    Tp = Ts[l]
                    if exact:
                        gWl += Tp.reshape(-1, Tp.shape[-1]).T @ gM.reshape(-1, gM.shape[-1])
                    else:
                        gWl += Tp.T @ gM
                    gT = _mm3(gM, W.T) if exact else gM @ W.T
                gW[l] = gWl
                gb[l] = gpre.sum(axis=0)
                gh = gpre @ W.T
        dydt = np.concatenate([f, tr[:, None]], axis=1)
        a_y = np.concatenate([gh, np.zeros((n, 1), dtype=y.dtype)], axis=1)
        a_params = [fld._pullback(t, p, gw, g) for p, gw, g in zip(params, gW, gb, strict=True)]
        return dydt, a_y, a_params
