"""Layer benchmarks W5 (RealNVP, d = 784), W7 (Glow's 1x1 convolution) and a Glow step, against
their NumPy floor and plain torch on one and two threads.

Workloads (the benchmark table of the docs), float32, 2 BLAS threads for NumPy:

- **W5** RealNVP on d = 784: 8 affine couplings with alternating half masks, ``s`` and ``t``
  from one MLP 392 -> 512 -> 512 -> 784 (ReLU; ``s = a * tanh(raw)``), batch 256:
  (a) ``log_prob`` and the gradient of its mean with respect to every parameter;
  (b) sampling 256. Baselines: the same model in plain torch, and ``zuko.flows.RealNVP``
  (when installed; its masks and scale differ slightly, so it is context, not a twin).
- **W7** Glow's 1x1 convolution on 256 x 48 x 16 x 16: forward with log-det, LU-parametrised
  (log-det ``h w sum log|s|``) and plain (log-det ``h w slogdet(W)``), against the same two
  parametrisations in torch (``conv2d`` with a 1x1 kernel, as Glow ports do).
- **Glow step** on 256 x 12 x 16 x 16: ``ActNorm -> InvConv1x1 (LU) -> AffineCoupling("half")``
  with the conv conditioner 6 -> 64 (3x3) -> 64 (1x1) -> 12 (3x3): (a) forward with log-det;
  (b) the mean log-likelihood under N(0, I) and its gradient with respect to every parameter.

Every workload has a **floor** row: the minimal NumPy/BLAS calls that do the same arithmetic
(the matrix products, the im2col copies of a 3x3 convolution, the elementwise maps), with no
validation and no autograd; flowmath's time over it says how far the library is from what this
CPU does with NumPy. torch runs twice in the same alternation, with 1 and with 2 intra-op
threads (``torch.set_num_threads`` before each call).

Timing protocol (the machines are shared and noisy): one process, 32 MiB allocated and freed at
start, warm-up, then rounds that alternate the implementations (A B A B ...); the figure reported
is the median over rounds of the per-round ratio of flowmath to each other row (floor, torch
1 thread, torch 2 threads). Baselines are optional: a missing torch or zuko is skipped with a
message.

What was found making W5 BLAS-bound (all fixed in the library or worked around here):

- autograd's VJP of slicing (``x[:, :k]``) scatters with ``numpy.add.at``: ~30 ms per call on a
  256 x 784 batch, more than the layer's matrix products. Couplings split with ``anp.split``.
- indexing a boxed parameter tree costs, in the backward pass, a zeroed copy of the whole
  subtree plus an addition pass *per nesting level* (4 levels: ~20 % of W5's time);
  :func:`flowmath.nets.unpack` reduces the levels inside a coupling to one.
- autograd's VJP of ``np.dot`` returns the weight gradient as a transposed (Fortran-order)
  view; accumulating it is a strided pass (~3 ms per 512 x 784 matrix here). The MLP uses
  ``matmul``, whose VJP returns contiguous gradients (W5: 1.21x -> 1.11x torch).
- float64 creeping into a float32 backward: autograd's ``mean`` VJP divides by a NumPy int64,
  which under NumPy 2's promotion rules (NEP 50) makes a float32 cotangent float64; the loss
  here is ``sum * (1/n)``. With it, every cotangent and every product of the backward is float32
  (checked below, with a note if not).

Run: ``python -m experiments.bench_layers [--rounds N] [--only W5 W7 glow] [--threads N]
[--json PATH] [--list]`` (the command line of every benchmark, ``experiments/_timing.py``);
``FLOWMATH_BENCH_THREADS`` sets the default thread count.
"""

from __future__ import annotations

import math
import os

from experiments._timing import (
    alternate,
    bench_main,
    import_baselines,
    print_ratio_table,
    ratio_table,
    thread_env_defaults,
)

# 2 threads for every library (docs/benchmarks.rst); FLOWMATH_BENCH_THREADS overrides (on an
# oversubscribed machine 1 thread gives steadier figures). Effective only if numpy is not loaded.
THREADS = int(os.environ.get("FLOWMATH_BENCH_THREADS", "2"))
thread_env_defaults(THREADS)

import autograd  # noqa: E402
import autograd.numpy as anp  # noqa: E402
import numpy as np  # noqa: E402

import flowmath as fm  # noqa: E402

__all__ = [
    "WORKLOADS",
    "bench_convs",
    "bench_glow_step",
    "bench_w5",
    "bench_w7",
    "convs",
    "glow",
    "main",
    "w5",
    "w7",
]

NOTES: list[str] = []


def _note(msg: str) -> None:
    NOTES.append(msg)
    print(f"note: {msg}")


def _torch():
    def skip(exc):
        _note("torch is not installed: baselines skipped (pip install 'flowmath[bench]')")

    (torch,) = import_baselines("torch", threads=THREADS, on_missing=skip)
    return torch


def _alternate(fns: dict, rounds: int) -> dict:
    """Two warm-up calls, then one call per round, order mirrored on odd rounds (A B, B A)."""
    return alternate(fns, rounds, warmup=2, mirror=True)


