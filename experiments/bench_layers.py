"""Layer benchmarks W5 (RealNVP, d = 784) and W7 (Glow's 1x1 convolution) against plain torch.

Workloads (``/shared/BENCHMARKS.md``), float32, 2 threads for every library:

- **W5** RealNVP on d = 784: 8 affine couplings with alternating half masks, ``s`` and ``t``
  from one MLP 392 -> 512 -> 512 -> 784 (ReLU; ``s = a * tanh(raw)``), batch 256:
  (a) ``log_prob`` and the gradient of its mean with respect to every parameter;
  (b) sampling 256. Baselines: the same model in plain torch, and ``zuko.flows.RealNVP``
  (when installed; its masks and scale differ slightly, so it is context, not a twin).
- **W7** Glow's 1x1 convolution on 256 x 48 x 16 x 16: forward with log-det, LU-parametrised
  (log-det ``h w sum log|s|``) and plain (log-det ``h w slogdet(W)``), against the same two
  parametrisations in torch (``conv2d`` with a 1x1 kernel, as Glow ports do).

Timing protocol (the machines are shared and noisy): one process, 32 MiB allocated and freed at
start, warm-up, then rounds that alternate the implementations (A B A B ...); the figure reported
is the median over rounds of the per-round ratio flowmath / torch. Baselines are optional: a
missing torch or zuko is skipped with a message.

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

Run: ``python -m experiments.bench_layers [--rounds N] [--only W5|W7]``; set
``FLOWMATH_BENCH_THREADS=1`` to use one thread in every library.
"""

from __future__ import annotations

import argparse
import math
import os

from experiments._timing import (
    alternate,
    import_baselines,
    summary,
    thread_env_defaults,
    warm_allocator,
)

# 2 threads for every library (docs/benchmarks.rst); FLOWMATH_BENCH_THREADS overrides (on an
# oversubscribed machine 1 thread gives steadier figures). Effective only if numpy is not loaded.
THREADS = int(os.environ.get("FLOWMATH_BENCH_THREADS", "2"))
thread_env_defaults(THREADS)

import autograd  # noqa: E402
import autograd.numpy as anp  # noqa: E402
import numpy as np  # noqa: E402

import flowmath as fm  # noqa: E402

__all__ = ["bench_w5", "bench_w7", "main"]

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
    grads = {"flowmath": fm_grad, "matmul-floor": _floor_w5(params, rng)}
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
        grads["torch"], samples["torch"] = t_grad, t_sample
        z = _zuko_w5(torch)
        if z is not None:
            grads["zuko"], samples["zuko"] = z
    ref = "torch" if "torch" in grads else "flowmath"
    result["grad"] = summary(_alternate(grads, rounds), ref)
    result["sample"] = summary(_alternate(samples, rounds), ref)
    return result


# -- W7 -------------------------------------------------------------------------------------------


def bench_w7(rounds: int = 15) -> dict:
    rng = np.random.default_rng(20261129)
    n, c, h, w = 256, 48, 16, 16
    x = rng.normal(size=(n, c, h, w)).astype(np.float32)
    lu, plain = fm.InvConv1x1(lu=True), fm.InvConv1x1(lu=False)
    p_lu, p_plain = lu.init(rng, x), plain.init(rng, x)
    fns = {
        "flowmath-LU": lambda: lu.forward(p_lu, x),
        "flowmath-slogdet": lambda: plain.forward(p_plain, x),
    }
    torch = _torch()
    result = {}
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
        y_fm, ld_fm = lu.forward(p_lu, x)
        y_t, ld_t = torch_lu()
        y_t, ld_t = y_t.numpy(), ld_t.numpy()
        result["y_rel_diff_vs_torch"] = float(np.abs(y_fm - y_t).max() / np.abs(y_t).max())
        result["logdet_rel_diff_vs_torch"] = float(np.abs(ld_fm - ld_t).max() / abs(ld_t[0]))
        fns["torch-LU"], fns["torch-slogdet"] = torch_lu, torch_slogdet
    times = _alternate(fns, rounds)
    if torch is None:
        result["times"] = summary(times, "flowmath-LU")
        return result
    lu_sum = summary({k: times[k] for k in ("flowmath-LU", "torch-LU")}, "torch-LU")
    sl_sum = summary({k: times[k] for k in ("flowmath-slogdet", "torch-slogdet")}, "torch-slogdet")
    result["LU"], result["slogdet"] = lu_sum, sl_sum
    return result


# -- driver ---------------------------------------------------------------------------------------


def _print_table(title, rows):
    print(f"\n{title}")
    print(f"  {'implementation':<20s} {'median ms':>10s} {'ratio':>8s}")
    for name, stats in rows.items():
        ratio = next(v for k, v in stats.items() if k.startswith("ratio"))
        print(f"  {name:<20s} {stats['median_ms']:10.2f} {ratio:8.2f}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds per workload")
    parser.add_argument("--only", choices=["W5", "W7"], default=None)
    args = parser.parse_args(argv)
    warm_allocator()  # touch and free 32 MiB: a settled allocator for everyone
    out = {}
    if args.only in (None, "W5"):
        out["W5"] = bench_w5(args.rounds)
        _print_table(
            "W5 RealNVP d=784, log_prob + grad of mean (batch 256, float32); ratio to torch",
            out["W5"]["grad"],
        )
        _print_table("W5 RealNVP d=784, sample 256 (float32); ratio to torch", out["W5"]["sample"])
        if "loglik_rel_diff_vs_torch" in out["W5"]:
            print(
                f"  log-likelihood flowmath vs torch twin: rel. diff "
                f"{out['W5']['loglik_rel_diff_vs_torch']:.2e}"
            )
    if args.only in (None, "W7"):
        out["W7"] = bench_w7(max(args.rounds, 15))
        for key in ("LU", "slogdet", "times"):
            if key in out["W7"]:
                _print_table(
                    f"W7 1x1 conv 256x48x16x16 float32, forward + log-det ({key}); ratio to torch",
                    out["W7"][key],
                )
    out["notes"] = list(NOTES)
    return out


if __name__ == "__main__":
    main()
