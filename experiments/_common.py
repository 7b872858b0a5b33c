"""Shared plumbing for experiment modules: result files, figure style, generated LaTeX.

Every experiment module defines a frozen ``Config`` dataclass with a ``quick()`` classmethod, a
seeded ``run(config) -> dict``, ``plot(results, path)`` and optionally ``tex(results) -> str``.
``flowmath reproduce`` saves the results with the config, the settings (``"full"`` or
``"quick"``) and library versions, draws the figure into ``figures/NAME.png`` and writes
``paper/generated/NAME.tex`` (quick settings: ``figures/quick/`` and ``paper/generated/quick/``;
see :mod:`flowmath.cli`). A new experiment inherits all of this by following the protocol.
"""

from __future__ import annotations

import dataclasses
import json
import platform
from pathlib import Path

import numpy as np

__all__ = [
    "check_config",
    "config_dict",
    "fit_loglog_slope",
    "fit_slope",
    "load_results",
    "save_results",
    "setup_matplotlib",
    "stamp_quick",
    "tex_table",
    "versions",
]


def versions() -> dict:
    import autograd  # noqa: F401
    import numba
    import scipy

    import flowmath

    return {
        "flowmath": flowmath.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "numba": numba.__version__,
        "python": platform.python_version(),
    }


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    return obj


def config_dict(config) -> dict:
    """``config`` as it reads back from a results file (a dataclass as a dict; tuples as lists)."""
    raw = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
    return json.loads(json.dumps(_jsonable(raw)))


def save_results(results: dict, config, path: Path, settings: str | None = None) -> None:
    """Write ``results`` with the config, the settings name (``"full"``, ``"quick"``) and the
    versions that produced them as JSON."""
    payload = {
        "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config,
        "settings": settings,
        "versions": versions(),
        "results": results,
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(_jsonable(payload), indent=1))


def load_results(path: Path) -> dict:
    """The ``results`` saved by :func:`save_results` (JSON: tuples come back as lists)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no saved results at {path}: run the experiment first")
    return json.loads(path.read_text())["results"]


#: Config fields that say how runs are executed, not what is computed: ignored by check_config
EXECUTION_FIELDS = ("jobs", "scheduler", "cache_dir")


def check_config(path: Path, config, settings: str = "full") -> None:
    """Raise ``ValueError`` unless the results saved at ``path`` were made with ``config``.

    ``flowmath reproduce --replot`` calls this, so that a figure is never redrawn from results
    of other settings (quick results under a full-settings name, or a config edited since).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no saved results at {path}: run the experiment first")
    saved = json.loads(path.read_text())
    # how a sweep was executed (processes, cluster, cache) cannot change its numbers
    want = {k: v for k, v in config_dict(config).items() if k not in EXECUTION_FIELDS}
    have = saved.get("config")
    if have is not None:
        have = {k: v for k, v in have.items() if k not in EXECUTION_FIELDS}
    if have != want:
        keys = sorted(set(want) | set(have or {}))
        diff = ", ".join(
            f"{k}: saved {(have or {}).get(k)!r}, expected {want.get(k)!r}"
            for k in keys
            if (have or {}).get(k) != want.get(k)
        )
        raise ValueError(
            f"`{path}` holds results of another config than the experiment's {settings} "
            f"settings ({diff}); rerun without --replot, or replot with the matching --quick"
        )
    if saved.get("settings") not in (None, settings):
        raise ValueError(
            f"`{path}` holds {saved['settings']} results; expected {settings} settings"
        )


def stamp_quick(path: Path) -> None:
    """Write "QUICK SETTINGS" across the top-left corner of the PNG at ``path``, so that a
    quick figure never passes for a full one wherever it is copied."""
    from PIL import Image, ImageDraw

    with Image.open(path) as im:
        image = im.convert("RGB")
    draw = ImageDraw.Draw(image)
    text = "QUICK SETTINGS (Config.quick()): not the paper's figure"
    box = draw.textbbox((4, 4), text)
    draw.rectangle((box[0] - 3, box[1] - 3, box[2] + 3, box[3] + 3), fill=(255, 235, 205))
    draw.text((4, 4), text, fill=(180, 0, 0))
    image.save(path)


def setup_matplotlib():
    """Headless backend and a house style; returns ``matplotlib.pyplot``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "figure.dpi": 110,
            "savefig.dpi": 130,
            "savefig.bbox": "tight",
            "axes.grid": True,
            "grid.alpha": 0.3,
            "font.size": 9,
            "axes.titlesize": 10,
            "legend.fontsize": 8,
        }
    )
    return plt


def fit_slope(x, y):
    """Least-squares slope and intercept of ``y`` against ``x``."""
    slope, intercept = np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)
    return float(slope), float(intercept)


def fit_loglog_slope(x, y):
    """Slope of ``log y`` against ``log x`` (an empirical order or complexity exponent)."""
    return fit_slope(np.log(x), np.log(y))[0]


def tex_table(header, rows, caption: str, label: str, fmt: str = "{:.3g}") -> str:
    """A booktabs table; numbers formatted with ``fmt``, strings kept as they are."""

    def cell(v):
        if isinstance(v, str):
            return v
        if v is None:
            return "--"
        return fmt.format(v)

    cols = "l" + "r" * (len(header) - 1)
    lines = [
        "% generated by flowmath reproduce; do not edit by hand",
        "\\begin{table}[htbp]",
        "\\centering",
        f"\\caption{{{caption}}}",
        f"\\label{{{label}}}",
        # shrink to the text width when wider (graphicx's \\resizebox, \\width is the table's)
        "\\resizebox{\\ifdim\\width>\\linewidth\\linewidth\\else\\width\\fi}{!}{%",
        f"\\begin{{tabular}}{{{cols}}}",
        "\\toprule",
        " & ".join(header) + " \\\\",
        "\\midrule",
    ]
    lines += [" & ".join(cell(v) for v in row) + " \\\\" for row in rows]
    lines += ["\\bottomrule", "\\end{tabular}}", "\\end{table}", ""]
    return "\n".join(lines)