def _torch_threads(torch, fn, fns: dict, name: str = "torch") -> None:
    """Add ``fn`` twice to ``fns``: ``<name>-1t`` and ``<name>-2t``, each setting torch's
    intra-op thread count before the call."""

    def with_threads(k):
        def run():
            torch.set_num_threads(k)
            return fn()

        return run

    fns[f"{name}-1t"] = with_threads(1)
    fns[f"{name}-2t"] = with_threads(2)


# -- W5 -------------------------------------------------------------------------------------------

D, HALF, HIDDEN, N_LAYERS, BATCH = 784, 392, (512, 512), 8, 256


def _flowmath_w5(x, rng):
    layers = [fm.AffineCoupling("half", HIDDEN, flip=bool(k % 2)) for k in range(N_LAYERS)]
    chain = fm.Chain(layers)
    flow = fm.Flow(chain)
    params = flow.init(rng, x)

    def loss(p):
        # the mean as sum * (1/n): autograd's VJP of anp.mean divides by a NumPy int64, which
        # under NumPy 2's promotion rules (NEP 50) turns a float32 cotangent into float64
        return anp.sum(flow.log_prob(p, x)) * (1.0 / x.shape[0])

    if flow.log_prob(params, x).dtype != np.float32:
        _note("flowmath W5 log-likelihood is not float32: the backward pass would be float64")
    value_and_grad = autograd.value_and_grad(loss)
    _, g = value_and_grad(params)
    bad = [leaf.dtype for leaf in fm._xp.leaves(g) if leaf.dtype != np.float32]
    if bad:
        _note(f"flowmath W5 gradient has non-float32 leaves: {set(bad)}")
    sample_rng = np.random.default_rng(1)
    return (
        lambda: value_and_grad(params),
        lambda: flow.sample(params, BATCH, sample_rng, dtype=np.float32),
        flow,
        params,
    )


def _torch_w5(torch, params, x):
    """The same model in plain torch, with flowmath's initial parameters."""
    nn = torch.nn

    class Coupling(nn.Module):
        def __init__(self, p, flip):
            super().__init__()
            self.flip = flip
            self.lins = nn.ModuleList()
            for q in p["net"]:
                lin = nn.Linear(*q["W"].shape)
                with torch.no_grad():
                    lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(q["W"].T)))
                    lin.bias.copy_(torch.from_numpy(q["b"]))
                self.lins.append(lin)
            self.a = nn.Parameter(torch.from_numpy(p["scale"].copy()))

        def _st(self, xa):
            h = xa
            for k, lin in enumerate(self.lins):
                h = lin(h)
                if k < len(self.lins) - 1:
                    h = torch.relu(h)
            raw, t = h.chunk(2, dim=1)
            return self.a * torch.tanh(raw), t

        def _split(self, x):
            a, b = x[:, :HALF], x[:, HALF:]
            return (b, a) if self.flip else (a, b)

        def _merge(self, xa, xb):
            return torch.cat([xb, xa] if self.flip else [xa, xb], dim=1)

        def forward(self, x):
            xa, xb = self._split(x)
            s, t = self._st(xa)
            return self._merge(xa, xb * torch.exp(s) + t), s.sum(dim=1)

        def inverse(self, y):
            ya, yb = self._split(y)
            s, t = self._st(ya)
            return self._merge(ya, (yb - t) * torch.exp(-s))

    model = nn.ModuleList([Coupling(p, bool(k % 2)) for k, p in enumerate(params)])
    xt = torch.from_numpy(x)
    const = 0.5 * D * math.log(2 * math.pi)

    def log_prob(v):
        ld = 0.0
        for layer in model:
            v, l_ = layer(v)
            ld = ld + l_
        return -0.5 * (v * v).sum(dim=1) - const + ld

    def grad_step():
        model.zero_grad(set_to_none=True)
        lp = log_prob(xt).mean()
        lp.backward()
        return lp

    gen = torch.Generator().manual_seed(1)

    def sample():
        with torch.no_grad():
            v = torch.randn(BATCH, D, generator=gen)
            for layer in reversed(model):
                v = layer.inverse(v)
        return v

    return grad_step, sample, log_prob


def _zuko_w5(torch):
    try:
        import zuko
    except ImportError:
        _note("zuko is not installed: W5 zuko baseline skipped")
        return None
    torch.manual_seed(0)
    flow = zuko.flows.RealNVP(D, transforms=N_LAYERS, hidden_features=HIDDEN)
    xt = torch.from_numpy(np.random.default_rng(0).normal(size=(BATCH, D)).astype(np.float32))

    def grad_step():
        flow.zero_grad(set_to_none=True)
        lp = flow().log_prob(xt).mean()
        lp.backward()

    def sample():
        with torch.no_grad():
            return flow().sample((BATCH,))

    return grad_step, sample


def _floor_w5(params, rng):
    """The matrix products of W5's forward and backward alone (plain NumPy, float32): the floor
    any implementation pays. Per coupling: 3 forward products, 3 weight gradients and the 2 or 3
    input gradients (none into the data for the first layer)."""
    Ws = [[q["W"] for q in p["net"]] for p in params]
    acts = [rng.normal(size=(BATCH, k)).astype(np.float32) for k in (HALF, 512, 512)]
    g_out = rng.normal(size=(BATCH, 2 * HALF)).astype(np.float32)

    def run():
        for k, (W0, W1, W2) in enumerate(Ws):
            a1 = acts[0] @ W0
            a2 = a1 @ W1
            a2 @ W2
            acts[2].T @ g_out
            g1 = g_out @ W2.T
            acts[1].T @ g1
            g0 = g1 @ W1.T
            acts[0].T @ g0
            if k > 0:
                g0 @ W0.T

    return run


