"""Registry entries for the affine autoregressive layers (MAF, IAF): orderings, depths, the
linear (no hidden layer) conditioner and both activations."""

import numpy as np
from registry import Case

import flowmath as fm

_H = (8, 8)

CASES = []
for _cls in (fm.MAF, fm.IAF):
    _n = _cls.__name__
    CASES += [
        Case(f"{_n}-natural", lambda c=_cls: c(hidden=_H), (5,)),
        Case(f"{_n}-reversed-relu", lambda c=_cls: c(_H, "reversed", activation="relu"), (4,)),
        Case(f"{_n}-random", lambda c=_cls: c((8,), "random", seed=3), (6,)),
        Case(f"{_n}-linear", lambda c=_cls: c(()), (3,)),
        Case(f"{_n}-array-order", lambda c=_cls: c((8,), np.array([2, 0, 3, 1])), (4,)),
        Case(f"{_n}-d1", lambda c=_cls: c((4,)), (1,)),
    ]
CASES.append(Case("MAF-default", fm.MAF, (3,)))
CASES.append(Case("IAF-default", fm.IAF, (3,)))
