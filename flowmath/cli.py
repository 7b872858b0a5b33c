"""The ``flowmath`` command: ``flowmath list``, ``flowmath reproduce [NAME ...] [--quick]`` and
``flowmath verify [--quick] [NAME ...]`` (:mod:`flowmath.verify`).

Where ``reproduce`` writes (paths relative to the working directory):

==========================  ==========================  ================================
command                     figures and results         generated LaTeX tables
==========================  ==========================  ================================
``reproduce``               ``figures/``                ``paper/generated/``
``reproduce --quick``       ``figures/quick/``          ``paper/generated/quick/``
``... --out DIR``           ``DIR``                     ``DIR`` (unless ``--tex-dir``)
==========================  ==========================  ================================

Quick settings therefore never overwrite the committed full-settings figures, results and tables
(``figures/quick/`` and ``paper/generated/quick/`` are git-ignored). ``--replot`` redraws from the
results saved in the figures folder and refuses results whose saved config is not the
experiment's ``Config()`` (or ``Config.quick()`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

__all__ = ["FULL_DIRS", "QUICK_DIRS", "main", "output_dirs"]


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


#: Default output folders, full and quick settings: (figures and results, generated tables).
FULL_DIRS = (Path("figures"), Path("paper/generated"))
QUICK_DIRS = (Path("figures/quick"), Path("paper/generated/quick"))


def output_dirs(quick: bool, out=None, tex_dir=None) -> tuple[Path, Path]:
    """The folders ``reproduce`` writes to: ``(figures and results, generated tables)``.

    Without ``out`` the defaults of the settings (:data:`FULL_DIRS`, :data:`QUICK_DIRS`); with
    ``out`` everything goes there, tables included, unless ``tex_dir`` names their folder.
    """
    default_out, default_tex = QUICK_DIRS if quick else FULL_DIRS
    if out is None:
        return default_out, Path(tex_dir) if tex_dir is not None else default_tex
    return Path(out), Path(tex_dir) if tex_dir is not None else Path(out)


#: command-line options that set a field of an experiment's Config, for the experiments whose
#: Config has it (bits_per_dim: the data set and the folder of user-downloaded data)
_CONFIG_OPTIONS = {"data": "datasets", "data_dir": "data_dir"}


def _override(config, name, args):
    """The config with the command line's data options; ``--jobs`` and ``--scheduler`` set how
    the sweeps execute (:func:`experiments._sweep.configure`), not what they compute."""
    import dataclasses

    if args.jobs is not None or args.scheduler is not None:
        from experiments import _sweep

        _sweep.configure(jobs=args.jobs, scheduler=args.scheduler)
    changes = {}
    for option, field in _CONFIG_OPTIONS.items():
        value = getattr(args, option, None)
        if value is None:
            continue
        if field not in {f.name for f in dataclasses.fields(config)}:
            flag = "--" + option.replace("_", "-")
            raise SystemExit(f"experiment {name!r} does not take {flag}")
        changes[field] = (value,) if field == "datasets" else value
    return dataclasses.replace(config, **changes) if changes else config


def _cmd_gpu_check(args) -> int:
    from .gpu import gpu_check

    return gpu_check(batch=args.batch)


def _cmd_reproduce(args) -> int:
    from experiments._common import check_config, load_results, save_results, stamp_quick

    exps = _experiments()
    names = args.names or exps.available()
    unknown = [n for n in names if n not in exps.available()]
    if unknown:
        print(f"unknown experiment(s): {', '.join(unknown)}; see `flowmath list`", file=sys.stderr)
        return 2
    out, tex_dir = output_dirs(args.quick, args.out, args.tex_dir)
    for folder, flag in ((out, "--out"), (tex_dir, "--tex-dir")):
        try:  # a file of that name, a read-only parent, ...: one line, not a traceback
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            print(
                f"flowmath reproduce: `{flag}` must be a folder that exists or can be created; "
                f"got {str(folder)!r} ({exc.strerror or exc})",
                file=sys.stderr,
            )
            return 2
    settings = "quick" if args.quick else "full"
    failures = []
    for name in names:
        module = exps.load(name)
        config = module.Config.quick() if args.quick else module.Config()
        config = _override(config, name, args)
        mode = "re-plotting saved results" if args.replot else f"running ({settings} settings)"
        print(f"[{name}] {mode} ...", flush=True)
        start = time.perf_counter()
        try:
            if args.replot:
                check_config(out / f"{name}.json", config, settings)
                results = load_results(out / f"{name}.json")
            else:
                results = module.run(config)
                save_results(results, config, out / f"{name}.json", settings=settings)
            module.plot(results, out / f"{name}.png")
            if args.quick:  # a quick figure never passes for the paper's either
                stamp_quick(out / f"{name}.png")
            if hasattr(module, "tex"):
                tex_dir.mkdir(parents=True, exist_ok=True)
                table = module.tex(results)
                if args.quick:  # a quick table never passes for the paper's
                    table = "% QUICK SETTINGS (Config.quick()): not the paper's numbers\n" + table
                (tex_dir / f"{name}.tex").write_text(table)
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
        "--out",
        default=None,
        help="folder for figures, results and (unless --tex-dir) tables "
        "(default: figures, or figures/quick with --quick)",
    )
    p_rep.add_argument(
        "--tex-dir",
        default=None,
        help="folder for generated LaTeX (default: --out if given, else paper/generated, "
        "or paper/generated/quick with --quick)",
    )
    p_rep.add_argument(
        "--replot",
        action="store_true",
        help="redraw figures and tables from the results saved in the figures folder (no "
        "recomputation); the saved config must be the experiment's (quick with --quick)",
    )
    p_rep.add_argument(
        "--raise",
        dest="raise_errors",
        action="store_true",
        help="stop at the first failing experiment with its traceback",
    )
    p_rep.add_argument(
        "--data",
        default=None,
        help="data set of a sweep experiment (bits_per_dim: digits, mnist5000, or mnist with "
        "--data-dir)",
    )
    p_rep.add_argument(
        "--data-dir", default=None, help="folder of user-downloaded data (MNIST IDX or .npz)"
    )
    p_rep.add_argument(
        "--jobs", type=int, default=None, help="parallel processes for a sweep's runs"
    )
    p_rep.add_argument(
        "--scheduler",
        default=None,
        help="address of a dask.distributed scheduler to run a sweep's runs on",
    )
    p_rep.set_defaults(func=_cmd_reproduce)
    p_gpu = sub.add_parser(
        "gpu-check", help="every layer on CuPy against NumPy: max differences, timings (GPU)"
    )
    p_gpu.add_argument("--batch", type=int, default=256, help="batch size (default: 256)")
    p_gpu.set_defaults(func=_cmd_gpu_check)
    # `flowmath verify ...` has its own parser (flowmath.verify.main); listed here for --help
    sub.add_parser("verify", help="check the theory's claims (flowmath verify --help)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["verify"]:
        from .verify import main as verify_main

        return verify_main(argv[1:])
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
