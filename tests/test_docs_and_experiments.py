"""Docstring examples run, and every experiment module follows the protocol."""

import dataclasses
import doctest
import importlib
import pkgutil

import pytest

import experiments
import flowmath

MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(flowmath.__path__, prefix="flowmath.")
    if not m.name.startswith("flowmath.kernels")  # numba modules carry no examples
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} doctest example(s) failed in {name}"


@pytest.mark.parametrize("name", experiments.available())
def test_experiment_protocol(name):
    module = experiments.load(name)
    assert (module.__doc__ or "").strip(), f"experiments.{name} needs a docstring (its title)"
    config, quick = module.Config(), module.Config.quick()
    assert dataclasses.is_dataclass(config) and isinstance(quick, module.Config)
    assert module.Config.__dataclass_params__.frozen, "Config must be a frozen dataclass"
    assert callable(module.run) and callable(module.plot)


@pytest.mark.slow
@pytest.mark.parametrize("name", experiments.available())
def test_experiment_quick_run(name, tmp_path):
    """`flowmath reproduce NAME --quick` end to end (slow: run with `pytest -m slow`)."""
    from flowmath.cli import main

    assert (
        main(
            [
                "reproduce",
                name,
                "--quick",
                "--out",
                str(tmp_path),
                "--tex-dir",
                str(tmp_path / "tex"),
                "--raise",
            ]
        )
        == 0
    )
    assert (tmp_path / f"{name}.png").stat().st_size > 1000


def test_readme_tour_runs():
    """The README's Python tour is executed as written."""
    import re
    from pathlib import Path

    text = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python block"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


@pytest.mark.parametrize("name", experiments.available())
def test_committed_results_replot(name, tmp_path):
    """`flowmath reproduce NAME --replot` redraws the committed figure and table from the saved
    results, and the table it writes is the committed one (no hand-edited numbers)."""
    import shutil
    from pathlib import Path

    from flowmath.cli import main

    root = Path(__file__).parents[1]
    saved = root / "figures" / f"{name}.json"
    assert saved.exists(), f"figures/{name}.json is missing: run `flowmath reproduce {name}`"
    shutil.copy(saved, tmp_path / saved.name)
    args = ["reproduce", name, "--replot", "--out", str(tmp_path), "--tex-dir", str(tmp_path)]
    assert main(args + ["--raise"]) == 0
    assert (tmp_path / f"{name}.png").stat().st_size > 1000
    committed = root / "paper" / "generated" / f"{name}.tex"
    if (tmp_path / f"{name}.tex").exists():
        assert (tmp_path / f"{name}.tex").read_text() == committed.read_text()


def test_paper_shows_every_experiment():
    from pathlib import Path

    text = (Path(__file__).parents[1] / "paper" / "main.tex").read_text()
    for name in experiments.available():
        assert f"\\fig{{{name}}}" in text, f"paper/main.tex does not show {name}"
