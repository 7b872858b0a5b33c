"""The ``flowmath`` command: ``flowmath list`` and ``flowmath reproduce [NAME ...] [--quick]``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

__all__ = ["main"]


def _experiments():
    try:
        import experiments
    except ImportError as exc:  # pragma: no cover - only outside a source checkout
        raise SystemExit(
            "the experiments package is not importable; install flowmath from its source tree "
            f"(pip install -e .): {exc}"
        ) from exc
    return experiments


def _cmd_list(args) -> int:
    exps = _experiments()
    for name in exps.available():
        module = exps.load(name)
        doc = (module.__doc__ or "").strip().splitlines()
        print(f"{name:<28s} {doc[0] if doc else ''}")
    return 0


def _cmd_reproduce(args) -> int:
    from experiments._common import load_results, save_results

    exps = _experiments()
    names = args.names or exps.available()
    unknown = [n for n in names if n not in exps.available()]
    if unknown:
        print(f"unknown experiment(s): {', '.join(unknown)}; see `flowmath list`", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tex_dir = Path(args.tex_dir)
    failures = []
    for name in names:
        module = exps.load(name)
        config = module.Config.quick() if args.quick else module.Config()
        mode = (
            "re-plotting saved results"
            if args.replot
            else (f"running ({'quick' if args.quick else 'full'} settings)")
        )
        print(f"[{name}] {mode} ...", flush=True)
        start = time.perf_counter()
        try:
            if args.replot:
                results = load_results(out / f"{name}.json")
            else:
                results = module.run(config)
                save_results(results, config, out / f"{name}.json")
            module.plot(results, out / f"{name}.png")
            if hasattr(module, "tex"):
                tex_dir.mkdir(parents=True, exist_ok=True)
                (tex_dir / f"{name}.tex").write_text(module.tex(results))
        except Exception as exc:  # report, go on with the others, fail at the end
            failures.append(name)
            print(f"[{name}] FAILED: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            if args.raise_errors:
                raise
            continue
        print(
            f"[{name}] done in {time.perf_counter() - start:.1f} s -> {out / (name + '.png')}",
            flush=True,
        )
    if failures:
        print(f"failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="flowmath", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="list the experiments")
    p_list.set_defaults(func=_cmd_list)
    p_rep = sub.add_parser("reproduce", help="regenerate figures and generated tables")
    p_rep.add_argument("names", nargs="*", help="experiments to run (default: all)")
    p_rep.add_argument("--quick", action="store_true", help="quick settings (minutes on a laptop)")
    p_rep.add_argument(
        "--out", default="figures", help="figure and results folder (default: figures)"
    )
    p_rep.add_argument(
        "--tex-dir",
        default="paper/generated",
        help="folder for generated LaTeX (default: paper/generated)",
    )
    p_rep.add_argument(
        "--replot",
        action="store_true",
        help="redraw figures and tables from the results saved in --out (no recomputation)",
    )
    p_rep.add_argument(
        "--raise",
        dest="raise_errors",
        action="store_true",
        help="stop at the first failing experiment with its traceback",
    )
    p_rep.set_defaults(func=_cmd_reproduce)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
