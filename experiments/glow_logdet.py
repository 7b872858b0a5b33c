"""Glow's 1x1 convolution: h*w*log|det W| and the LU sum against the dense Jacobian.

For a 1x1 convolution ``y_{:,i,j} = W x_{:,i,j}`` on a ``c x h x w`` image the Jacobian is
``W (x) I_{hw}`` (after ordering by channel), so

.. math:: \\log|\\det J| = h\\,w\\,\\log|\\det W| = h\\,w \\sum_i \\log|s_i|,
   \\qquad W = P L (U + \\operatorname{diag}(s)).

For each channel count ``c`` a Gaussian ``W`` (entries ``N(0, 1/c)``, not the tame orthogonal
init) is factored with partial pivoting; the plain layer (``InvConv1x1(lu=False)``, log-det by
``slogdet``) and the LU layer (``lu=True``, log-det by the sum) are evaluated, and both are
compared with ``slogdet`` of the dense ``(c h w) x (c h w)`` Jacobian, built column by column
by pushing the identity through the layer (exact for a linear map; cross-checked against
autograd's Jacobian at the smallest ``c``). float64 and float32. Then the costs: the log-det
alone (``O(c)`` against ``O(c^3)``), forward with log-det, and inverse, LU against plain; and
the W7 workload of docs/benchmarks.rst (256 x 48 x 16 x 16, float32, forward with log-det) against
plain torch when torch is installed, timed in alternation (A B A B), median of ratios, once
with 2 threads for both libraries (as docs/benchmarks.rst asks) and once in a child process with
single-threaded BLAS and torch (``Config.blas_threads``), where the sweep over ``c`` runs too:
on a shared, oversubscribed machine multi-threaded BLAS timings are mostly scheduler noise.

References
----------
Kingma, D. P., Dhariwal, P. (2018). Glow: Generative flow with invertible 1x1 convolutions.
NeurIPS 2018. arXiv:1807.03039.
"""

from __future__ import annotations

import dataclasses
import statistics

import numpy as np

import flowmath as fm
from experiments._common import fit_loglog_slope, setup_matplotlib, tex_table
from experiments._timing import (
    alternate,
    import_baselines,
    in_child_process,
    median_ms,
    median_ratio,
    warm_allocator,
)
from flowmath.layers.base import cast_tree

__all__ = ["Config", "plot", "run", "tex"]


@dataclasses.dataclass(frozen=True)
class Config:
    channels: tuple = (2, 4, 8, 16, 32, 64, 128)
    hw: tuple = (4, 4)
    timing_channels: tuple = (16, 32, 64, 128, 256, 512)
    timing_batch: int = 16
    timing_hw: tuple = (16, 16)
    repeats: int = 15
    w7: bool = True
    w7_repeats: int = 21
    blas_threads: int | None = 1
    seed: int = 0

    @classmethod
    def quick(cls) -> Config:
        return cls(
            channels=(2, 4, 8, 16, 32, 64),
            timing_channels=(16, 32, 64, 128, 256),
            repeats=7,
            w7_repeats=11,
        )


def _dense_logdet(layer, params, c, h, w):
    """slogdet of the dense Jacobian, built by pushing the identity through the (linear) map."""
    dim = c * h * w
    basis = np.eye(dim).reshape(dim, c, h, w)
    jac = np.asarray(layer.forward(params, basis)[0]).reshape(dim, dim).T
    sign, logabs = np.linalg.slogdet(jac)
    return float(logabs), jac


def _rel(a, ref):
    return float(abs(float(a) - ref) / max(1.0, abs(ref)))


