"""The paper (paper/main.tex) includes only files that exist, cites only papers in its
bibliography and lists no paper it does not cite; (slow) `make -C paper` builds it where LaTeX is
installed."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

import experiments

ROOT = Path(__file__).parents[1]
PAPER = ROOT / "paper"
TEX = (PAPER / "main.tex").read_text()
# the body without comment lines (a commented-out \input is not an include)
BODY = "\n".join(line for line in TEX.splitlines() if not line.lstrip().startswith("%"))


def _bib_keys():
    return set(re.findall(r"@\w+\{([^,\s]+),", (PAPER / "references.bib").read_text()))


def test_every_included_file_exists():
    figures = re.findall(r"\\fig\{([^}]+)\}", BODY)
    tables = re.findall(r"\\generated\{([^}]+)\}", BODY)
    assert figures and tables
    for name in figures:
        assert (ROOT / "figures" / f"{name}.png").exists(), f"\\fig{{{name}}}: figures/{name}.png"
    for name in tables:
        assert (PAPER / "generated" / f"{name}.tex").exists(), f"\\generated{{{name}}}"
    for target in re.findall(r"\\(?:input|include)\{([^}#]+)\}", BODY):
        path = PAPER / target
        assert path.exists() or path.with_suffix(".tex").exists(), f"\\input{{{target}}}"
    for target in re.findall(r"\\includegraphics(?:\[[^]]*\])?\{([^}#]+)\}", BODY):
        assert (ROOT / "figures" / target).exists(), f"\\includegraphics{{{target}}}"
    for target in re.findall(r"\\bibliography\{([^}]+)\}", BODY):
        assert (PAPER / f"{target}.bib").exists(), f"\\bibliography{{{target}}}"
    assert (PAPER / "Makefile").exists()


def test_every_experiment_with_a_table_has_its_table_in_the_paper():
    for name in experiments.available():
        if f"\\fig{{{name}}}" in BODY and hasattr(experiments.load(name), "tex"):
            assert f"\\generated{{{name}}}" in BODY, (
                f"the paper shows {name}'s figure, not its table"
            )


def test_citations_and_bibliography_match():
    cited = set()
    for group in re.findall(r"\\cite[pt]?\*?(?:\[[^]]*\])*\{([^}]+)\}", BODY):
        cited |= {key.strip() for key in group.split(",")}
    keys = _bib_keys()
    assert cited, "the paper cites nothing"
    assert not cited - keys, f"cited but not in references.bib: {sorted(cited - keys)}"
    assert not keys - cited, f"in references.bib but never cited: {sorted(keys - cited)}"


def test_bibliography_entries_name_their_source():
    """Every entry has a year and an arXiv identifier, a journal or a publisher."""
    text = (PAPER / "references.bib").read_text()
    for entry in re.split(r"\n@", text)[1:]:
        key = entry.split("{", 1)[1].split(",", 1)[0]
        assert re.search(r"year\s*=", entry), f"{key}: no year"
        assert re.search(r"arXiv:\d{4}\.\d{4,5}|journal\s*=|publisher\s*=|booktitle", entry), key


@pytest.mark.slow
def test_make_builds_the_paper(tmp_path):
    if shutil.which("pdflatex") is None or shutil.which("bibtex") is None:
        pytest.skip(
            "LaTeX is not installed (apt-get install texlive-latex-recommended texlive-latex-extra)"
        )
    shutil.copytree(PAPER, tmp_path / "paper", ignore=shutil.ignore_patterns("*.pdf", "*.aux"))
    shutil.copytree(ROOT / "figures", tmp_path / "figures")
    proc = subprocess.run(["make", "-C", str(tmp_path / "paper")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:]
    log = (tmp_path / "paper" / "main.log").read_text(errors="replace")
    assert "undefined" not in log.lower().replace("undefined on input", "UNDEF"), "undefined refs"
    assert not re.search(r"(Citation|Reference) `[^']+' on page \d+ undefined", log)
    assert (tmp_path / "paper" / "main.pdf").stat().st_size > 100_000