def bench_w5(rounds: int = 7) -> dict:
    rng = np.random.default_rng(20261129)
    x = rng.normal(size=(BATCH, D)).astype(np.float32)
    fm_grad, fm_sample, flow, params = _flowmath_w5(x, rng)
    grads = {"flowmath": fm_grad, "floor": _floor_w5(params, rng)}
    samples = {"flowmath": fm_sample}
    torch = _torch()
    result = {}
    if torch is not None:
        t_grad, t_sample, t_logp = _torch_w5(torch, params, x)
        # the twin is a twin: same log-likelihood from the same parameters
        with torch.no_grad():
            ref = t_logp(torch.from_numpy(x)).numpy()
        err = float(np.max(np.abs(flow.log_prob(params, x) - ref)) / max(1.0, np.abs(ref).max()))
        result["loglik_rel_diff_vs_torch"] = err
        _torch_threads(torch, t_grad, grads)
        _torch_threads(torch, t_sample, samples)
        z = _zuko_w5(torch)
        if z is not None:
            grads["zuko-2t"], samples["zuko-2t"] = (
                lambda f=f: (torch.set_num_threads(2), f()) for f in z
            )
    result["grad"] = ratio_table(_alternate(grads, rounds))
    result["sample"] = ratio_table(_alternate(samples, rounds))
    return result


# -- W7 -------------------------------------------------------------------------------------------


def _floor_w7(p_lu, p_plain, x):
    """W7's arithmetic as plain NumPy: the weight from its LU factors (``c^3``, negligible) and
    one batched product ``W @ x[n]`` over the ``(n, c, h w)`` view of the contiguous batch; the
    log-det is ``h w sum(log_s)`` (LU) or ``h w slogdet(W)`` (plain)."""
    n, c, h, w = x.shape
    perm = np.rint(p_lu["perm"]).astype(np.intp)
    eye = np.eye(c, dtype=np.float32)
    xr = x.reshape(n, c, h * w)
    ones = np.ones(n, dtype=np.float32)

    def lu():
        s = p_lu["sign"] * np.exp(p_lu["log_s"])
        W = ((np.tril(p_lu["lower"], -1) + eye) @ (np.triu(p_lu["upper"], 1) + np.diag(s)))[perm]
        return np.matmul(W, xr).reshape(n, c, h, w), (h * w * p_lu["log_s"].sum()) * ones

    def slogdet():
        W = p_plain["weight"]
        return np.matmul(W, xr).reshape(n, c, h, w), (h * w * np.linalg.slogdet(W)[1]) * ones

    return lu, slogdet


def bench_w7(rounds: int = 15) -> dict:
    rng = np.random.default_rng(20261129)
    n, c, h, w = 256, 48, 16, 16
    x = rng.normal(size=(n, c, h, w)).astype(np.float32)
    lu, plain = fm.InvConv1x1(lu=True), fm.InvConv1x1(lu=False)
    p_lu, p_plain = lu.init(rng, x), plain.init(rng, x)
    floor_lu, floor_slogdet = _floor_w7(p_lu, p_plain, x)
    fns = {
        "flowmath-LU": lambda: lu.forward(p_lu, x),
        "floor-LU": floor_lu,
        "flowmath-slogdet": lambda: plain.forward(p_plain, x),
        "floor-slogdet": floor_slogdet,
    }
    y_fm, ld_fm = lu.forward(p_lu, x)
    y_fl, ld_fl = floor_lu()
    result = {"y_rel_diff_vs_floor": float(np.abs(y_fm - y_fl).max() / np.abs(y_fl).max())}
    if y_fm.dtype != np.float32 or ld_fm.dtype != np.float32:
        _note(f"flowmath W7 output is {y_fm.dtype} / log-det {ld_fm.dtype}, not float32")
    torch = _torch()
    if torch is not None:
        F = torch.nn.functional
        xt = torch.from_numpy(x)
        perm = torch.from_numpy(np.rint(p_lu["perm"]).astype(np.int64))
        sign = torch.from_numpy(p_lu["sign"])
        lower, upper = torch.from_numpy(p_lu["lower"]), torch.from_numpy(p_lu["upper"])
        log_s = torch.from_numpy(p_lu["log_s"])
        weight = torch.from_numpy(p_plain["weight"])
        eye = torch.eye(c)

        def torch_lu():
            with torch.no_grad():
                s = sign * torch.exp(log_s)
                W = ((torch.tril(lower, -1) + eye) @ (torch.triu(upper, 1) + torch.diag(s)))[perm]
                return F.conv2d(xt, W.view(c, c, 1, 1)), h * w * log_s.sum() * torch.ones(n)

        def torch_slogdet():
            with torch.no_grad():
                return (
                    F.conv2d(xt, weight.view(c, c, 1, 1)),
                    h * w * torch.linalg.slogdet(weight)[1] * torch.ones(n),
                )

        # the same maps: outputs agree to float32 rounding
        y_t, ld_t = torch_lu()
        y_t, ld_t = y_t.numpy(), ld_t.numpy()
        result["y_rel_diff_vs_torch"] = float(np.abs(y_fm - y_t).max() / np.abs(y_t).max())
        result["logdet_rel_diff_vs_torch"] = float(np.abs(ld_fm - ld_t).max() / abs(ld_t[0]))
        _torch_threads(torch, torch_lu, fns, "torch-LU")
        _torch_threads(torch, torch_slogdet, fns, "torch-slogdet")
    times = _alternate(fns, rounds)
    for key in ("LU", "slogdet"):
        rows = {
            "flowmath": times[f"flowmath-{key}"],
            "floor": times[f"floor-{key}"],
        }
        for k in ("1t", "2t"):
            if f"torch-{key}-{k}" in times:
                rows[f"torch-{k}"] = times[f"torch-{key}-{k}"]
        result[key] = ratio_table(rows)
    return result


