"""`flowmath reproduce` keeps quick runs apart from the committed full-settings outputs.

A stand-in experiment (the protocol's Config / quick / run / plot / tex, no computation) is
registered in place of the real ones, so these tests check the folder logic every experiment
inherits, in milliseconds.
"""

import dataclasses
import json
import types
from pathlib import Path

import pytest

import experiments
from flowmath.cli import FULL_DIRS, QUICK_DIRS, main, output_dirs


@dataclasses.dataclass(frozen=True)
class _Config:
    n: int = 100
    sizes: tuple = (1, 2, 3)

    @classmethod
    def quick(cls):
        return cls(n=10, sizes=(1, 2))


def _run(config):
    return {"value": float(config.n), "sizes": list(config.sizes)}


def _plot(results, path):
    from PIL import Image

    Image.new("RGB", (400, 40), "white").save(path)  # a blank figure


def _tex(results):
    return f"value {results['value']}\n"


@pytest.fixture
def fake(monkeypatch, tmp_path):
    module = types.ModuleType("experiments.fake")
    module.__doc__ = "A stand-in experiment."
    module.Config, module.run, module.plot, module.tex = _Config, _run, _plot, _tex
    monkeypatch.setattr(experiments, "available", lambda: ["fake"])
    monkeypatch.setattr(experiments, "load", lambda name: module)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _files(root):
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_output_dirs():
    assert output_dirs(False) == FULL_DIRS == (Path("figures"), Path("paper/generated"))
    assert output_dirs(True) == QUICK_DIRS == (Path("figures/quick"), Path("paper/generated/quick"))
    # --out takes the tables too, unless --tex-dir names their folder
    assert output_dirs(True, "o") == output_dirs(False, "o") == (Path("o"), Path("o"))
    assert output_dirs(True, "o", "t") == (Path("o"), Path("t"))
    assert output_dirs(True, None, "t") == (Path("figures/quick"), Path("t"))


def test_quick_never_overwrites_full(fake):
    assert main(["reproduce", "--raise"]) == 0
    full = _files(fake)
    assert set(full) == {"figures/fake.json", "figures/fake.png", "paper/generated/fake.tex"}
    assert json.loads(full["figures/fake.json"])["settings"] == "full"
    assert main(["reproduce", "--quick", "--raise"]) == 0
    after = _files(fake)
    assert {k: after[k] for k in full} == full, "a quick run changed a full-settings file"
    quick = {k: v for k, v in after.items() if k not in full}
    assert set(quick) == {
        "figures/quick/fake.json",
        "figures/quick/fake.png",
        "paper/generated/quick/fake.tex",
    }
    assert json.loads(quick["figures/quick/fake.json"])["settings"] == "quick"
    assert quick["paper/generated/quick/fake.tex"].startswith(b"% QUICK SETTINGS")
    # the quick figure is stamped as such (the full one stays blank)
    from PIL import Image

    with Image.open(fake / "figures/quick/fake.png") as im:
        assert im.convert("L").getextrema()[0] < 255
    with Image.open(fake / "figures/fake.png") as im:
        assert im.convert("L").getextrema() == (255, 255)


def test_out_takes_tables_too(fake):
    assert main(["reproduce", "--quick", "--out", "elsewhere", "--raise"]) == 0
    assert set(_files(fake)) == {"elsewhere/fake.json", "elsewhere/fake.png", "elsewhere/fake.tex"}


def test_replot_checks_the_saved_config(fake):
    assert main(["reproduce", "--quick", "--raise"]) == 0
    # quick results replotted as quick: fine, and the same table
    before = _files(fake)
    assert main(["reproduce", "--quick", "--replot", "--raise"]) == 0
    assert _files(fake) == before
    # quick results where full ones belong: refused, naming the differing fields
    Path("figures").mkdir(exist_ok=True)
    Path("figures/fake.json").write_bytes(before["figures/quick/fake.json"])
    with pytest.raises(ValueError, match=r"n: saved 10, expected 100.*sizes"):
        main(["reproduce", "--replot", "--raise"])
    assert main(["reproduce", "--replot"]) == 1  # without --raise: reported, exit status 1
    # the same config saved under the other settings' name is refused too
    payload = json.loads(before["figures/quick/fake.json"])
    payload["config"] = dataclasses.asdict(_Config())
    payload["config"]["sizes"] = list(payload["config"]["sizes"])
    Path("figures/fake.json").write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="holds quick results; expected full"):
        main(["reproduce", "--replot", "--raise"])


def test_quick_folders_are_ignored_by_git():
    lines = (Path(__file__).parents[1] / ".gitignore").read_text().split()
    for folder in QUICK_DIRS:
        assert f"{folder.as_posix()}/" in lines, f"{folder}/ must be git-ignored"


def test_bad_out_is_one_line(tmp_path, capsys):
    """``--out`` naming a path under a file: exit 2 and one line that names the flag (no
    traceback)."""
    from flowmath.cli import main

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["reproduce", "coupling_jacobian", "--out", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "`--out` must be a folder" in err[0]
