"""W6: an i-ResNet block on d = 784 against plain torch in the same process.

Workload (docs/benchmarks.rst W6): ``g = W2 ELU(W1 x + b1) + b2``, hidden 1568, spectral norm with
``c = 0.9`` and one power iteration per call (state carried), log-det by 10 power-series terms
with one Gaussian probe, batch 256, float32.

* ``forward``: ``y = x + g(x)`` and the log-det estimate. flowmath: ``IResBlock.forward``
  (certified ``Lip(g) < 1`` check included; the certificate is cached by weight content, so a
  repeated call with unchanged weights costs a content comparison — the cold certificate is
  timed separately). torch: the i-ResNet reference recipe, ``torch.autograd.grad`` of ``g`` for
  each term ``v^T J^k``.
* ``inverse``: the fixed-point inverse to a relative 1e-6. Both stop on the same Banach error
  bound ``min(L^k/(1-L)||x1-x0||, L/(1-L)||x^k-x^{k-1}||) <= 1e-6 max(1, ||y_i||)`` with the
  same certified ``L``, so both run the same number of iterations. flowmath: ``IResBlock.invert``.

Each workload also has a **floor** row: the same arithmetic as plain NumPy calls, no validation
and no autograd (forward: one power iteration per weight, the two products of ``g``, ELU and
its slope, then per series term the two products of ``v^T J_g`` and the probe dot product;
inverse: the same number of iterations of ``x <- y - g(x)`` with the row norms of the stopping
rule).

Timing protocol: one process, ~32 MiB allocated and freed once, a warm-up, then flowmath, the
floor and torch with 1 and with 2 intra-op threads alternate (A B C D, D C B A, ...); the table
gives the medians and the median of the per-round ratios of flowmath to each row. Run
``python -m experiments.bench_residual [--rounds N] [--threads N] [--json PATH]`` (the command line
of every benchmark, ``experiments/_timing.py``). torch is optional: without it only
flowmath and the floor are timed.
"""

from __future__ import annotations

import numpy as np

import flowmath as fm
from experiments._timing import (
    alternate,
    bench_main,
    clock,
    import_baselines,
    print_ratio_table,
    ratio_table,
)
from experiments.bench_layers import _torch_threads
from flowmath.lipschitz import certified_spectral_norm

D, HIDDEN, BATCH, COEFF, N_TERMS, TOL = 784, 1568, 256, 0.9, 10, 1e-6


class TorchBlock:
    """Plain-torch i-ResNet block with the same weights and state as the flowmath one."""

    def __init__(self, torch, params, coeff):
        self.torch = torch
        t = lambda a: torch.from_numpy(np.array(a, dtype=np.float32))  # noqa: E731
        # torch's nn.Linear orientation: (fan_out, fan_in), the transpose of flowmath's W
        self.W = [t(layer["W"].T) for layer in params]
        self.b = [t(layer["b"]) for layer in params]
        self.u = [t(layer["u"]) for layer in params]
        self.coeff = coeff

    def weights(self):
        torch = self.torch
        out = []
        for W, u in zip(self.W, self.u, strict=True):
            with torch.no_grad():  # one power iteration; u, v are constants (Miyato et al.)
                v = torch.nn.functional.normalize(W.t() @ u, dim=0)
                u = torch.nn.functional.normalize(W @ v, dim=0)
            sigma = torch.dot(u, W @ v)
            out.append(W / torch.clamp(sigma / self.coeff, min=1.0))
        return out

    def g(self, x, Wn):
        F = self.torch.nn.functional
        return F.linear(F.elu(F.linear(x, Wn[0], self.b[0])), Wn[1], self.b[1])

    def forward(self, x, probe):
        torch = self.torch
        Wn = self.weights()
        x = x.detach().requires_grad_(True)
        gx = self.g(x, Wn)
        w, logdet = probe, torch.zeros(x.shape[0])
        for k in range(1, N_TERMS + 1):
            (w,) = torch.autograd.grad(gx, x, w, retain_graph=k < N_TERMS)
            logdet = logdet + (-1) ** (k + 1) / k * (w * probe).sum(1)
        return (x + gx).detach(), logdet.detach()

    def invert(self, y, L, tol):
        torch = self.torch
        with torch.no_grad():
            Wn = self.weights()
            thresh = tol * torch.clamp(y.norm(dim=1), min=1.0)
            x_prev, x = y, y - self.g(y, Wn)
            d0 = (x - x_prev).norm(dim=1)
            k = 1
            while True:
                bound = torch.minimum(L**k / (1 - L) * d0, L / (1 - L) * (x - x_prev).norm(dim=1))
                if bool((bound <= thresh).all()):
                    return x, k
                x_prev, x = x, y - self.g(x, Wn)
                k += 1