# -- Glow step -----------------------------------------------------------------------------------

GLOW_SHAPE, GLOW_HIDDEN = (256, 12, 16, 16), (64, 64)


def _pad(a):
    """Zero-pad the two spatial axes by one: ``(c, n, h, w) -> (c, n, h + 2, w + 2)``."""
    c, n, h, w = a.shape
    out = np.zeros((c, n, h + 2, w + 2), a.dtype)
    out[:, :, 1:-1, 1:-1] = a
    return out


def _conv_cols(a, Wm):
    """3x3 convolution by im2col in the channel-major layout: ``a`` is ``(c, n, h, w)``, the
    nine shifted windows of the padded input are stacked as ``(9 c, n h w)`` rows and contracted
    with ``Wm`` ``(o, 9 c)`` in one GEMM. Returns ``(out (o, n h w), cols)``."""
    c, n, h, w = a.shape
    pad = _pad(a)
    cols = np.empty((9, c, n, h, w), a.dtype)
    for u in range(3):
        for t in range(3):
            cols[3 * u + t] = pad[:, :, u : u + h, t : t + w]
    cols = cols.reshape(9 * c, n * h * w)
    return Wm @ cols, cols


def _conv_cols_back(g, Wm, cols, shape):
    """Gradients of :func:`_conv_cols`: ``(gWm, ga (c, n, h, w))``."""
    c, n, h, w = shape
    gcols = (Wm.T @ g).reshape(9, c, n, h, w)
    gpad = np.zeros((c, n, h + 2, w + 2), g.dtype)
    for u in range(3):
        for t in range(3):
            gpad[:, :, u : u + h, t : t + w] += gcols[3 * u + t]
    return g @ cols.T, gpad[:, :, 1:-1, 1:-1]


def _conv_taps(a, Wt):
    """3x3 convolution by taps, for few output channels: one GEMM ``Wt (9 o, c)`` times the
    padded input ``(c, n (h+2) (w+2))``, then the nine shifted ``(o, n, h, w)`` windows of the
    product are summed. Returns ``(out (o, n, h, w), padded input)``."""
    c, n, h, w = a.shape
    o = Wt.shape[0] // 9
    pad = _pad(a)
    Z = (Wt @ pad.reshape(c, -1)).reshape(9, o, n, h + 2, w + 2)
    out = Z[0, :, :, :h, :w].copy()
    for k in range(1, 9):
        u, t = divmod(k, 3)
        out += Z[k, :, :, u : u + h, t : t + w]
    return out, pad


def _conv_taps_back(g, Wt, pad):
    """Gradients of :func:`_conv_taps`: ``(gWt, ga (c, n, h, w))``."""
    o, n, h, w = g.shape
    c = pad.shape[0]
    gZ = np.zeros((9, o, n, h + 2, w + 2), g.dtype)
    for k in range(9):
        u, t = divmod(k, 3)
        gZ[k, :, :, u : u + h, t : t + w] = g
    gZ = gZ.reshape(9 * o, -1)
    gpad = (Wt.T @ gZ).reshape(c, n, h + 2, w + 2)
    return gZ @ pad.reshape(c, -1).T, gpad[:, :, 1:-1, 1:-1]


