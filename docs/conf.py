"""Sphinx configuration of the flowmath documentation (``sphinx-build -W -b html docs DIR``)."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MPLBACKEND", "Agg")

import flowmath  # noqa: E402

project = "flowmath"
author = "flowmath developers"
copyright = "2026, flowmath developers"
release = flowmath.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
]

autosummary_generate = True
autosummary_imported_members = False
# members defined in each module, not those a package re-exports (documented once, where defined)
autodoc_default_options = {"members": True, "show-inheritance": True, "ignore-module-all": True}
autodoc_member_order = "bysource"
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
html_theme = "alabaster"
html_static_path = []
html_title = f"flowmath {release}"


def _escape(text: str) -> str:
    """Docstring prose as reST paragraph text: ``|`` would start a substitution."""
    return text.replace("|", "\\|")


def _write_gallery() -> None:
    """``generated/gallery_figures.inc``: every experiment's committed figure under its title
    (the module docstring's first line) and its first paragraph, so that a new experiment
    appears in the gallery the moment its figure is committed."""
    import experiments

    lines = []
    for name in experiments.available():
        png = ROOT / "figures" / f"{name}.png"
        if not png.exists():
            continue
        doc = (experiments.load(name).__doc__ or name).strip()
        paragraphs = doc.split("\n\n")
        title = _escape(paragraphs[0].replace("\n", " ").strip())
        body = _escape(paragraphs[1].replace("\n", " ").strip()) if len(paragraphs) > 1 else ""
        lines += [
            f".. _gallery-{name}:",
            "",
            f"``{name}``",
            "-" * (len(name) + 4),
            "",
            f".. figure:: /../figures/{name}.png",
            "   :width: 100%",
            "",
            f"   {title}",
            "",
        ]
        if body:
            lines += [f"   {body}", ""]
        lines += [
            f"Regenerate: ``flowmath reproduce {name}`` (quick: add ``--quick``); saved results:",
            f"``figures/{name}.json``.",
            "",
        ]
    out = Path(__file__).parent / "generated" / "gallery_figures.inc"
    out.parent.mkdir(exist_ok=True)
    text = "\n".join(lines)
    if not out.exists() or out.read_text() != text:
        out.write_text(text)


def _write_numpy_only() -> None:
    """``generated/numpy_only.inc``: the table of :data:`flowmath.gpu.NUMPY_ONLY`."""
    from flowmath import gpu

    rows = [".. list-table::", "   :header-rows: 1", "", "   * - path", "     - NumPy-only at"]
    for name in [c.name for c in gpu.CASES] + list(gpu.ESTIMATORS):
        reason = gpu.NUMPY_ONLY.get(name, "runs on the strict namespace")
        rows += [f"   * - ``{name}``", f"     - {reason}"]
    out = Path(__file__).parent / "generated" / "numpy_only.inc"
    out.parent.mkdir(exist_ok=True)
    text = "\n".join(rows) + "\n"
    if not out.exists() or out.read_text() != text:
        out.write_text(text)


_write_gallery()
_write_numpy_only()