def _floor(params, coeff):
    """W6's arithmetic in plain NumPy (float32): ``(forward(x, probe), invert(y, L, n_iter))``."""
    Ws = [np.ascontiguousarray(layer["W"].T) for layer in params]  # (fan_out, fan_in)
    bs = [np.asarray(layer["b"]) for layer in params]
    us = [np.asarray(layer["u"]) for layer in params]

    def weights():
        out = []
        for W, u in zip(Ws, us, strict=True):
            v = W.T @ u
            v /= np.linalg.norm(v)
            u = W @ v
            u /= np.linalg.norm(u)
            out.append(W / max(1.0, float(u @ (W @ v)) / coeff))
        return out

    def g(x, Wn):
        a = x @ Wn[0].T
        a += bs[0]
        h = np.where(a > 0, a, np.expm1(np.minimum(a, 0)))
        out = h @ Wn[1].T
        out += bs[1]
        return out, a, h

    def forward(x, probe):
        Wn = weights()
        gx, a, h = g(x, Wn)
        slope = np.where(a > 0, 1.0, h + 1.0).astype(a.dtype)
        w, logdet = probe, np.zeros(x.shape[0], x.dtype)
        for k in range(1, N_TERMS + 1):
            w = ((w @ Wn[1]) * slope) @ Wn[0]
            logdet += (-1) ** (k + 1) / k * np.einsum("ij,ij->i", w, probe)
        return x + gx, logdet

    def invert(y, L, n_iter):
        Wn = weights()
        x_prev, x = y, y - g(y, Wn)[0]
        d0 = np.linalg.norm(x - x_prev, axis=1)
        for k in range(1, n_iter):
            np.minimum(L**k / (1 - L) * d0, L / (1 - L) * np.linalg.norm(x - x_prev, axis=1))
            x_prev, x = x, y - g(x, Wn)[0]
        return x

    return forward, invert


def w6(rounds: int = 5, threads: int = 2) -> dict:
    """W6: i-ResNet block d = 784, forward + 10-term log-det, and the fixed-point inverse."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, D)).astype(np.float32)
    block = fm.IResBlock(
        hidden=(HIDDEN,),
        coeff=COEFF,
        logdet="series",
        n_terms=N_TERMS,
        n_probes=1,
        spectral="power",
        n_power_iterations=1,
    )
    params = block.init(rng, x)
    t_cert, _ = clock(lambda: [certified_spectral_norm(layer["W"]) for layer in params])
    t_first, (y, _) = clock(lambda: block.forward(params, x, np.random.default_rng(1)))
    L = block.lipschitz_bound(params)
    _, info = block.invert(params, y, tol=TOL)
    print(f"W6: d={D}, hidden={HIDDEN}, batch={BATCH}, float32, c={COEFF}, {N_TERMS} terms")
    print(
        f"certified Lip(g) <= {L:.6f}; fixed-point iterations to 1e-6: {info.n_iter} "
        f"(max Banach bound {info.bound.max():.2e}, residual bound "
        f"{info.residual_bound.max():.2e})"
    )
    print(
        f"cold certificate of both weights (gram, float64): {1e3 * t_cert:.0f} ms; "
        f"first forward incl. certificate: {1e3 * t_first:.0f} ms"
    )

    def skip(exc):
        print("torch not installed: baseline skipped (pip install flowmath[bench])")

    (torch,) = import_baselines("torch", threads=threads, on_missing=skip)
    floor_fwd, floor_inv = _floor(params, COEFF)
    probe_np = np.random.default_rng(1).standard_normal((BATCH, D)).astype(np.float32)
    workloads = {
        "forward+logdet": {
            "flowmath": lambda: block.forward(params, x, np.random.default_rng(1)),
            "floor": lambda: floor_fwd(x, probe_np),
        },
        "inverse (fixed point)": {
            "flowmath": lambda: block.invert(params, y, tol=TOL),
            "floor": lambda: floor_inv(y, L, info.n_iter),
        },
    }
    if torch is not None:
        tb = TorchBlock(torch, params, COEFF)
        xt, yt = torch.from_numpy(x), torch.from_numpy(np.asarray(y))
        probe = torch.randn(BATCH, D, generator=torch.Generator().manual_seed(0))
        _, k_torch = tb.invert(yt, L, TOL)
        print(f"torch fixed-point iterations with the same stopping rule: {k_torch}")
        _torch_threads(torch, lambda: tb.forward(xt, probe), workloads["forward+logdet"])
        _torch_threads(torch, lambda: tb.invert(yt, L, TOL), workloads["inverse (fixed point)"])
    tables = {}
    for name, fns in workloads.items():
        # one warm-up call each, then rounds A B C D, D C B A, ...
        tables[name] = ratio_table(alternate(fns, rounds, mirror=True))
        print_ratio_table(f"W6 {name} (float32)", tables[name])
    print("(flowmath / row = median over alternating rounds; target <= 1.5 over the floor)")
    return tables


#: The workloads of this benchmark (``--only`` picks from these ids).
WORKLOADS = {"W6": w6}


def main(argv=None) -> dict:
    """``python -m experiments.bench_residual [--rounds N] [--threads N] [--json PATH]``: the
    shared command line of ``experiments/_timing.py``."""
    return bench_main(argv, doc=__doc__, workloads=WORKLOADS, rounds=5, threads=2)


if __name__ == "__main__":
    main()