def _floor_glow(params, x):
    """A Glow step's forward (and its mean-log-likelihood gradient) written out in plain NumPy,
    the fastest formulation found: the 1x1 convolution as one batched ``matmul`` over the
    ``(n, c, h w)`` view; the conditioner in the channel-major layout ``(channels, n h w)``, so
    that every convolution is one GEMM (the first 3x3 by im2col, the 1x1 directly, the last
    3x3, with few output channels, by taps); every elementwise map one pass; the backward pass
    by hand. No validation, no autograd: the floor flowmath is measured against."""
    an, ic, cp = params
    n, c, h, w = x.shape
    hw, ca = h * w, c // 2
    f32 = np.float32
    loc, ls = an["loc"], an["log_scale"]
    perm = np.rint(ic["perm"]).astype(np.intp)
    sign, lower, upper, log_s = ic["sign"], ic["lower"], ic["upper"], ic["log_s"]
    eye = np.eye(c, dtype=f32)
    (W1, b1), (W2, b2), (W3, b3) = ((q["W"], q["b"]) for q in cp["net"])
    o1, o2, o3 = W1.shape[0], W2.shape[0], W3.shape[0]
    amp = cp["scale"].reshape(1, ca, 1)
    const = f32(0.5 * c * hw * math.log(2 * math.pi))

    def run(grad):
        e = np.exp(ls)
        a0 = ((x - loc) * e).reshape(n, c, hw)
        s_ = sign * np.exp(log_s)
        L, U = np.tril(lower, -1) + eye, np.triu(upper, 1) + np.diag(s_)
        Wc = (L @ U)[perm]
        z = np.matmul(Wc, a0)
        za, zb = z[:, :ca], z[:, ca:]
        W1m = W1.transpose(0, 2, 3, 1).reshape(o1, 9 * ca)
        W2m = W2.reshape(o2, o1)
        W3t = W3.transpose(2, 3, 0, 1).reshape(9 * o3, o2)
        za_cm = np.ascontiguousarray(za.transpose(1, 0, 2)).reshape(ca, n, h, w)
        h1, cols1 = _conv_cols(za_cm, W1m)
        h1 += b1[:, None]
        np.maximum(h1, 0, out=h1)
        h2 = W2m @ h1
        h2 += b2[:, None]
        np.maximum(h2, 0, out=h2)
        out, pad3 = _conv_taps(h2.reshape(o2, n, h, w), W3t)
        out += b3[:, None, None, None]
        out = np.ascontiguousarray(out.reshape(o3, n, hw).transpose(1, 0, 2))
        th = np.tanh(out[:, :ca])
        s = amp * th
        es = np.exp(s)
        yb = zb * es + out[:, ca:]
        ld = hw * (ls.sum() + log_s.sum()) + s.sum(axis=(1, 2))
        y = np.concatenate([za, yb], axis=1)
        if not grad:
            return y.reshape(n, c, h, w), ld
        loss = np.mean(-0.5 * np.einsum("nij,nij->n", y, y) - const + ld)
        inv_n = f32(1.0 / n)
        gy = y * -inv_n
        gyb = gy[:, ca:]
        gs = gyb * zb * es + inv_n
        g_amp = np.sum(gs * th, axis=(0, 2))
        gout = np.concatenate([gs * amp * (1 - th * th), gyb], axis=1)
        gout_cm = np.ascontiguousarray(gout.transpose(1, 0, 2)).reshape(o3, n, h, w)
        gW3t, gh2 = _conv_taps_back(gout_cm, W3t, pad3)
        gh2 = gh2.reshape(o2, -1) * (h2 > 0)
        gW2 = gh2 @ h1.T
        gh1 = W2m.T @ gh2
        gh1 *= h1 > 0
        gW1, gza_cm = _conv_cols_back(gh1, W1m, cols1, (ca, n, h, w))
        gza = gza_cm.reshape(ca, n, hw).transpose(1, 0, 2) + gy[:, :ca]
        gz = np.concatenate([gza, gyb * es], axis=1)
        gWc = np.matmul(gz, a0.transpose(0, 2, 1)).sum(0)
        ga0 = np.matmul(Wc.T, gz)
        gLU = np.empty_like(gWc)
        gLU[perm] = gWc
        gUf = L.T @ gLU
        grads = [
            {
                "loc": (-e.ravel() * ga0.sum(axis=(0, 2))).reshape(loc.shape),
                "log_scale": ((ga0 * a0).sum(axis=(0, 2)) + hw).reshape(ls.shape),
            },
            {
                "lower": np.tril(gLU @ U.T, -1),
                "upper": np.triu(gUf, 1),
                "log_s": np.diag(gUf) * s_ + hw,
            },
            {
                "net": [
                    {"W": gW1.reshape(o1, 3, 3, ca).transpose(0, 3, 1, 2), "b": gh1.sum(1)},
                    {"W": gW2.reshape(o2, o1, 1, 1), "b": gh2.sum(1)},
                    {"W": gW3t.reshape(3, 3, o3, o2).transpose(2, 3, 0, 1), "b": gout.sum((0, 2))},
                ],
                "scale": g_amp.reshape(cp["scale"].shape),
            },
        ]
        return loss, grads

    return run