def _w7(config, threads=2):
    """docs/benchmarks.rst W7: 1x1 conv on 256 x 48 x 16 x 16 float32, forward with log-det; torch
    gets ``threads`` threads (docs/benchmarks.rst: 2 for every library)."""
    rng = np.random.default_rng(config.seed + 7)
    n, c, h, w = 256, 48, 16, 16
    x = rng.normal(size=(n, c, h, w)).astype(np.float32)
    lu_layer, full_layer = fm.InvConv1x1(lu=True), fm.InvConv1x1(lu=False)
    params = lu_layer.init(rng, x)
    full_params = {"weight": np.asarray(lu_layer.weight(params), dtype=np.float32)}
    fns = {
        "flowmath LU": lambda: lu_layer.forward(params, x),
        "flowmath plain": lambda: full_layer.forward(full_params, x),
    }
    (torch,) = import_baselines("torch", threads=threads)
    out = {"shape": [n, c, h, w], "torch": torch is not None, "threads": threads}
    if torch is not None:
        xt = torch.from_numpy(x)
        perm = torch.from_numpy(np.rint(params["perm"]).astype(np.int64))
        lower, upper = torch.from_numpy(params["lower"]), torch.from_numpy(params["upper"])
        log_s, sign = torch.from_numpy(params["log_s"]), torch.from_numpy(params["sign"])
        eye = torch.eye(c)
        wt = torch.from_numpy(full_params["weight"])

        def torch_lu():  # Glow's LU forward: rebuild W, 1x1 conv, h*w*sum(log|s|)
            with torch.no_grad():
                weight = (
                    (torch.tril(lower, -1) + eye)
                    @ (torch.triu(upper, 1) + torch.diag(sign * torch.exp(log_s)))
                )[perm]
                y = torch.nn.functional.conv2d(xt, weight[:, :, None, None])
                return y, h * w * log_s.sum() * torch.ones(n)

        def torch_plain():
            with torch.no_grad():
                y = torch.nn.functional.conv2d(xt, wt[:, :, None, None])
                return y, h * w * torch.linalg.slogdet(wt)[1] * torch.ones(n)

        y_t = torch_lu()[0].numpy()
        out["max_abs_diff_vs_torch"] = float(np.abs(y_t - lu_layer.forward(params, x)[0]).max())
        fns["torch LU"] = torch_lu
        fns["torch plain"] = torch_plain
    warm_allocator()  # allocate and free ~32 MiB once (docs/benchmarks.rst)
    times = alternate(fns, config.w7_repeats, min_time=1e-2)
    out["median_ms"] = {k: median_ms(s) for k, s in times.items()}
    if torch is not None:
        out["ratio_lu"] = median_ratio(times["flowmath LU"], times["torch LU"])
        out["ratio_plain"] = median_ratio(times["flowmath plain"], times["torch plain"])
    return out


def run(config: Config) -> dict:
    rng = np.random.default_rng(config.seed)
    h, w = config.hw
    lu_layer, full_layer = fm.InvConv1x1(lu=True), fm.InvConv1x1(lu=False)
    accuracy = []
    autograd_check = None
    for c in config.channels:
        weight = rng.normal(size=(c, c)) / np.sqrt(c)
        lu_params = fm.InvConv1x1.lu_parameters(weight)
        full_params = {"weight": weight}
        x = rng.normal(size=(1, c, h, w))
        ref, jac = _dense_logdet(full_layer, full_params, c, h, w)
        row = {
            "c": c,
            "dense_slogdet": ref,
            "cond_W": float(np.linalg.cond(weight)),
            "lu_weight_error": float(np.abs(lu_layer.weight(lu_params) - weight).max()),
        }
        for dtype, tag in ((np.float64, "64"), (np.float32, "32")):
            xd = x.astype(dtype)
            ld_full = full_layer.forward(cast_tree(full_params, dtype), xd)[1][0]
            ld_lu = lu_layer.forward(cast_tree(lu_params, dtype), xd)[1][0]
            row[f"err_plain_{tag}"] = _rel(ld_full, ref)
            row[f"err_lu_{tag}"] = _rel(ld_lu, ref)
        if autograd_check is None:

            def fwd(v, p=full_params):
                return full_layer.forward(p, v)[0]

            jac_ad = fm.testing.dense_jacobian(fwd, x)[0]
            autograd_check = {"c": c, "max_abs_diff": float(np.abs(jac_ad - jac).max())}
        accuracy.append(row)

    results = {
        "accuracy": accuracy,
        "autograd_check": autograd_check,
        "eps64": float(np.finfo(np.float64).eps),
        "eps32": float(np.finfo(np.float32).eps),
        "w7": _w7(config, threads=2) if config.w7 else None,
        "blas_threads_timing": config.blas_threads,
    }
    results.update(in_child_process(_timing, config, config.blas_threads))
    return results


