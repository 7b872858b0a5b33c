"""The documentation site: its pages' examples run, its links point at existing files, and (slow)
it builds with Sphinx with warnings as errors."""

import doctest
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(
    p for p in DOCS.rglob("*.rst") if not {"_build", "_templates", "generated"} & set(p.parts)
)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_page_examples_run(page, tmp_path, monkeypatch):
    """Every ``>>>`` example of the page runs and prints what the page says."""
    monkeypatch.chdir(tmp_path)  # examples that write files write here
    result = doctest.testfile(
        str(page),
        module_relative=False,
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
        raise_on_error=False,
        report=True,
    )
    assert result.failed == 0, f"{result.failed} example(s) failed in {page.relative_to(ROOT)}"


def test_pages_name_existing_files():
    """Figures and documents the pages point at exist (``figure::``, ``image::``, ``include::``
    and ``:doc:`` targets)."""
    for page in PAGES:
        text = page.read_text()
        for target in re.findall(r"\.\. (?:figure|image|literalinclude)::\s*(\S+)", text):
            path = (DOCS / target.lstrip("/")) if target.startswith("/") else page.parent / target
            assert path.resolve().exists(), f"{page.name}: {target} does not exist"
        for target in re.findall(r":doc:`(?:[^`<]*<)?([^`>]+)>?`", text):
            base = DOCS if target.startswith("/") else page.parent
            path = (base / target.lstrip("/")).with_suffix(".rst")
            assert path.resolve().exists(), f"{page.name}: :doc:`{target}` does not exist"


@pytest.mark.slow
def test_sphinx_build_without_warnings(tmp_path):
    """``sphinx-build -W`` (warnings are errors) builds the site; needs the ``docs`` extra."""
    pytest.importorskip("sphinx", reason="pip install -e '.[docs]'")
    pytest.importorskip("numpydoc", reason="pip install -e '.[docs]'")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            str(DOCS),
            str(tmp_path / "html"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "html" / "index.html").exists()
    shutil.rmtree(tmp_path / "html")