def _torch_glow(torch, params, x):
    """The same Glow step in plain torch (``conv2d``), with flowmath's parameters."""
    F = torch.nn.functional
    an, ic, cp = params
    n, c, h, w = x.shape
    hw, ca = h * w, c // 2

    def leaf(a):
        return torch.from_numpy(np.array(a, dtype=np.float32)).requires_grad_(True)

    loc, ls = leaf(an["loc"]), leaf(an["log_scale"])
    perm = torch.from_numpy(np.rint(ic["perm"]).astype(np.int64))
    sign = torch.from_numpy(np.array(ic["sign"], dtype=np.float32))
    lower, upper, log_s = leaf(ic["lower"]), leaf(ic["upper"]), leaf(ic["log_s"])
    net = [(leaf(q["W"]), leaf(q["b"])) for q in cp["net"]]
    amp = leaf(cp["scale"])
    leaves = [loc, ls, lower, upper, log_s, amp] + [t for pair in net for t in pair]
    eye = torch.eye(c)
    xt = torch.from_numpy(x)
    const = 0.5 * c * hw * math.log(2 * math.pi)

    def forward(v):
        v = (v - loc) * torch.exp(ls)
        W = (
            (torch.tril(lower, -1) + eye)
            @ (torch.triu(upper, 1) + torch.diag(sign * torch.exp(log_s)))
        )[perm]
        v = F.conv2d(v, W.view(c, c, 1, 1))
        va, vb = v[:, :ca], v[:, ca:]
        hh = va
        for k, (Wk, bk) in enumerate(net):
            hh = F.conv2d(hh, Wk, bk, padding=Wk.shape[-1] // 2)
            if k < len(net) - 1:
                hh = torch.relu(hh)
        raw, t = hh.chunk(2, dim=1)
        s = amp * torch.tanh(raw)
        ld = hw * (ls.sum() + log_s.sum()) + s.sum(dim=(1, 2, 3))
        return torch.cat([va, vb * torch.exp(s) + t], dim=1), ld

    def fwd():
        with torch.no_grad():
            return forward(xt)

    def grad_step():
        for t in leaves:
            t.grad = None
        y, ld = forward(xt)
        lp = (-0.5 * (y * y).sum(dim=(1, 2, 3)) - const + ld).mean()
        lp.backward()
        return lp

    return fwd, grad_step


def bench_glow_step(rounds: int = 7) -> dict:
    rng = np.random.default_rng(20261129)
    x = rng.normal(size=GLOW_SHAPE).astype(np.float32)
    step = fm.GlowStep(GLOW_HIDDEN)
    flow = fm.Flow(step)
    params = flow.init(rng, x)
    n = x.shape[0]

    def loss(p):
        return anp.sum(flow.log_prob(p, x)) * (1.0 / n)

    value_and_grad = autograd.value_and_grad(loss)
    floor = _floor_glow(params, x)
    result = {}
    # the floor does the same arithmetic: same log-likelihood and gradient to float32 rounding
    v_fm, g_fm = value_and_grad(params)
    v_fl, g_fl = floor(True)
    rel = []
    for path, ref in (
        ((0, "log_scale"), g_fl[0]["log_scale"]),
        ((1, "log_s"), g_fl[1]["log_s"]),
        ((2, "scale"), g_fl[2]["scale"]),
    ):
        got = g_fm[path[0]][path[1]]
        rel.append(float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30)))
    for k in range(3):
        for key in ("W", "b"):
            got, ref = g_fm[2]["net"][k][key], g_fl[2]["net"][k][key]
            rel.append(float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30)))
    result["loss_rel_diff_vs_floor"] = float(abs(v_fm - v_fl) / abs(v_fl))
    result["grad_max_rel_diff_vs_floor"] = max(rel)
    bad = {leaf.dtype for leaf in fm._xp.leaves(g_fm) if leaf.dtype != np.float32}
    if bad or np.asarray(v_fm).dtype != np.float32:
        _note(f"flowmath Glow-step loss/gradient not float32: {bad or np.asarray(v_fm).dtype}")
    fwd = {"flowmath": lambda: step.forward(params, x), "floor": lambda: floor(False)}
    grad = {"flowmath": lambda: value_and_grad(params), "floor": lambda: floor(True)}
    torch = _torch()
    if torch is not None:
        t_fwd, t_grad = _torch_glow(torch, params, x)
        with torch.no_grad():
            y_t, ld_t = t_fwd()
        y_f, ld_f = step.forward(params, x)
        result["y_rel_diff_vs_torch"] = float(np.abs(y_f - y_t.numpy()).max() / np.abs(y_f).max())
        result["logdet_rel_diff_vs_torch"] = float(
            np.abs(ld_f - ld_t.numpy()).max() / np.abs(ld_f).max()
        )
        _torch_threads(torch, t_fwd, fwd)
        _torch_threads(torch, t_grad, grad)
    result["forward"] = ratio_table(_alternate(fwd, rounds))
    result["grad"] = ratio_table(_alternate(grad, rounds))
    return result


# -- image layers: periodic and emerging convolutions, ActNorm -----------------------------------

CONV_SHAPE = (256, 12, 16, 16)


def _floor_periodic(weight, x):
    """PeriodicConv2d's forward and log-det as plain NumPy: the kernel scattered onto the
    periodic grid and transformed, the **real** FFT of the batch (half the spectrum), one
    batched ``(c, c)`` product per frequency, the inverse real FFT; the log-det from the
    ``slogdet`` of the half spectrum's matrices, the conjugate-symmetric half counted twice
    (``|det conj M| = |det M|``). No singularity check."""
    n, c, h, w = x.shape
    k = weight.shape[2]
    p = k // 2
    padded = np.zeros((c, c, h, w), weight.dtype)
    for a in range(k):
        for b in range(k):
            padded[:, :, (a - p) % h, (b - p) % w] += weight[:, :, a, b]
    nf = w // 2 + 1
    twice = np.full(nf, 2.0)
    twice[0] = 1.0
    if w % 2 == 0:
        twice[-1] = 1.0

    def run():
        mats = np.conj(np.fft.rfft2(padded)).transpose(2, 3, 0, 1)  # (h, nf, c, c)
        logdet = float((np.linalg.slogdet(mats)[1] * twice).sum())
        xhat = np.fft.rfft2(x).reshape(n, c, h * nf).transpose(2, 1, 0)  # (h nf, c, n)
        yhat = np.matmul(mats.reshape(h * nf, c, c), xhat)
        y = np.fft.irfft2(yhat.transpose(2, 1, 0).reshape(n, c, h, nf), s=(h, w))
        return y.astype(x.dtype, copy=False), np.full(n, logdet, dtype=x.dtype)

    return run


