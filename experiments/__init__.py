"""Experiments: one module per figure or table, discovered by name.

A module here is an experiment when it defines ``Config`` (with ``quick()``), ``run`` and
``plot``; modules whose names start with ``_`` or ``bench_`` are not.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

__all__ = ["available", "load"]


def available() -> list[str]:
    names = []
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name.startswith(("_", "bench_")):
            continue
        names.append(info.name)
    return sorted(names)


def load(name: str):
    if name not in available():
        raise ValueError(f"unknown experiment {name!r}; available: {', '.join(available())}")
    module = importlib.import_module(f"experiments.{name}")
    for attr in ("Config", "run", "plot"):
        if not hasattr(module, attr):
            raise TypeError(f"experiments.{name} must define `{attr}`")
    return module