def _timing(config: Config) -> dict:
    """Plain against LU costs over ``c`` (and W7 with one torch thread when BLAS has one)."""
    rng = np.random.default_rng(config.seed + 1)
    lu_layer, full_layer = fm.InvConv1x1(lu=True), fm.InvConv1x1(lu=False)
    timing = []
    n, (th, tw) = config.timing_batch, config.timing_hw
    for c in config.timing_channels:
        weight = rng.normal(size=(c, c)) / np.sqrt(c)
        lu_params, full_params = fm.InvConv1x1.lu_parameters(weight), {"weight": weight}
        x = rng.normal(size=(n, c, th, tw))
        y = full_layer.forward(full_params, x)[0]
        fns = [
            lambda: lu_layer._logdet(lu_params, x),  # noqa: B023 - timed at once
            lambda: full_layer._logdet(full_params, x),  # noqa: B023
            lambda: lu_layer.forward(lu_params, x),  # noqa: B023
            lambda: full_layer.forward(full_params, x),  # noqa: B023
            lambda: lu_layer.inverse(lu_params, y),  # noqa: B023
            lambda: full_layer.inverse(full_params, y),  # noqa: B023
        ]
        times = alternate(dict(enumerate(fns)), config.repeats, min_time=2e-3)
        med = [statistics.median(v) for v in times.values()]
        timing.append(
            {
                "c": c,
                "logdet_lu": med[0],
                "logdet_plain": med[1],
                "forward_lu": med[2],
                "forward_plain": med[3],
                "inverse_lu": med[4],
                "inverse_plain": med[5],
            }
        )
    cs = [t["c"] for t in timing]
    upper = cs[len(cs) // 2 :]
    slopes = {
        key: fit_loglog_slope(upper, [t[key] for t in timing if t["c"] in upper])
        for key in ("logdet_lu", "logdet_plain", "inverse_lu", "inverse_plain")
    }
    out = {"timing": timing, "timing_slopes_upper_half": slopes}
    if config.w7 and config.blas_threads is not None:
        out["w7_same_threads"] = _w7(config, threads=config.blas_threads)
    return out


def plot(results: dict, path) -> None:
    plt = setup_matplotlib()
    fig, axes = plt.subplots(1, 3, figsize=(12.5, 3.6))
    acc = results["accuracy"]
    cs = [r["c"] for r in acc]
    ax = axes[0]
    floor = 1e-18
    for key, label, style in (
        ("err_plain_64", "h w slogdet(W), float64", "o-"),
        ("err_lu_64", "h w sum log|s|, float64", "s-"),
        ("err_plain_32", "h w slogdet(W), float32", "o--"),
        ("err_lu_32", "h w sum log|s|, float32", "s--"),
    ):
        ax.semilogy(cs, [max(r[key], floor) for r in acc], style, label=label)
    ax.axhline(results["eps64"], color="gray", lw=0.8, ls=":")
    ax.axhline(results["eps32"], color="gray", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.text(cs[0], results["eps64"] * 1.5, "float64 eps", fontsize=7, color="gray")
    ax.text(cs[0], results["eps32"] * 1.5, "float32 eps", fontsize=7, color="gray")
    ax.set_xlabel("channels c")
    ax.set_ylabel("relative error vs slogdet(dense J)")
    ax.set_title("1x1 conv log-det vs dense Jacobian (4x4 image)")
    ax.legend()
    tim = results["timing"]
    tc = [t["c"] for t in tim]
    ax = axes[1]
    ax.loglog(tc, [t["logdet_lu"] * 1e6 for t in tim], "s-", label="LU: h w sum log|s|", base=2)
    ax.loglog(
        tc, [t["logdet_plain"] * 1e6 for t in tim], "o-", label="plain: h w slogdet(W)", base=2
    )
    ref = np.asarray(tc, float)
    ax.loglog(
        tc,
        tim[-1]["logdet_plain"] * 1e6 * (ref / ref[-1]) ** 3,
        "k:",
        lw=0.8,
        label="slope 3",
        base=2,
    )
    sl = results["timing_slopes_upper_half"]
    ax.set_title(
        f"log-det cost; slope over upper half of c:\nLU {sl['logdet_lu']:.2f} "
        f"(flat: call overhead), plain {sl['logdet_plain']:.2f}"
    )
    ax.set_xlabel("channels c")
    ax.set_ylabel("time per call [us]")
    ax.legend()
    ax = axes[2]
    for key, label, style in (
        ("forward_lu", "forward LU", "s-"),
        ("forward_plain", "forward plain", "o-"),
        ("inverse_lu", "inverse LU", "s--"),
        ("inverse_plain", "inverse plain", "o--"),
    ):
        ax.loglog(tc, [t[key] * 1e3 for t in tim], style, label=label, base=2)
    ax.set_title("forward (with log-det) and inverse, LU vs plain")
    lines = []
    for key in ("w7", "w7_same_threads"):
        w7 = results.get(key)
        if w7 and "ratio_lu" in w7:
            lines.append(
                f"{w7['threads']} thread(s): LU {w7['ratio_lu']:.2f}x, "
                f"plain {w7['ratio_plain']:.2f}x"
            )
    if lines:
        fig.text(
            0.5,
            -0.02,
            "W7 (256x48x16x16 float32, forward with log-det), time flowmath / "
            "torch, median of alternated ratios: " + "; ".join(lines),
            ha="center",
        )
    ax.set_xlabel("channels c (batch 16, 16x16)")
    ax.set_ylabel("time per call [ms]")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def tex(results: dict) -> str:
    rows = []
    by_c = {t["c"]: t for t in results["timing"]}
    for r in results["accuracy"]:
        t = by_c.get(r["c"])
        rows.append(
            [
                str(r["c"]),
                r["err_plain_64"],
                r["err_lu_64"],
                r["err_plain_32"],
                r["err_lu_32"],
                None if t is None else t["logdet_plain"] * 1e6,
                None if t is None else t["logdet_lu"] * 1e6,
            ]
        )
    for c, t in by_c.items():
        if c not in {r["c"] for r in results["accuracy"]}:
            rows.append(
                [str(c), None, None, None, None, t["logdet_plain"] * 1e6, t["logdet_lu"] * 1e6]
            )
    caption = (
        "Log-determinant of a 1x1 convolution on a $4\\times 4$ image: relative error of "
        "$hw\\log|\\det W|$ (plain) and $hw\\sum_i\\log|s_i|$ (LU) against slogdet of the "
        "dense Jacobian, and the cost of each log-det in microseconds."
    )
    for key in ("w7", "w7_same_threads"):
        w7 = results.get(key)
        if w7 and "ratio_lu" in w7:
            caption += (
                f" W7 (256x48x16x16, float32, forward with log-det, {w7['threads']} "
                f"thread(s)): flowmath/torch {w7['ratio_lu']:.2f} (LU), "
                f"{w7['ratio_plain']:.2f} (plain)."
            )
    return tex_table(
        ["$c$", "plain f64", "LU f64", "plain f32", "LU f32", "plain [us]", "LU [us]"],
        rows,
        caption,
        "tab:glow-logdet",
        fmt="{:.2g}",
    )