def _floor_emerging(params, x):
    """EmergingConv2d's forward as plain NumPy: in the channel-major layout, each masked
    ``3 x 3`` convolution one im2col GEMM plus the diagonal ``d x``, the order reversal between
    them a strided view; the log-det ``h w sum(log d1 + log d2)``."""
    from flowmath.kernels.emerging import ar_mask

    n, c, h, w = x.shape
    k = params["w1"].shape[2]
    mask = ar_mask(c, k, np.float32)
    Wms = [(params[f"w{i}"] * mask).transpose(0, 2, 3, 1).reshape(c, k * k * c) for i in (1, 2)]
    ds = [np.exp(params[f"log_d{i}"])[:, None] for i in (1, 2)]
    ld = np.full(n, h * w * float(params["log_d1"].sum() + params["log_d2"].sum()), x.dtype)

    def run():
        a = np.ascontiguousarray(x.transpose(1, 0, 2, 3))  # (c, n, h, w)
        y1 = _conv_cols(a, Wms[0])[0]
        y1 += ds[0] * a.reshape(c, -1)
        r = y1.reshape(c, n, h, w)[::-1, :, ::-1, ::-1]  # R: channels and pixels reversed
        y2 = _conv_cols(r, Wms[1])[0]
        y2 += ds[1] * r.reshape(c, -1)
        y = y2.reshape(c, n, h, w)[::-1, :, ::-1, ::-1].transpose(1, 0, 2, 3)
        return np.ascontiguousarray(y), ld

    return run


def _floor_actnorm(params, x):
    """ActNorm's forward as plain NumPy: ``(x - loc) e^{log_scale}`` in two passes, log-det
    ``h w sum(log_scale)``."""
    n, _, h, w = x.shape
    loc, e = params["loc"], np.exp(params["log_scale"])
    ld = np.full(n, h * w * float(params["log_scale"].sum()), x.dtype)

    def run():
        y = x - loc
        y *= e
        return y, ld

    return run


def _torch_convs(torch, pp, pe, pa, x):
    """torch twins: the periodic convolution through ``torch.fft`` (real FFT, per-frequency
    products, same log-det), the emerging one as two masked ``conv2d`` with flips, ActNorm."""
    F = torch.nn.functional
    from flowmath.kernels.emerging import ar_mask

    n, c, h, w = x.shape
    xt = torch.from_numpy(x)
    weight = torch.from_numpy(pp["weight"])
    k = pp["weight"].shape[2]
    p = k // 2
    nf = w // 2 + 1
    twice = torch.full((nf,), 2.0)
    twice[0] = 1.0
    if w % 2 == 0:
        twice[-1] = 1.0

    def periodic():
        with torch.no_grad():
            padded = torch.zeros(c, c, h, w)
            for a in range(k):
                for b in range(k):
                    padded[:, :, (a - p) % h, (b - p) % w] += weight[:, :, a, b]
            mats = torch.conj(torch.fft.rfft2(padded)).permute(2, 3, 0, 1)
            logdet = (torch.linalg.slogdet(mats)[1] * twice).sum()
            xhat = torch.fft.rfft2(xt).reshape(n, c, h * nf).permute(2, 1, 0)
            yhat = torch.matmul(mats.reshape(h * nf, c, c), xhat)
            y = torch.fft.irfft2(yhat.permute(2, 1, 0).reshape(n, c, h, nf), s=(h, w))
            return y, logdet * torch.ones(n)

    mask = torch.from_numpy(ar_mask(c, k, np.float32))
    w1, w2 = (torch.from_numpy(pe[f"w{i}"]) * mask for i in (1, 2))
    d1, d2 = (torch.exp(torch.from_numpy(pe[f"log_d{i}"])).view(1, c, 1, 1) for i in (1, 2))
    ld_e = h * w * float(pe["log_d1"].sum() + pe["log_d2"].sum())

    def emerging():
        with torch.no_grad():
            z = F.conv2d(xt, w1, padding=p) + d1 * xt
            r = torch.flip(z, dims=(1, 2, 3))
            y = torch.flip(F.conv2d(r, w2, padding=p) + d2 * r, dims=(1, 2, 3))
            return y, ld_e * torch.ones(n)

    loc, ls = torch.from_numpy(pa["loc"]), torch.from_numpy(pa["log_scale"])
    ld_a = h * w * float(pa["log_scale"].sum())

    def actnorm():
        with torch.no_grad():
            return (xt - loc) * torch.exp(ls), ld_a * torch.ones(n)

    return {"periodic": periodic, "emerging": emerging, "actnorm": actnorm}


def bench_convs(rounds: int = 7) -> dict:
    rng = np.random.default_rng(20261129)
    x = rng.normal(size=CONV_SHAPE).astype(np.float32)
    layers = {
        "periodic": fm.PeriodicConv2d(),
        "emerging": fm.EmergingConv2d(),
        "actnorm": fm.ActNorm(),
    }
    params = {name: layer.init(rng, x) for name, layer in layers.items()}
    floors = {
        "periodic": _floor_periodic(params["periodic"]["weight"], x),
        "emerging": _floor_emerging(params["emerging"], x),
        "actnorm": _floor_actnorm(params["actnorm"], x),
    }
    torch = _torch()
    twins = (
        _torch_convs(torch, params["periodic"], params["emerging"], params["actnorm"], x)
        if torch is not None
        else {}
    )
    fns, result = {}, {}
    for name, layer in layers.items():
        fns[f"flowmath-{name}"] = lambda layer=layer, p=params[name]: layer.forward(p, x)
        fns[f"floor-{name}"] = floors[name]
        # the floor and the torch twin compute the same map: outputs and log-dets agree
        y_fm, ld_fm = layer.forward(params[name], x)
        if y_fm.dtype != np.float32 or ld_fm.dtype != np.float32:
            _note(f"flowmath {name} output is {y_fm.dtype} / log-det {ld_fm.dtype}")
        y_fl, ld_fl = floors[name]()
        diffs = {
            "y_rel_diff_vs_floor": float(np.abs(y_fm - y_fl).max() / np.abs(y_fl).max()),
            "logdet_rel_diff_vs_floor": float(np.abs(ld_fm - ld_fl).max() / np.abs(ld_fl).max()),
        }
        if name in twins:
            y_t, ld_t = (t.numpy() for t in twins[name]())
            diffs["y_rel_diff_vs_torch"] = float(np.abs(y_fm - y_t).max() / np.abs(y_t).max())
            _torch_threads(torch, twins[name], fns, f"torch-{name}")
        result[name] = diffs
    times = _alternate(fns, rounds)
    for name in layers:
        rows = {"flowmath": times[f"flowmath-{name}"], "floor": times[f"floor-{name}"]}
        for k in ("1t", "2t"):
            if f"torch-{name}-{k}" in times:
                rows[f"torch-{k}"] = times[f"torch-{name}-{k}"]
        result[name]["forward"] = ratio_table(rows)
    return result


# -- driver ---------------------------------------------------------------------------------------


def w5(rounds: int = 7, threads: int = THREADS) -> dict:
    """W5: RealNVP d = 784, log_prob + gradient of its mean, and sampling (float32)."""
    out = bench_w5(rounds)
    print_ratio_table("W5 RealNVP d=784, log_prob + grad of mean (batch 256, float32)", out["grad"])
    print_ratio_table("W5 RealNVP d=784, sample 256 (float32)", out["sample"])
    if "loglik_rel_diff_vs_torch" in out:
        print(
            f"  log-likelihood flowmath vs torch twin: rel. diff "
            f"{out['loglik_rel_diff_vs_torch']:.2e}"
        )
    return out


def w7(rounds: int = 15, threads: int = THREADS) -> dict:
    """W7: Glow's 1x1 convolution on 256 x 48 x 16 x 16, forward + log-det (LU and slogdet)."""
    out = bench_w7(max(rounds, 15))
    for key in ("LU", "slogdet"):
        print_ratio_table(f"W7 1x1 conv 256x48x16x16 float32, forward + log-det ({key})", out[key])
    return out


def glow(rounds: int = 7, threads: int = THREADS) -> dict:
    """A Glow step on 256 x 12 x 16 x 16: forward + log-det, and loss + gradient (float32)."""
    out = bench_glow_step(rounds)
    print_ratio_table("Glow step 256x12x16x16 float32, forward + log-det", out["forward"])
    print_ratio_table("Glow step 256x12x16x16 float32, mean log-likelihood + gradient", out["grad"])
    print(
        "  vs floor: loss rel. diff {loss_rel_diff_vs_floor:.1e}, gradient max rel. diff "
        "{grad_max_rel_diff_vs_floor:.1e}".format(**out)
    )
    return out


def convs(rounds: int = 7, threads: int = THREADS) -> dict:
    """PeriodicConv2d, EmergingConv2d and ActNorm on 256 x 12 x 16 x 16: forward + log-det."""
    out = bench_convs(rounds)
    titles = {
        "periodic": "PeriodicConv2d 3x3",
        "emerging": "EmergingConv2d 3x3",
        "actnorm": "ActNorm",
    }
    for name, title in titles.items():
        print_ratio_table(f"{title} 256x12x16x16 float32, forward + log-det", out[name]["forward"])
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in out[name].items() if k != "forward")
        print(f"  {diffs}")
    return out


#: The workloads of this benchmark (``--only`` picks from these ids).
WORKLOADS = {"W5": w5, "W7": w7, "glow": glow, "convs": convs}


def main(argv=None) -> dict:
    """``python -m experiments.bench_layers [--rounds N] [--only W5 W7 glow] [--threads N]
    [--json PATH]``; the BLAS thread count of ``--threads`` is set with threadpoolctl (torch runs
    its 1- and 2-thread rows regardless)."""
    record = bench_main(argv, doc=__doc__, workloads=WORKLOADS, rounds=7, threads=THREADS)
    if record:
        record["notes"] = list(NOTES)  # printed as they arose
    return record


if __name__ == "__main__":
    main()
